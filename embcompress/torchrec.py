"""TorchRec interoperability: any embcompress table as a torchrec ``EmbeddingBagCollection``.

:class:`CompressedEmbeddingBagCollection` implements torchrec's ``EmbeddingBagCollectionInterface``
(``forward(KeyedJaggedTensor) -> KeyedTensor``, ``embedding_bag_configs()``, ``is_weighted()``), so it drops
into ``torchrec.models.dlrm.DLRM`` / ``DLRM_DCN`` and any other model written against that interface, while the
vectors come from one compressed table (``{"type": "qr.v1", ...}``, optionally built to a memory budget).
:func:`to_torchrec_batch` turns a batch of this project's data (one id per field) into torchrec's ``Batch``
(dense features, ``KeyedJaggedTensor``, labels), so torchrec's own training step (``DLRMTrain``) runs on the
synthetic and Criteo data sets of :mod:`embcompress.data`.

Mapping of torchrec's concepts onto the table contract (:mod:`embcompress.contract`):

* each ``EmbeddingBagConfig`` is one *field* of the compressed table, with ``num_embeddings`` as its
  cardinality; a config listing several ``feature_names`` shares that field between the features, as in torchrec;
* every config must have the same ``embedding_dim``: it is the table's common ``D`` and the width reported for
  every feature in the output ``KeyedTensor`` (``length_per_key == [D] * num_features``), whatever the method
  stores inside (mixed-dimension blocks project up to ``D``);
* pooling follows each config's ``pooling`` (``PoolingType.SUM`` or ``PoolingType.MEAN``; empty bags pool to
  zeros); per-id weights (``KeyedJaggedTensor.weights()``) are used when the collection is built with
  ``is_weighted=True``, exactly like torchrec's ``EmbeddingBagCollection``.

Sources: TorchRec documentation, "torchrec.modules" (``EmbeddingBagCollection``,
``EmbeddingBagCollectionInterface``, ``EmbeddingBagConfig``, ``PoolingType``), "torchrec.sparse"
(``KeyedJaggedTensor``, ``KeyedTensor``) and "torchrec.models" (``DLRM``, ``DLRM_DCN``, ``DLRMTrain``),
https://pytorch.org/torchrec/ ; the layouts were read from torchrec 1.8.0 as installed here.

>>> import torch
>>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
>>> configs = [EmbeddingBagConfig(name="t0", num_embeddings=10_000, embedding_dim=4, feature_names=["f0"]),
...            EmbeddingBagConfig(name="t1", num_embeddings=5_000, embedding_dim=4, feature_names=["f1"])]
>>> ebc = CompressedEmbeddingBagCollection(configs, {"type": "qr.v1"}, budget_bytes=24_000)  # 10x smaller
>>> ebc.embeddings.memory_report().total_bytes <= 24_000
True
>>> kjt = KeyedJaggedTensor.from_lengths_sync(  # batch of 2: f0 bags [3, 7], [] ; f1 bags [1], [4, 4, 9]
...     keys=["f0", "f1"], values=torch.tensor([3, 7, 1, 4, 4, 9]), lengths=torch.tensor([2, 0, 1, 3]))
>>> out = ebc(kjt)
>>> out.keys(), out.length_per_key(), out.values().shape
(['f0', 'f1'], [4, 4], torch.Size([2, 8]))
>>> out["f0"][1].abs().sum().item()  # an empty bag pools to zeros
0.0
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchrec
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType
from torchrec.datasets.utils import Batch as TorchrecBatch
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from .contract import CompressedEmbedding
from .quantize import QuantizedRows
from .data import Batch
from .registry import build_table

__all__ = ["TORCHREC_VERSION", "CompressedEmbeddingBagCollection", "configs_for", "ids_to_kjt", "to_torchrec_batch",
           "QuantizedCollection", "quantized_collection"]

TORCHREC_VERSION = getattr(torchrec, "__version__", "unknown")
_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def configs_for(
    cardinalities: Sequence[int], embedding_dim: int, field_names: Sequence[str], *,
    pooling: PoolingType = PoolingType.SUM,
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per field (table ``t_<name>`` with feature ``<name>``), for a project data set.

    >>> [(c.name, c.num_embeddings, c.feature_names) for c in configs_for([10, 3], 4, ["C1", "C2"])]
    [('t_C1', 10, ['C1']), ('t_C2', 3, ['C2'])]
    """
    if len(cardinalities) != len(field_names):
        raise ValueError(f"got {len(cardinalities)} cardinalities for {len(field_names)} field names")
    return [
        EmbeddingBagConfig(name=f"t_{name}", num_embeddings=int(n), embedding_dim=embedding_dim,
                           feature_names=[str(name)], pooling=pooling)
        for n, name in zip(cardinalities, field_names)
    ]


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A torchrec embedding-bag collection whose tables are one embcompress table, one field per config.

    Shapes: a ``KeyedJaggedTensor`` with keys containing every feature name (any order; extra keys are
    ignored, as torchrec does), stride ``B``, ``values`` ``LongTensor[N]`` (int32 or int64), optional
    ``weights`` ``FloatTensor[N]`` -> ``KeyedTensor`` with ``keys() == feature_names``, ``values()``
    ``FloatTensor[B, num_features * D]`` and ``length_per_key() == [D] * num_features``.

    Args:
        tables: torchrec ``EmbeddingBagConfig`` list; all with the same ``embedding_dim`` and pooling SUM or MEAN.
        method: a table spec (``{"type": "qr.v1", ...options}``) or just a registry name (``"qr.v1"``).
        budget_bytes: build the table with the method's ``from_budget`` to at most this many bytes (default:
            build it with the spec's options; a ``budget_bytes`` key in ``method`` works as well).
        is_weighted: use the ``KeyedJaggedTensor``'s per-id weights (they are then required).
        device: where to build the table (``"meta"`` works for planning).

    >>> import torch
    >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
    >>> configs = [EmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=2, feature_names=["a", "b"],
    ...                               pooling=PoolingType.MEAN)]
    >>> ebc = CompressedEmbeddingBagCollection(configs, "full.v1", is_weighted=True)
    >>> ebc.feature_names, ebc.embeddings.num_fields  # two features share the config's one field
    (['a', 'b'], 1)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2, 1]),
    ...     lengths=torch.tensor([2, 1]), weights=torch.tensor([1.0, 3.0, 2.0]))
    >>> out = ebc(kjt)
    >>> w = ebc.embeddings.weight
    >>> torch.allclose(out["a"][0], (w[1] + 3 * w[2]) / 2) and torch.allclose(out["b"][0], 2 * w[1])
    True
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        method: Mapping[str, Any] | str,
        *,
        budget_bytes: float | None = None,
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        tables = list(tables)
        if not tables:
            raise ValueError("tables is empty: expected at least one EmbeddingBagConfig")
        for i, config in enumerate(tables):
            if not isinstance(config, EmbeddingBagConfig):
                raise TypeError(f"tables[{i}] must be a torchrec EmbeddingBagConfig, got {type(config).__name__}")
            if not config.feature_names:
                raise ValueError(f"tables[{i}] ({config.name!r}) has no feature_names")
            if config.pooling not in _MODES:
                raise ValueError(f"tables[{i}] ({config.name!r}) has pooling {config.pooling}; "
                                 f"supported: {[p.name for p in _MODES]}")
            if config.embedding_dim != tables[0].embedding_dim:
                raise ValueError(
                    f"tables[{i}] ({config.name!r}) has embedding_dim {config.embedding_dim}, but tables[0] "
                    f"({tables[0].name!r}) has {tables[0].embedding_dim}: a compressed collection has one common D"
                )
        names = [f for config in tables for f in config.feature_names]
        duplicates = sorted({f for f in names if names.count(f) > 1})
        if duplicates:
            raise ValueError(f"feature names {duplicates} appear more than once; each feature must map to one table")
        if not isinstance(is_weighted, bool):
            raise TypeError(f"is_weighted must be a bool, got {is_weighted!r}")
        spec = {"type": method} if isinstance(method, str) else dict(method) if isinstance(method, Mapping) else None
        if spec is None:
            raise ValueError(f"method must be a table spec mapping or a registry name, got {method!r}")
        if budget_bytes is not None:
            if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real) or budget_bytes <= 0:
                raise ValueError(f"budget_bytes must be a positive number, got {budget_bytes!r}")
            if "budget_bytes" in spec:
                raise ValueError(f"budget_bytes given twice: {budget_bytes!r} and in the spec {spec['budget_bytes']!r}")
            spec["budget_bytes"] = budget_bytes
        self._configs = tables
        self._is_weighted = is_weighted
        self._feature_names = names
        self._modes = [_MODES[config.pooling] for config in tables for _ in config.feature_names]
        # Field (= config) index of every feature; identity when every config has exactly one feature.
        fields = [i for i, config in enumerate(tables) for _ in config.feature_names]
        self._identity = fields == list(range(len(tables)))
        self.register_buffer("_feature_field", torch.tensor(fields, dtype=torch.int64, device=device),
                             persistent=False)
        means = [m == "mean" for m in self._modes]
        self._uniform_mode = self._modes[0] if len(set(self._modes)) == 1 else None
        self.register_buffer("_mean_mask", torch.tensor(means, device=device), persistent=False)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embeddings: CompressedEmbedding = build_table(
                spec, [config.num_embeddings for config in tables], tables[0].embedding_dim,
                field_names=[config.name for config in tables],
            )

    # ------------------------------------------------------------------------------ torchrec's interface
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def feature_names(self) -> list[str]:
        return list(self._feature_names)

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.embedding_dim

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pool ``features`` into one ``[B, D]`` block per feature, returned as a ``KeyedTensor``."""
        pooled = self.pooled(features)
        batch, num_features, dim = pooled.shape
        return KeyedTensor(keys=self.feature_names, length_per_key=[dim] * num_features,
                           values=pooled.reshape(batch, num_features * dim), key_dim=1)

    def pooled(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The pooled vectors as ``FloatTensor[B, num_features, D]`` (features in ``feature_names`` order)."""
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"features must be a torchrec KeyedJaggedTensor, got {type(features).__name__}")
        keys = features.keys()
        if keys != self._feature_names:
            index = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self._feature_names if f not in index]
            if missing:
                raise ValueError(f"KeyedJaggedTensor has no feature(s) {missing}; it has keys {keys}")
            features = features.permute([index[f] for f in self._feature_names])
        if features.variable_stride_per_key():
            raise ValueError("KeyedJaggedTensors with a variable batch size per feature are not supported")
        weights = None
        if self._is_weighted:
            weights = features.weights_or_none()
            if weights is None:
                raise ValueError("this collection is weighted (is_weighted=True) but the KeyedJaggedTensor has "
                                 "no weights")
        values, lengths = features.values(), features.lengths().view(len(self._feature_names), -1)
        table = self.embeddings
        if self._identity and self._uniform_mode is not None:  # the common case: the table's own pooling
            return table.forward_bags(values, lengths, mode=self._uniform_mode, weights=weights)
        # Several features may read one field: each bag is embedded with its feature's field.
        pooled = table.forward_bags(values, lengths, mode="sum", weights=weights,
                                    bag_fields=None if self._identity else self._feature_field)
        # Mixed pooling: mean features divide their sums by the bag sizes, as forward_bags(mode="mean") does.
        scale = torch.where(self._mean_mask.unsqueeze(1), lengths.clamp(min=1), torch.ones_like(lengths))
        return pooled / scale.t().unsqueeze(-1).to(pooled.dtype)

    def extra_repr(self) -> str:
        return f"method={getattr(self.embeddings, 'registry_name', '?')}, features={self._feature_names}"


