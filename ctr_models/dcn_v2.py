"""``dcn_v2.v1``: DCN-V2.

Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning to Rank
Systems", WWW 2021. The cross layer becomes ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with a full matrix
``W_l`` (or a mixture of low-rank experts), and the cross network is combined with a deep MLP either stacked
(cross, then deep) or in parallel (concatenated). Defaults are the BARS Criteo_x1 setting (reczoo/BARS
``ranking/ctr/DCNv2/DCNv2_criteo_x1``): parallel, 3 full-rank cross layers, deep part 500-500-500,
dropout 0.1.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding, check_choice, check_positive_int
from embcompress.registry import MODELS

from .layers import MLP, CrossNetV2, check_collection, check_dropout, check_num_dense, check_sizes, flat_input

STRUCTURES = ("parallel", "stacked")


@MODELS.register("dcn_v2.v1")
class DCNv2(nn.Module):
    """DCN-V2 over any embedding table, on ``x0 = [e_1, ..., e_F, dense]``.

    ``parallel``: ``logit = w . [cross(x0), deep(x0)] + b``; ``stacked``: ``logit = w . deep(cross(x0)) + b``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``;
    ``x0`` is ``FloatTensor[B, N]`` with ``N = F * D + num_dense``; the cross network keeps width ``N``. Dense
    features enter by concatenation to the flattened embeddings (crossed with every embedding coordinate).

    Options: ``cross_layers`` (default 3); ``deep_mlp`` hidden widths (default 500-500-500; ``[]`` leaves the
    cross network alone); ``structure`` ``"parallel"`` (default) or ``"stacked"``; ``low_rank`` ``None`` for
    full-rank ``N x N`` cross matrices (default) or a rank ``r`` for the paper's mixture of low-rank experts
    (DCN-Mix; FuxiCTR suggests ``r = 32``), with ``num_experts`` experts per layer (default 4, the
    FuxiCTR/BARS value; used only when ``low_rank`` is set); ``dropout`` after each hidden ReLU of the deep
    part (default 0.1).

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = DCNv2(emb, 13, deep_mlp=[16], structure="stacked", low_rank=4)
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(
        self,
        embeddings: CompressedEmbedding,
        num_dense: int,
        *,
        cross_layers: int = 3,
        deep_mlp: Sequence[int] = (500, 500, 500),
        structure: str = "parallel",
        low_rank: int | None = None,
        num_experts: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_collection(embeddings, "DCNv2")
        cross_layers = check_positive_int("cross_layers", cross_layers, owner=self)
        deep_mlp = check_sizes("deep_mlp", deep_mlp, allow_empty=True, owner=self)
        structure = check_choice("structure", structure, STRUCTURES, owner=self)
        low_rank = check_positive_int("low_rank", low_rank, optional=True, owner=self)
        num_experts = check_positive_int("num_experts", num_experts, owner=self)
        dropout = check_dropout(dropout, owner=self)
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        self.structure = structure
        in_features = embeddings.num_fields * embeddings.embedding_dim + self.num_dense
        self.cross = CrossNetV2(in_features, cross_layers, low_rank=low_rank, num_experts=num_experts)
        self.deep = MLP(in_features, deep_mlp, dropout=dropout) if deep_mlp else None
        if self.deep is None:
            head_in = in_features
        else:
            head_in = self.deep.out_features + (in_features if structure == "parallel" else 0)
        self.head = nn.Linear(head_in, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = flat_input(self.embeddings(sparse), dense, self.num_dense)
        crossed = self.cross(x0)
        if self.deep is None:
            out = crossed
        elif self.structure == "stacked":
            out = self.deep(crossed)
        else:
            out = torch.cat([crossed, self.deep(x0)], dim=1)
        return self.head(out).squeeze(-1)
