"""Layers shared by the CTR models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "DotInteraction"]


class MLP(nn.Sequential):
    """Linear layers of the given widths with ReLU between them (and after the last when ``final_relu``).

    Shapes: ``FloatTensor[B, in_features] -> FloatTensor[B, sizes[-1]]``.
    """

    def __init__(self, in_features: int, sizes: Sequence[int], *, final_relu: bool = True) -> None:
        sizes = [int(s) for s in sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be a non-empty list of positive ints, got {sizes!r}")
        layers: list[nn.Module] = []
        for i, width in enumerate(sizes):
            layers.append(nn.Linear(in_features, width))
            if i < len(sizes) - 1 or final_relu:
                layers.append(nn.ReLU())
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