def ids_to_kjt(ids: torch.Tensor, keys: Sequence[str], *, weights: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """One id per field, ``LongTensor[B, F]``, as a ``KeyedJaggedTensor`` with ``F`` keys and bags of length 1.

    >>> ids_to_kjt(torch.tensor([[1, 5], [2, 6]]), ["a", "b"]).to_dict()["b"].values()
    tensor([5, 6])
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a 2-D LongTensor [B, F], got {getattr(ids, 'shape', type(ids).__name__)}")
    keys = [str(k) for k in keys]
    if ids.shape[1] != len(keys):
        raise ValueError(f"ids have {ids.shape[1]} fields but {len(keys)} keys were given")
    lengths = torch.ones(ids.numel(), dtype=torch.int32, device=ids.device)
    w = None if weights is None else weights.t().reshape(-1)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids.t().reshape(-1), lengths=lengths, weights=w)


def to_torchrec_batch(batch: Batch, keys: Sequence[str]) -> TorchrecBatch:
    """A project :class:`~embcompress.data.Batch` as torchrec's ``Batch(dense_features, sparse_features, labels)``.

    ``dense`` ``FloatTensor[B, n_dense]`` and ``labels`` ``FloatTensor[B]`` pass through; ``sparse``
    ``LongTensor[B, F]`` becomes a ``KeyedJaggedTensor`` keyed by ``keys`` (the data set's field names) with one
    id per bag. torchrec's ``DLRMTrain`` takes the result as is.

    >>> import torch
    >>> from embcompress.data import Batch
    >>> b = to_torchrec_batch(Batch(torch.rand(3, 2), torch.tensor([[0, 1]] * 3), torch.ones(3)), ["C1", "C2"])
    >>> b.dense_features.shape, b.sparse_features.keys(), b.sparse_features.stride(), b.labels.shape
    (torch.Size([3, 2]), ['C1', 'C2'], 3, torch.Size([3]))
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"batch must be an embcompress.data.Batch, got {type(batch).__name__}")
    return TorchrecBatch(dense_features=batch.dense, sparse_features=ids_to_kjt(batch.sparse, keys),
                         labels=batch.labels)


_QUANT_DTYPES = {"fp16": torch.half, "int8": torch.qint8, "int4": torch.quint4x2}


class QuantizedCollection(torch.nn.Module):
    """torchrec's quantized ``EmbeddingBagCollection`` (fbgemm's n-bit inference kernels) serving the rows of a
    ``full.v1`` table: ``forward(KeyedJaggedTensor) -> KeyedTensor``, with :meth:`stored_bytes` counting what the
    kernels hold (``weights_host``, rows padded to ``row_alignment`` bytes). Built by :func:`quantized_collection`.
    """

    def __init__(self, ebc: torch.nn.Module, precision: str, row_alignment: int) -> None:
        super().__init__()
        self.ebc, self.precision, self.row_alignment = ebc, precision, row_alignment

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(features)

    def stored_bytes(self) -> int:
        """Bytes of every kernel's weight storage (codes, fp16 scale and bias, row padding)."""
        return sum(m.weights_host.numel() * m.weights_host.element_size() for m in self.ebc._emb_modules)


def quantized_collection(table: CompressedEmbedding, precision: str, *, row_alignment: int = 16
                         ) -> QuantizedCollection:
    """The rows of a ``full.v1`` ``table`` served by torchrec's quantized collection at ``precision`` (fp16, int8,
    int4): one torchrec table per field, named as :func:`configs_for` names them, sum pooling.

    ``quantize_embeddings`` only converts an ``EmbeddingBagCollection`` held by a parent module (a bare one is
    returned unchanged), so the collection is wrapped before it is quantized. ``row_alignment`` is the bytes each
    stored row is padded to (torchrec's default 16: an int8 row of D=16, 20 bytes of codes, scale and bias, takes
    32; 4 keeps it at 20).
    """
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    if getattr(table, "registry_name", "") != "full.v1":
        raise ValueError(f"quantized_collection serves full.v1 tables, got {getattr(table, 'registry_name', table)!r}")
    if precision not in _QUANT_DTYPES:
        raise ValueError(f"quantized_collection: precision must be one of {list(_QUANT_DTYPES)}, got {precision!r}")
    configs = configs_for(table.cardinalities, table.embedding_dim, table.field_names)
    ebc = torchrec.EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    # Rows held quantized (train_quantized, an export) are read as the values they hold.
    weight = table.weight.dequantized() if isinstance(table.weight, QuantizedRows) else table.weight
    with torch.no_grad():
        for f, config in enumerate(configs):
            start = int(table.offsets[f])
            rows = weight[start:start + table.cardinalities[f]].detach().float().cpu()
            ebc.embedding_bags[config.name].weight.copy_(rows)

    class _Parent(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.ebc = inner

    parent = _Parent(ebc)
    quant_prep_customize_row_alignment(parent, [torchrec.EmbeddingBagCollection], row_alignment)
    quantize_embeddings(parent, dtype=_QUANT_DTYPES[precision], inplace=True)
    return QuantizedCollection(parent.ebc, precision, row_alignment)
