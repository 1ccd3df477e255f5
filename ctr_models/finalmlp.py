"""``finalmlp.v1``: FinalMLP.

Mao et al., "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction", AAAI 2023. Two MLP streams see
the same features, each through its own feature-selection gate (a gating MLP on a learned context, output
``2 * sigmoid``), and a multi-head bilinear layer fuses their outputs into the logit. Defaults are the BARS
Criteo_x1 setting (reczoo/BARS ``ranking/ctr/FinalMLP/FinalMLP_criteo_x1``, FuxiCTR 2.0.1): streams
400-400-400 and 1000, gate hidden layer 800, 200 fusion heads, batch norm, dropout 0.2 (BARS uses 0.2 in
stream 1 and 0.3 in stream 2; here one rate serves both).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding, check_positive_int
from embcompress.registry import MODELS

from .layers import (
    MLP,
    BilinearFusion,
    check_collection,
    check_dropout,
    check_flag,
    check_num_dense,
    check_sizes,
    flat_input,
)


class FeatureGate(nn.Module):
    """FinalMLP's feature selection for one stream: ``x * 2 * sigmoid(MLP(context))``, ``[B, N] -> [B, N]``.

    The context is a learned ``D``-vector shared by all samples (FuxiCTR's default when no context fields are
    named), so the gate learns which inputs (embedding coordinates and dense features) the stream should see.
    """

    def __init__(self, context_dim: int, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.zeros(context_dim))
        self.mlp = MLP(context_dim, [*hidden, in_features], final_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 * torch.sigmoid(self.mlp(self.context)))


@MODELS.register("finalmlp.v1")
class FinalMLP(nn.Module):
    """FinalMLP over any embedding table, on ``x = [e_1, ..., e_F, dense]``.

    ``logit = fusion(mlp1(gate1(x)), mlp2(gate2(x)))`` where ``fusion`` is the multi-head bilinear layer
    ``b + w_1 . y_1 + w_2 . y_2 + sum_h y_1h^T W_h y_2h``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``;
    ``x`` is ``FloatTensor[B, N]``, ``N = F * D + num_dense``; the streams output ``[B, mlp1[-1]]`` and
    ``[B, mlp2[-1]]``. Dense features enter both streams, concatenated to the flattened embeddings, and are
    gated like the embedding coordinates (BARS instead uses them as stream 1's gate context; here the
    contexts are learned vectors, FuxiCTR's default, so the model needs nothing beyond the table's output).

    Options: ``mlp1`` and ``mlp2`` stream widths (default 400-400-400 and 1000; each stream ends with a ReLU,
    as in the reference code); ``gate_mlp`` hidden widths of the gating MLPs (default 800; ``[]`` for a
    linear gate, ``None`` to switch feature selection off, the paper's "w/o FS" ablation); ``num_heads`` of
    the fusion, which must divide both stream widths (default 200); ``dropout`` after each stream's hidden
    ReLU (default 0.2) and ``batch_norm`` before it (default True).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = FinalMLP(emb, 13, mlp1=[16, 16], mlp2=[8], gate_mlp=[8], num_heads=2)
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        mlp1: Sequence[int] = (400, 400, 400),
        mlp2: Sequence[int] = (1000,),
        gate_mlp: Sequence[int] | None = (800,),
        num_heads: int = 200,
        dropout: float = 0.2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        check_collection(embeddings, "FinalMLP")
        mlp1 = check_sizes("mlp1", mlp1, owner=self)
        mlp2 = check_sizes("mlp2", mlp2, owner=self)
        if gate_mlp is not None:
            gate_mlp = check_sizes("gate_mlp", gate_mlp, allow_empty=True, owner=self)
        num_heads = check_positive_int("num_heads", num_heads, owner=self)
        if mlp1[-1] % num_heads or mlp2[-1] % num_heads:
            raise ValueError(
                f"num_heads={num_heads!r} must divide both stream widths "
                f"(mlp1[-1]={mlp1[-1]}, mlp2[-1]={mlp2[-1]})"
            )
        dropout = check_dropout(dropout, owner=self)
        batch_norm = check_flag("batch_norm", batch_norm, owner=self)
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        in_features = embeddings.num_fields * embeddings.embedding_dim + self.num_dense
        if gate_mlp is None:
            self.gate1 = self.gate2 = None
        else:
            self.gate1 = FeatureGate(embeddings.embedding_dim, in_features, gate_mlp)
            self.gate2 = FeatureGate(embeddings.embedding_dim, in_features, gate_mlp)
        self.mlp1 = MLP(in_features, mlp1, dropout=dropout, batch_norm=batch_norm)
        self.mlp2 = MLP(in_features, mlp2, dropout=dropout, batch_norm=batch_norm)
        self.fusion = BilinearFusion(mlp1[-1], mlp2[-1], num_heads=num_heads)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = flat_input(self.embeddings(sparse), dense, self.num_dense)
        x1 = x if self.gate1 is None else self.gate1(x)
        x2 = x if self.gate2 is None else self.gate2(x)
        return self.fusion(self.mlp1(x1), self.mlp2(x2))
