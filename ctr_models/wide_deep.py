"""``wide_deep.v1``: Wide & Deep.

Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016. A wide linear model and a deep MLP
are trained jointly; their logits are summed. The deep part's default 1024-512-256 ReLU tower is the paper's
(its Figure 4 / section 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding
from embcompress.registry import MODELS

from .layers import MLP, check_collection, check_dropout, check_flag, check_num_dense, check_sizes, flat_input


@MODELS.register("wide_deep.v1")
class WideDeep(nn.Module):
    """Wide & Deep over any embedding table: ``logit = wide([e, dense]) + deep([e, dense])``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``.
    Wide: ``Linear(F * D + num_dense, 1)`` over the flattened embeddings and the dense features (tables only
    give vectors, so the per-id wide weight is a learned ``D``-vector per field applied to the embedding, as
    in ``lr.v1``; the paper's hand-made cross-product features have no counterpart here). Deep:
    ``MLP(F * D + num_dense -> deep_mlp -> 1)``. Dense features enter both, concatenated to the embeddings.

    Options: ``deep_mlp`` hidden widths (default 1024-512-256, the paper's), ``dropout`` after each hidden
    ReLU and ``batch_norm`` before it (the paper uses neither; defaults 0.0 and False).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = WideDeep(emb, 13, deep_mlp=[32, 16])
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        deep_mlp: Sequence[int] = (1024, 512, 256),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        check_collection(embeddings, "WideDeep")
        deep_mlp = check_sizes("deep_mlp", deep_mlp, owner=self)
        dropout = check_dropout(dropout, owner=self)
        batch_norm = check_flag("batch_norm", batch_norm, owner=self)
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        in_features = embeddings.num_fields * embeddings.embedding_dim + self.num_dense
        self.wide = nn.Linear(in_features, 1)
        self.deep = MLP(in_features, [*deep_mlp, 1], final_relu=False, dropout=dropout, batch_norm=batch_norm)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = flat_input(self.embeddings(sparse), dense, self.num_dense)
        return (self.wide(x) + self.deep(x)).squeeze(-1)
