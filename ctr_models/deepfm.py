"""``deepfm.v1``: DeepFM.

Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction", IJCAI 2017. An FM part
(first-order + pairwise terms) and a deep MLP share the field embeddings; their logits are summed.
Defaults follow the paper's Criteo network (400-400-400, ReLU) with the regularisation of the BARS Criteo_x1
benchmark (reczoo/BARS, ``ranking/ctr/DeepFM/DeepFM_criteo_x1``: dropout 0.1, batch norm).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding
from embcompress.registry import MODELS

from .layers import (
    MLP,
    FMInteraction,
    check_collection,
    check_dropout,
    check_flag,
    check_num_dense,
    check_sizes,
    flat_input,
    fm_pair_scale,
)


@MODELS.register("deepfm.v1")
class DeepFM(nn.Module):
    """DeepFM over any embedding table: ``logit = FM(e, dense) + MLP([e_1, ..., e_F, dense])``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``.
    The FM part is ``fm.v1``'s (``Linear(F * D + num_dense, 1)`` + pairwise term over the ``F`` embeddings);
    the deep part is ``MLP(F * D + num_dense -> deep_mlp -> 1)``. Dense features enter both the FM's linear
    term and, concatenated to the flattened embeddings, the MLP; they take no part in the pairwise term.

    Options: ``deep_mlp`` hidden widths (default 400-400-400, the paper's), ``dropout`` after each hidden
    ReLU (default 0.1, BARS) and ``batch_norm`` before it (default True, BARS).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = DeepFM(emb, 13, deep_mlp=[16, 16])
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        deep_mlp: Sequence[int] = (400, 400, 400),
        dropout: float = 0.1,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        check_collection(embeddings, "DeepFM")
        deep_mlp = check_sizes("deep_mlp", deep_mlp, owner=self)
        dropout = check_dropout(dropout, owner=self)
        batch_norm = check_flag("batch_norm", batch_norm, owner=self)
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        in_features = embeddings.num_fields * embeddings.embedding_dim + self.num_dense
        self.linear = nn.Linear(in_features, 1)
        self.interaction = FMInteraction(fm_pair_scale(embeddings.num_fields))
        self.deep = MLP(in_features, [*deep_mlp, 1], final_relu=False, dropout=dropout, batch_norm=batch_norm)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings(sparse)
        x = flat_input(vectors, dense, self.num_dense)
        return self.linear(x).squeeze(-1) + self.interaction(vectors) + self.deep(x).squeeze(-1)
