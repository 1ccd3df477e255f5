"""Layers shared by the CTR models, and the checks of the options and inputs they all share.

Every layer states its shapes. ``B`` is the batch, ``F`` the number of fields, ``D`` the embedding width and
``N`` the width of the flat input ``[flattened embeddings, dense features]`` (``F * D + num_dense``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from embcompress.validate import check_bool, check_int, check_int_list, check_number

__all__ = [
    "MLP",
    "DotInteraction",
    "FMInteraction",
    "CrossNet",
    "CrossNetV2",
    "BilinearFusion",
    "check_collection",
    "check_num_dense",
    "check_dense",
    "check_sizes",
    "check_dropout",
    "check_flag",
    "flat_input",
]


# ------------------------------------------------------------------------------------------ option checks
def check_collection(embeddings, model: str) -> None:
    """A model needs a feature collection (one cardinality per field), not a single table."""
    if getattr(embeddings, "single", False):
        raise ValueError(
            f"{model} needs a feature collection (one cardinality per field), not a single table"
        )


# Thin names over the contract's typed validators (embcompress.validate); ``owner`` (the model) prefixes errors.
def check_num_dense(num_dense, *, owner=None) -> int:
    """``num_dense`` as an int >= 0, or a ``ValueError`` naming the bad value."""
    return check_int("num_dense", num_dense, lo=0, owner=owner)


def check_sizes(name: str, sizes, *, allow_empty: bool = False, owner=None) -> tuple[int, ...]:
    """Layer widths as a tuple of positive ints, or a ``ValueError`` naming the option and the bad value."""
    return check_int_list(name, sizes, lo=1, allow_empty=allow_empty, owner=owner)


def check_dropout(dropout, name: str = "dropout", *, owner=None) -> float:
    """A dropout probability in ``[0, 1)``."""
    return check_number(name, dropout, lo=0, hi=1, hi_open=True, owner=owner)


def check_flag(name: str, value, *, owner=None) -> bool:
    """A plain bool (so a YAML string like ``"no"`` is not silently truthy)."""
    return check_bool(name, value, owner=owner)


def flat_input(vectors: torch.Tensor, dense: torch.Tensor, num_dense: int) -> torch.Tensor:
    """``[B, F, D]`` embeddings and ``[B, num_dense]`` dense features -> ``[B, F * D + num_dense]``."""
    check_dense(dense, vectors.shape[0], num_dense)
    return torch.cat([vectors.flatten(1), dense.to(vectors.dtype)], dim=1)


def check_dense(dense: torch.Tensor, batch: int, num_dense: int) -> None:
    """``dense`` must be ``[batch, num_dense]``: a model built for other data says so instead of mis-reading it."""
    if dense.dim() != 2 or dense.shape[1] != num_dense or dense.shape[0] != batch:
        raise ValueError(f"dense must have shape [{batch}, {num_dense}] (batch, num_dense), got {list(dense.shape)}")


# ------------------------------------------------------------------------------------------------- layers
class MLP(nn.Sequential):
    """Linear layers of the given widths with ReLU between them (and after the last when ``final_relu``).

    Shapes: ``FloatTensor[B, in_features] -> FloatTensor[B, sizes[-1]]``. Each layer followed by a ReLU gets
    ``BatchNorm1d`` before the ReLU when ``batch_norm`` and ``Dropout`` after it when ``dropout > 0``; a final
    layer without ReLU (a logit or projection) gets neither. The defaults add nothing, so the layer indices
    (and state_dict keys) are those of a plain Linear/ReLU stack.
    """

    def __init__(
        self,
        in_features: int,
        sizes: Sequence[int],
        *,
        final_relu: bool = True,
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        sizes = check_int_list("MLP sizes", sizes, lo=1)
        dropout = check_dropout(dropout)
        layers: list[nn.Module] = []
        for i, width in enumerate(sizes):
            layers.append(nn.Linear(in_features, width))
            if i < len(sizes) - 1 or final_relu:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(width))
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            in_features = width
        super().__init__(*layers)
        self.out_features = in_features


class DotInteraction(nn.Module):
    """Pairwise dot products of ``F`` vectors (DLRM): ``[B, F, D] -> [B, F * (F - 1) / 2]`` (pairs i > j).

    With ``self_interaction`` the squared norms (pairs i == j) are kept too: ``F * (F + 1) / 2`` outputs.
    """

    def __init__(self, num_vectors: int, *, self_interaction: bool = False) -> None:
        super().__init__()
        offset = 0 if self_interaction else -1
        rows, cols = torch.tril_indices(num_vectors, num_vectors, offset=offset)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_features = rows.numel()

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram[:, self.rows, self.cols]


class FMInteraction(nn.Module):
    """The factorization-machine pairwise term ``sum_{i<j} <e_i, e_j>`` in O(F * D): ``[B, F, D] -> [B]``.

    Computed as ``0.5 * sum_d ((sum_f e_fd)^2 - sum_f e_fd^2)`` (Rendle 2010, lemma 3.1), times a constant
    ``scale``. No parameters.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        square_of_sum = vectors.sum(dim=1).pow(2)
        sum_of_squares = vectors.pow(2).sum(dim=1)
        return (0.5 * self.scale) * (square_of_sum - sum_of_squares).sum(dim=1)


