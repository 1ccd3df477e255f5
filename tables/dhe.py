"""``dhe.v1``: Deep Hash Embedding, no table: ``k`` hashes of the id encoded densely, then an MLP to ``D``.

Kang, Cheng, Yao, Chen, Hong & Chi, "Learning to Embed Categorical Features without Embedding Tables for
Recommendation", KDD 2021 (DHE).

An id ``x`` of field ``f`` is encoded as ``k`` pseudo-random numbers, fixed functions of ``(seed, f, j, x)``
from our hash family (:mod:`embcompress.hashing`), and a multilayer perceptron maps the encoding to the
vector::

    key[f]   = mix64(mix64(seed) ^ f)                        the stored per-field keys, int64 [F]
    s[f, j]  = mix64(key[f] ^ j)     = keyed_seeds(seed, F, k)[f, j]        j = 0..k-1
    v_j(x)   = hash64(x, s[f, j]) >>> 40                     the top 24 bits, an integer in [0, 2**24)
    u_j(x)   = (2 v_j(x) + 1 - 2**24) / 2**24                uniform on a symmetric grid in (-1, 1), mean 0
    a_0      = u(x) in R^k
    a_i      = mish(W_i a_{i-1} + b_i)                       i = 1..depth, W_i of shape [width, .]
               (with batch_norm=True: mish(BN_i(W_i a_{i-1} + b_i)), as in the paper and Hetu)
    out(x)   = W_out a_depth + b_out                         W_out of shape [D, width]

Design choices:

* **Uniform encoding, not Gaussian.** The paper offers both transforms (uniform, or Gaussian via Box-Muller);
  the uniform one is computed with integer operations and one exact int -> float conversion (every value is an
  odd integer below 2**24 times a power of two, exactly representable in fp32), so the encoding is bitwise
  identical on CPU and GPU and in every process. Box-Muller needs ``log`` and ``cos``, whose last bits differ
  between libms, which would break "identical on CPU and GPU".
* **Budget knob = the MLP width** at fixed depth; with ``num_hashes=0`` (the default) the encoding length is
  tied to it, ``k = width`` (as in the ``cce`` repo's DHE), so bytes grow as ``depth * width**2`` and the
  steps stay a few percent of the budget at every ratio, 1000x and beyond included. A fixed ``num_hashes``
  (the paper's k = 1024) still builds to a budget, in coarser steps at small budgets. Nothing grows with the
  vocabulary: any id in ``[0, 2**63)`` of any field is accepted (``accepts_raw_ids``).
* **No BN by default.** BN makes a training-mode vector depend on the rest of the batch (so a bag's pooled
  vector is not the sum of its ids' vectors) and needs more than one id per batch, and it bought nothing
  measurable here: DLRM on ``make_synthetic(SyntheticConfig(rows=60_000))`` (26 fields, 51,384 ids, D=16),
  2 epochs, batch 1024, seeds 0 and 1, test AUC without / with BN: 0.7424, 0.7331 / 0.7386, 0.7327 at 64x and
  0.6769, 0.6793 / 0.6784, 0.6796 at 1000x, differences within the seed spread. The ``cce`` repo also trains
  its DHE without BN (and reports ReLU working better than Mish there; we keep the paper's Mish).
* **init_std** (the std of the returned vectors at initialisation): hidden layers start at ``N(0, 1/fan_in)``
  and are then rescaled (LSUV, Mishkin & Matas 2016) so their pre-activations have unit RMS over the encodings
  of a fixed probe of ids ``0..1023``; the last layer is rescaled so the returned vectors have std
  ``init_std`` over the probe, its bias centring each coordinate over the probe; the hidden biases start at 0.
  (Nothing is computed on the ``meta`` device.) Other ids have the probe's encoding distribution, so their
  vectors have that std too, up to sampling error (tested over 20k vectors).
* **Batch-invariant on the CPU**: an id's vector does not depend on the batch it is in (without BN in
  training); batches under 16 rows are padded, since the CPU GEMM rounds a few-row product differently.
* **Each distinct lookup once** (:mod:`embcompress.unique`): the encoding and the MLP run on the batch's
  distinct ``(field, id)`` pairs, gathered back after (11x fewer rows on a 4096-sample synthetic batch). Not
  with BN in training, whose statistics count every lookup.
* **Stored**: the layers' fp32 weights and biases (and with BN its affine fp32 parameters, fp32 running stats
  and an int64 batch counter per layer), plus the int64 per-field keys. The ``k`` seeds per field are derived
  in each forward from the keys (``F * k`` words), not stored.

Reference-code pitfalls avoided: the ``cce`` repo's polynomial hash family writes ``1 << 31 - 1``, which
Python parses as ``1 << 30`` (a smaller modulus than intended), and its DHE turns 62-bit hash values into
floats by a float division (so ids map through a rounded value); here hashes are the splitmix64 family on
exact int64 words and only a 24-bit integer is converted. Hetu's trainer sizes its DHE by a hand-written
memory formula; here the budget solver measures the exact bytes of every parameter and buffer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, check_bool, check_int, check_positive_int, check_seed, resolve_init_std,
)
from embcompress.hashing import hash64, mix64
from embcompress.registry import TABLES
from embcompress.unique import embed_unique

__all__ = ["DeepHashEmbedding", "dhe_field_keys", "dhe_seeds", "dhe_encoding"]

ENCODING_BITS = 24  # the top bits of each hash that make one coordinate (exact in fp32)
MIN_ROWS = 16  # smaller batches are padded to this many rows (see embed)
PROBE_IDS = 1024  # ids 0..PROBE_IDS-1 (fields cycling) whose encodings set the initial scales


def dhe_field_keys(seed: int, num_fields: int) -> torch.Tensor:
    """``key[f] = mix64(mix64(seed) ^ f)``, ``LongTensor[num_fields]`` (``keyed_seeds``' first levels)."""
    key = mix64(torch.tensor(int(seed), dtype=torch.int64))
    return mix64(key ^ torch.arange(num_fields, dtype=torch.int64))


def dhe_seeds(field_keys: torch.Tensor, num_hashes: int) -> torch.Tensor:
    """``s[f, j] = mix64(key[f] ^ j)``, ``LongTensor[F, k]``; equals ``keyed_seeds(seed, F, k)``."""
    js = torch.arange(num_hashes, dtype=torch.int64, device=field_keys.device)
    return mix64(field_keys.unsqueeze(-1) ^ js)


def dhe_encoding(ids: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The dense encoding ``FloatTensor[*ids.shape, k]`` of int64 ``ids`` with per-id seeds ``[..., k]``
    (broadcastable to ``[*ids.shape, k]``): ``(2 (hash64(x, s) >>> 40) + 1 - 2**24) / 2**24``, in (-1, 1)."""
    h = hash64(ids.unsqueeze(-1), seeds)
    top = (h >> (64 - ENCODING_BITS)) & ((1 << ENCODING_BITS) - 1)  # logical shift of the uint64 word
    odd = 2 * top + (1 - (1 << ENCODING_BITS))  # odd integers in (-2**24, 2**24): exact in fp32
    return odd.to(torch.float32) * 2.0**-ENCODING_BITS


@TABLES.register("dhe.v1")
class DeepHashEmbedding(CompressedEmbedding):
    """Deep Hash Embedding: ``k`` hashes of (field, id) as a dense uniform vector, then a Mish MLP to ``D``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]`` (every id in ``[0, 2**63)`` in every field); inside,
    the encoding is ``FloatTensor[B, F, k]`` and each hidden layer ``[B, F, width]``, all fields in one batch.
    Stored: ``layers.i.weight`` ``[width, k or width]`` and ``layers.i.bias`` ``[width]`` fp32 for the
    ``depth`` hidden layers, ``out.weight`` ``[D, width]`` and ``out.bias`` ``[D]`` fp32, ``field_keys``
    ``[F]`` int64; with ``batch_norm`` also ``norms.i`` (weight, bias, running mean and var ``[width]`` fp32,
    an int64 counter).

    Args:
        width: the units of every hidden layer (the budget knob).
        depth: the number of hidden layers (Linear + Mish), at least 1.
        num_hashes: ``k``, the encoding length; 0 (default): ``k = width``.
        batch_norm: BatchNorm before each Mish (the paper's and Hetu's variant); training-mode outputs then
            depend on the batch, and a training batch needs more than one id.
        seed: selects the hash functions; the per-field keys are saved in the state_dict.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = DeepHashEmbedding([10**9, 500, 3], 8, width=16)
    >>> t(torch.tensor([[2**40 + 7, 499, 2], [0, 0, 0]])).shape
    torch.Size([2, 3, 8])
    >>> t.memory_report().total_bytes == ((16 * 16 + 16) * 2 + 8 * 16 + 8) * 4 + 3 * 8
    True
    >>> t = DeepHashEmbedding.from_budget([10**6] * 4, 16, budget_bytes=4 * 10**6 * 16 * 4 / 1000)  # 1000x
    >>> t.memory_report().ratio >= 1000
    True
    """

    accepts_raw_ids = True
    checkpoint_ignores = ("init_std", "seed")

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        width: int = 64,
        depth: int = 2,
        num_hashes: int = 0,
        batch_norm: bool = False,
        seed: int = 0,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.width = check_positive_int("width", width, owner=self)
        self.depth = check_positive_int("depth", depth, owner=self)
        num_hashes = check_int("num_hashes", num_hashes, lo=0, owner=self)
        self.num_hashes = num_hashes or self.width  # 0: the encoding is as long as the hidden layers are wide
        self.batch_norm = check_bool("batch_norm", batch_norm, owner=self)
        seed = check_seed(seed, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        widths = [self.num_hashes] + [self.width] * self.depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        norms = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(self.depth))
        self.norms = norms if self.batch_norm else None
        self.out = nn.Linear(self.width, embedding_dim)
        self.register_buffer("field_keys", dhe_field_keys(seed, self.num_fields))
        self._init_parameters()

    # -------------------------------------------------------------------------------------- encoding & MLP
    def encode(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """The dense hash encoding ``FloatTensor[*ids.shape, k]`` of checked ids (``fields`` broadcast)."""
        seeds = dhe_seeds(self.field_keys, self.num_hashes)  # [F, k]: derived, never stored
        return dhe_encoding(ids, seeds[fields])

    def _layer(self, i: int, a: torch.Tensor, *, probe: bool = False) -> torch.Tensor:
        """Hidden layer ``i`` on ``[N, in]``; ``probe``: BN with batch statistics, its buffers untouched."""
        a = self.layers[i](a)
        if self.norms is not None:
            norm = self.norms[i]
            flat = a.reshape(-1, self.width)
            if flat.shape[0] > 0:  # an empty batch has no statistics, and nothing to normalise
                if probe:
                    flat = F.batch_norm(flat, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
                else:
                    flat = norm(flat)
            a = flat.view(a.shape)
        return F.mish(a)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        if self.norms is not None and self.training:  # BN's statistics are over the batch's lookups, repeats included
            return self._mlp(self.encode(ids, fields))
        return embed_unique(lambda i, f: self._mlp(self.encode(i, f)), ids, fields, self.embedding_dim)

    def _mlp(self, a: torch.Tensor) -> torch.Tensor:
        """Encodings ``[..., k]`` -> vectors ``[..., D]``."""
        shape = a.shape[:-1]
        a = a.reshape(-1, self.num_hashes)
        rows = a.shape[0]
        # CPU GEMM takes another code path for a few rows (under 4 with one thread, under 12 with two), whose
        # sums round differently: padding small batches keeps an id's vector the same alone or in a batch. Not
        # with BN in training, whose statistics zero rows would change (its outputs depend on the batch).
        pad = 0 if (self.norms is not None and self.training) else max(MIN_ROWS - rows, 0)
        if pad:
            a = torch.cat([a, a.new_zeros(pad, self.num_hashes)])
        for i in range(self.depth):
            a = self._layer(i, a)
        return self.out(a)[:rows].reshape(*shape, self.embedding_dim)

    @torch.no_grad()
    def _init_parameters(self) -> None:
        for layer in [*self.layers, self.out]:
            layer.weight.normal_(0.0, layer.in_features**-0.5)
            layer.bias.zero_()
        if self.out.weight.is_meta:  # sizes only (planned_bytes): nothing to measure
            return
        probe = torch.arange(PROBE_IDS, dtype=torch.int64, device=self.field_keys.device)
        a = self.encode(probe, probe % self.num_fields)
        for i, layer in enumerate(self.layers):  # LSUV: unit-RMS pre-activations over the probe
            layer.weight.mul_(1.0 / layer(a).pow(2).mean().sqrt().clamp_min(1e-12))
            a = self._layer(i, a, probe=True)
        y = self.out(a)  # [probe, D], bias 0: centre each coordinate, then scale the whole to init_std
        mean = y.mean(0)
        scale = self.init_std / (y - mean).pow(2).mean().sqrt().clamp_min(1e-30)
        self.out.weight.mul_(scale)
        self.out.bias.copy_(-mean * scale)

    # ------------------------------------------------------------------------------------------------ budget
    budget_keys = ("width",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        """The hidden width at the given depth (with ``num_hashes=0`` the encoding length follows it)."""
        return BudgetKnob("width", 1, None, lambda w: {"width": int(w)})

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, width={self.width}, depth={self.depth}, "
                f"num_hashes={self.num_hashes}, batch_norm={self.batch_norm}")
