"""``fm.v1``: factorization machine.

Rendle, "Factorization Machines", ICDM 2010. The logit is a first-order linear term plus the sum of pairwise
dot products of the field embeddings, computed in O(F * D) with the square-of-sum trick.
"""

from __future__ import annotations

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding
from embcompress.registry import MODELS

from .layers import FMInteraction, check_collection, check_num_dense, flat_input, fm_pair_scale


@MODELS.register("fm.v1")
class FactorizationMachine(nn.Module):
    """A factorization machine over any embedding table.

    ``logit = b + w . [e_1, ..., e_F, dense] + s * sum_{i<j} <e_i, e_j>``, the pairwise sum computed as
    ``0.5 * sum_d ((sum_f e_fd)^2 - sum_f e_fd^2)``, with the constant ``s = 1 / sqrt(F (F - 1) / 2)``
    (:func:`~embcompress.ctr_models.layers.fm_pair_scale`: it keeps the initial logit noise of full-scale
    rows small; the embeddings absorb any constant).

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``.
    Dense features enter through the linear (first-order) term only; the pairwise term is over the ``F``
    field embeddings. The first-order term is the one of ``lr.v1`` (a learned ``D``-vector per field applied
    to the embedding, so the table is the only per-id storage). No options.

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = FactorizationMachine(emb, 13)
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(self, embeddings: CompressedEmbedding, num_dense: int) -> None:
        super().__init__()
        check_collection(embeddings, "FactorizationMachine")
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        self.linear = nn.Linear(embeddings.num_fields * embeddings.embedding_dim + self.num_dense, 1)
        self.interaction = FMInteraction(fm_pair_scale(embeddings.num_fields))

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        vectors = self.embeddings(sparse)
        first_order = self.linear(flat_input(vectors, dense, self.num_dense)).squeeze(-1)
        return first_order + self.interaction(vectors)
