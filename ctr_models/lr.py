"""``lr.v1``: logistic regression, the first-order baseline.

McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013 (logistic regression on hashed
categorical features, the classic CTR baseline). Here the per-id weights come from the embedding table under
test, so LR measures how well a compressed table stores one learned scalar per id.
"""

from __future__ import annotations

import torch
from torch import nn

from embcompress.contract import CompressedEmbedding
from embcompress.registry import MODELS

from .layers import check_collection, check_num_dense, flat_input


@MODELS.register("lr.v1")
class LogisticRegression(nn.Module):
    """Logistic regression over any embedding table: ``logit = b + sum_f w_f . e_f + w_dense . dense``.

    Shapes: ``dense FloatTensor[B, num_dense]``, ``sparse LongTensor[B, F]`` -> logits ``FloatTensor[B]``.
    Dense features enter linearly: one ``Linear(F * D + num_dense, 1)`` over the flattened embeddings
    concatenated with the dense features.

    Tables only give ``D``-vectors, so the first-order weight of id ``v`` in field ``f`` is ``w_f . e_v``: a
    learned ``D``-vector per field applied to the id's embedding. The table stays the only per-id storage (so
    its memory report is the model's id memory), and since ``w_f . e_v`` can take any value per id, the model
    is as expressive as classic LR with one scalar weight per id. No options.

    >>> import torch
    >>> from embcompress import build_table
    >>> emb = build_table({"type": "full.v1"}, [10, 20, 30], 8)
    >>> model = LogisticRegression(emb, 13)
    >>> model(torch.rand(4, 13), torch.zeros(4, 3, dtype=torch.long)).shape
    torch.Size([4])
    """

    def __init__(self, embeddings: CompressedEmbedding, num_dense: int) -> None:
        super().__init__()
        check_collection(embeddings, "LogisticRegression")
        self.embeddings = embeddings
        self.num_dense = check_num_dense(num_dense, owner=self)
        self.linear = nn.Linear(embeddings.num_fields * embeddings.embedding_dim + self.num_dense, 1)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x = flat_input(self.embeddings(sparse), dense, self.num_dense)
        return self.linear(x).squeeze(-1)
