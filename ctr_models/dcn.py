"""``dcn.v1``: Deep & Cross Network.

Wang, Fu, Fu and Wang, "Deep & Cross Network for Ad Click Predictions", ADKDD 2017. A cross network of
layers ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l`` and a deep MLP run in parallel on the same input; their
outputs are concatenated into a final linear layer. Defaults: 3 cross layers and a 256-256-256 deep part,
the setting of issue 5 (the BARS Criteo_x1 benchmark, reczoo/BARS ``ranking/ctr/DCN/DCN_criteo_x1``, also
uses 3 cross layers, with a 400-400-400 deep part and dropout 0.1).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding, check_positive_int
from embcompress.registry import MODELS

from .layers import (
    MLP, CrossNet, check_collection, check_dropout, check_flag, check_num_dense, check_sizes, flat_input,
)


@MODELS.register("dcn.v1")
class DCN(nn.Module):
    """DCN over any embedding table: ``logit = w . [cross(x0), deep(x0)] + b`` on ``x0 = [e_1..e_F, dense]``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``;
    ``x0`` is ``FloatTensor[B, N]`` with ``N = F * D + num_dense``; the cross network keeps width ``N``, the
    deep part ends at ``deep_mlp[-1]``. Dense features enter by concatenation to the flattened embeddings, so
    they are crossed with every embedding coordinate and feed the deep part too.

    Options: ``cross_layers`` (default 3), ``deep_mlp`` hidden widths (default 256-256-256; ``[]`` leaves the
    cross network alone, BARS' "CrossNet"), ``dropout`` after each hidden ReLU and ``batch_norm`` before it
    (defaults 0.0 and False).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = DCN(emb, 13, cross_layers=2, deep_mlp=[16])
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        cross_layers: int = 3,
        deep_mlp: Sequence[int] = (256, 256, 256),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        check_collection(embeddings, "DCN")
        cross_layers = check_positive_int("cross_layers", cross_layers, owner=self)
        deep_mlp = check_sizes("deep_mlp", deep_mlp, allow_empty=True, owner=self)
        dropout = check_dropout(dropout, owner=self)
        batch_norm = check_flag("batch_norm", batch_norm, owner=self)
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        in_features = embeddings.num_fields * embeddings.embedding_dim + self.num_dense
        self.cross = CrossNet(in_features, cross_layers)
        self.deep = MLP(in_features, deep_mlp, dropout=dropout, batch_norm=batch_norm) if deep_mlp else None
        self.head = nn.Linear(in_features + (deep_mlp[-1] if deep_mlp else 0), 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = flat_input(self.embeddings(sparse), dense, self.num_dense)
        out = self.cross(x0)
        if self.deep is not None:
            out = torch.cat([out, self.deep(x0)], dim=1)
        return self.head(out).squeeze(-1)
