"""``dlrm.v1``: Deep Learning Recommendation Model.

Naumov et al., "Deep Learning Recommendation Model for Personalization and Recommendation Systems", 2019.
Dense features go through a bottom MLP to a ``D``-vector; it and the ``F`` field embeddings interact by
pairwise dot products, which are concatenated with the dense vector and fed to a top MLP that outputs a logit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding
from embcompress.registry import MODELS

from .layers import MLP, DotInteraction, check_dense, check_flag, check_num_dense, check_sizes


@MODELS.register("dlrm.v1")
class DLRM(nn.Module):
    """DLRM over any embedding table.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``.
    Dense features enter through the bottom MLP (``num_dense -> bottom_mlp -> D``). Defaults are the published
    Criteo settings (bottom 512-256-64-D, top 512-256-1).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = DLRM(emb, 13, bottom_mlp=[16], top_mlp=[16])
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        bottom_mlp: Sequence[int] = (512, 256, 64),
        top_mlp: Sequence[int] = (512, 256),
        self_interaction: bool = False,
    ) -> None:
        super().__init__()
        if embeddings.single:
            raise ValueError("DLRM needs a feature collection (one cardinality per field), not a single table")
        bottom_mlp = check_sizes("bottom_mlp", bottom_mlp, allow_empty=True, owner=self)
        top_mlp = check_sizes("top_mlp", top_mlp, allow_empty=True, owner=self)
        self_interaction = check_flag("self_interaction", self_interaction, owner=self)
        dim = embeddings.embedding_dim
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        self.bottom = MLP(self.num_dense, [*bottom_mlp, dim]) if self.num_dense else None
        num_vectors = embeddings.num_fields + (1 if self.bottom is not None else 0)
        self.interaction = DotInteraction(num_vectors, self_interaction=self_interaction)
        top_in = self.interaction.out_features + (dim if self.bottom is not None else 0)
        self.top = MLP(top_in, [*top_mlp, 1], final_relu=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings(sparse)
        check_dense(dense, vectors.shape[0], self.num_dense)
        if self.bottom is None:
            return self.top(self.interaction(vectors)).squeeze(-1)
        x = self.bottom(dense)
        z = self.interaction(torch.cat([x.unsqueeze(1), vectors], dim=1))
        return self.top(torch.cat([x, z], dim=1)).squeeze(-1)