def fm_pair_scale(num_fields: int) -> float:
    """``1 / sqrt(F (F - 1) / 2)``: the FM models' constant on the pairwise term.

    Tables start their rows at the full table's N(0, 1/D), so each dot product starts with std ~ D**-0.5 and the
    sum over all pairs with ~ sqrt(pairs / D): about 4.5 for Criteo's 26 fields at D = 16, a logit noise that
    costs FM 0.027 test AUC on the default synthetic data (0.8329 against 0.8615 with this scale). A constant
    factor is absorbed by the embeddings' scale, so the model family is still the factorization machine.
    """
    return (max(num_fields * (num_fields - 1) // 2, 1)) ** -0.5


class CrossNet(nn.Module):
    """DCN's cross network: ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l``: ``[B, N] -> [B, N]``.

    One weight vector and one bias vector of width ``N`` per layer (Wang et al. 2017); weights start
    uniform in ``±1/sqrt(N)`` (``nn.Linear``'s default), biases at zero.
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        bound = in_features ** -0.5
        self.weight = nn.Parameter(torch.empty(num_layers, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_layers, in_features))
        self.out_features = in_features

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weight, self.bias):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return x


class CrossNetV2(nn.Module):
    """DCN-V2's cross network: ``[B, N] -> [B, N]`` (Wang et al. 2021).

    Full rank (``low_rank=None``): ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` with ``W_l``
    ``N x N``. With ``low_rank=r`` each layer is the paper's mixture of ``num_experts`` low-rank experts
    (DCN-Mix): ``x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l``, ``E_i(x_l) = x_0 * (U_l^i g(C_l^i
    g(V_l^iT x_l)) + b_l)`` with ``g = tanh``, ``V, U`` of rank ``r``, ``C`` ``r x r``, and the gates
    ``G(x_l) = softmax(W_g x_l)`` shared by all layers. All experts of a layer run in one batched einsum.
    """

    def __init__(
        self, in_features: int, num_layers: int, *, low_rank: int | None = None, num_experts: int = 1
    ) -> None:
        super().__init__()
        self.out_features = in_features
        self.low_rank = low_rank
        if low_rank is None:
            self.layers = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(num_layers))
            return
        n, r, k = in_features, low_rank, num_experts

        def xavier(*shape: int) -> nn.Parameter:
            fan_in, fan_out = shape[-2], shape[-1]
            return nn.Parameter(torch.randn(*shape) * (2.0 / (fan_in + fan_out)) ** 0.5)

        self.V = xavier(num_layers, k, n, r)
        self.C = xavier(num_layers, k, r, r)
        self.U = xavier(num_layers, k, r, n)
        self.bias = nn.Parameter(torch.zeros(num_layers, n))
        self.gate = nn.Linear(n, k, bias=False)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        if self.low_rank is None:
            for layer in self.layers:
                x = x0 * layer(x) + x
            return x
        for V, C, U, b in zip(self.V, self.C, self.U, self.bias):
            h = torch.tanh(torch.einsum("bn,knr->bkr", x, V))
            h = torch.tanh(torch.einsum("bkr,krs->bks", h, C))
            experts = x0.unsqueeze(1) * (torch.einsum("bkr,krn->bkn", h, U) + b)  # [B, K, N]
            gates = torch.softmax(self.gate(x), dim=-1)  # [B, K]
            x = torch.einsum("bk,bkn->bn", gates, experts) + x
        return x


class BilinearFusion(nn.Module):
    """FinalMLP's multi-head bilinear fusion of two streams: ``[B, N1], [B, N2] -> [B]`` logits.

    ``logit = b + w_1 . y_1 + w_2 . y_2 + sum_h y_1h^T W_h y_2h`` where the streams are cut into ``num_heads``
    equal chunks ``y_1h`` (``N1 / H`` wide) and ``y_2h`` (``N2 / H``), each pair with its own ``W_h`` (Mao et
    al. 2023). ``num_heads`` must divide both widths.
    """

    def __init__(self, in1: int, in2: int, *, num_heads: int = 1) -> None:
        super().__init__()
        if in1 % num_heads or in2 % num_heads:
            raise ValueError(f"num_heads={num_heads!r} must divide both stream widths ({in1} and {in2})")
        self.num_heads = num_heads
        self.linear1 = nn.Linear(in1, 1)
        self.linear2 = nn.Linear(in2, 1, bias=False)
        shape = (num_heads, in1 // num_heads, in2 // num_heads)
        # Xavier-normal over the flattened [H * h1 * h2, 1] weight, as in the FuxiCTR reference code.
        numel = shape[0] * shape[1] * shape[2]
        self.weight = nn.Parameter(torch.randn(shape) * (2.0 / (numel + 1)) ** 0.5)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        h1 = y1.view(y1.shape[0], self.num_heads, -1)
        h2 = y2.view(y2.shape[0], self.num_heads, -1)
        bilinear = torch.einsum("bhi,hij,bhj->b", h1, self.weight, h2)
        return (self.linear1(y1) + self.linear2(y2)).squeeze(-1) + bilinear
