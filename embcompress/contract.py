"""The table contract every embcompress method implements.

A table is an ``nn.Module`` built from the cardinality of each categorical field and a common output width
``D``. It is two things at once, so that it drops into any model:

* a single table, like ``nn.Embedding``, when built with one int: ``LongTensor[...] -> FloatTensor[..., D]``;
* a feature collection, when built with one cardinality per field: ``LongTensor[..., F] -> FloatTensor[..., F, D]``
  (one id per field), and multi-hot bags through :meth:`CompressedEmbedding.forward_bags` /
  :meth:`CompressedEmbedding.forward_kjt` with sum or mean pooling.

Subclasses implement one method, ``embed(ids, fields)``, which maps ids and the field index of each id
(broadcastable to ``ids``) to vectors, take an ``init_std`` option (the per-coordinate std of the vectors they
return at initialisation, whatever their internals), and describe their one size knob in ``budget_knob`` so that
the shared solver (:mod:`embcompress.budget`) builds them to a budget. All fields go through one vectorised call, so no model loops over fields
in Python. Ids are checked before ``embed`` sees them: negative ids, ids at or above a bounded field's
cardinality, and non-integer dtypes raise ``ValueError`` naming the field and the value; nothing is clamped.
That holds on the CPU. On CUDA the value check is an asynchronous device-side assert (``torch._assert_async``),
because reading its verdict on the host would make every forward wait for the GPU: a bad id fails at the next
synchronising call ("device-side assert triggered", the table's message printed by the kernel) and leaves the
CUDA context unusable; on the meta device there are no values, so only shapes and dtypes are checked (see
:func:`id_check_mode`).

Options are checked with the typed validators of :mod:`embcompress.validate` (re-exported here): a bool is a
bool, an int an integral non-bool (numpy ints included), a number finite; nothing is coerced.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .budget import BudgetError, BudgetKnob, check_budget, solve_budget
from .config_state import FORMAT, check_saved_options, recording_init
from .fused import FusedLearningRate, FusedRows
from .memory import MemoryReport, baseline_bytes, full_table_bytes, measure, tensor_bytes
from .lowp import TRAINABLE_PRECISIONS, CapturesRowGradients, QuantizedRowOptimizer, TrainedRows
from .quantize import QuantizedRows, check_precision, fake_quantize_rows, quantized_bytes, row_bytes
from .specs import check_table_options
from .validate import (
    check_bool, check_choice, check_float, check_int, check_int_list, check_number, check_per_field,
    check_positive_int, check_positive_number, owner_name,
)

__all__ = [
    "CompressedEmbedding", "IdError", "BudgetError", "BudgetKnob", "POOLING_MODES", "as_cardinalities", "check_positive_int",
    "check_seed", "init_rows_", "resolve_init_std", "default_init_std", "id_check_mode",
    # the typed option validators (embcompress.validate), for tables and models alike
    "check_bool", "check_int", "check_number", "check_float", "check_positive_number", "check_choice",
    "check_int_list", "check_per_field",
]

POOLING_MODES = ("sum", "mean")


MAX_SEED = 2**31
_INT64_MAX = 2**63 - 1
#: Options added after checkpoints were first saved, with the value every table had before them.
LATE_OPTIONS = {"precision": "fp32", "train_quantized": False}


def check_seed(seed, *, owner=None) -> int:
    """A hash seed in ``[0, 2**31)`` (so derived per-field seeds stay inside int64)."""
    return check_int("seed", seed, lo=0, hi=MAX_SEED - 1, owner=owner)


def as_cardinalities(cardinalities: int | Sequence[int], *, owner=None) -> tuple[int, ...]:
    """One positive int, or one per field (numpy ints accepted), as a tuple of Python ints."""
    if isinstance(cardinalities, numbers.Integral) and not isinstance(cardinalities, bool):
        return (check_positive_int("cardinality", cardinalities, owner=owner),)
    if isinstance(cardinalities, (str, bytes)) or not isinstance(cardinalities, Sequence) or not cardinalities:
        prefix = owner_name(owner)
        raise ValueError(f"{prefix + ': ' if prefix else ''}cardinalities must be a positive int or a non-empty "
                         f"list of one positive int per field, got {cardinalities!r}")
    return tuple(check_positive_int(f"cardinality of field {i}", c, owner=owner)
                 for i, c in enumerate(cardinalities))


def id_check_mode(device: torch.device | str) -> str:
    """How tables check the values of ids (and bag lengths) on ``device``; shapes and dtypes are always checked.

    * ``"raise"`` (the CPU, and every device but CUDA and meta): a ``ValueError`` naming the field, the value and
      its position. Deciding costs one read of a flag on the host: free on the CPU, a wait for the device
      elsewhere.
    * ``"async"`` (CUDA): ``torch._assert_async``, a device-side assert queued with the forward, so no forward
      waits for the GPU. A bad id surfaces at the next synchronising call as CUDA's "device-side assert
      triggered" ``RuntimeError``, the kernel printing the table's message (not the field or value, which would
      need the sync), and like any device-side assert it leaves the CUDA context unusable: validate untrusted ids
      on the CPU first (rerunning a failing batch on the CPU names them).
    * ``"skip"`` (meta): there are no values; forward still builds the output's shape.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return "async"
    return "skip" if kind == "meta" else "raise"


class IdError(ValueError):
    """An id outside its table's domain: negative, or at or above a bounded field's cardinality."""


class CompressedEmbedding(nn.Module):
    """Base class of all tables: validation, field layout, bag pooling and memory reports.

    Args:
        cardinalities: one int (a single table) or one int per field (a feature collection). For hashing-based
            tables it is the vocabulary the baseline is measured against; they accept larger raw ids.
        embedding_dim: the output width ``D`` of every field.
    """

    registry_name: ClassVar[str]
    #: True when the method can take raw, unbounded non-negative ids in every field.
    accepts_raw_ids: ClassVar[bool] = False
    #: True when training-mode outputs are random (like dropout); eval-mode outputs are always deterministic.
    stochastic_training: ClassVar[bool] = False
    #: Constructor arguments that :meth:`from_budget` solves from the budget (a spec with a budget cannot set them).
    budget_keys: ClassVar[tuple[str, ...]] = ()
    #: True when the method trains in several stages through ``fit_staged(model, data, cfg)`` and meets its
    #: budget with the table it exports (OptEmbed), not with the table ``from_budget`` returns.
    trains_in_stages: ClassVar[bool] = False
    #: The typed staged-training settings of such a method (``from_dict(mapping, where)`` builds one from a suite's
    #: ``schedule:``), passed to ``fit_staged``; ``None`` for tables that train in one stage.
    schedule_type: ClassVar[type | None] = None
    #: Constructor options that do not change what a saved state means: a checkpoint loads whatever they were
    #: (see :mod:`embcompress.config_state`; every other option must match the checkpoint's). ``seed`` is one:
    #: the hash seeds it derives are buffers, and loading replaces them.
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "seed")
    #: Attributes holding the method's ``[rows, width]`` row tables, the ones a ``precision`` option stores in fewer
    #: bits (see :mod:`embcompress.quantize`); empty for methods without row tables (an MLP, tensor cores). A
    #: dotted name is an entry of a list (``weights.0``).
    row_parameters: ClassVar[tuple[str, ...]] = ()
    #: Precision the row tables are served at: ``fp32`` unless the method takes a ``precision`` option.
    precision: str = "fp32"
    #: True when the row tables are also held at ``precision`` while training (:mod:`embcompress.lowp`): set by
    #: the methods that take a ``train_quantized`` option.
    train_quantized: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = recording_init(cls.__dict__["__init__"])

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int) -> None:
        super().__init__()
        embedding_dim = check_positive_int("embedding_dim", embedding_dim, owner=self)
        self.single = isinstance(cardinalities, numbers.Integral)
        self.cardinalities = as_cardinalities(cardinalities, owner=self)
        self.embedding_dim = embedding_dim
        self.field_names: tuple[str, ...] = tuple(f"field{i}" for i in range(self.num_fields))
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bounded: dict[torch.device, bool] = {}

    # ----------------------------------------------------------------------------------------------- layout
    @property
    def num_fields(self) -> int:
        return len(self.cardinalities)

    def set_field_names(self, names: Sequence[str]) -> "CompressedEmbedding":
        """Name the fields (used in error messages and to match ``KeyedJaggedTensor`` keys)."""
        names = tuple(str(n) for n in names)
        if len(names) != self.num_fields:
            raise ValueError(f"got {len(names)} field names for {self.num_fields} fields")
        self.field_names = names
        return self

    def id_limits(self) -> Sequence[int]:
        """Exclusive upper bound of the ids of each field; -1 where any non-negative id is valid."""
        return (-1,) * self.num_fields if self.accepts_raw_ids else self.cardinalities

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Field positions and id limits, cached per device rather than registered as buffers: they are
        # configuration, not stored state, and must not change the memory report.
        if device not in self._device_cache:
            # On meta, limits are never read (no values to check), and id_limits may read buffers that hold none.
            limits = [-1] * self.num_fields if device.type == "meta" else list(self.id_limits())
            # The largest valid id of each field (int64's largest where any is): one comparison checks them all.
            highest = [n - 1 if n >= 0 else _INT64_MAX for n in limits]
            self._device_cache[device] = (
                torch.arange(self.num_fields, device=device),
                torch.tensor(highest, dtype=torch.int64, device=device),
            )
            self._bounded[device] = any(n >= 0 for n in limits)  # else only negative ids can be wrong
        return self._device_cache[device]

    def per_field(self, values: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``values[fields]`` for a ``[F, ...]`` per-field buffer; for the forward's own field positions (one id
        per field, in order) the buffer itself, which broadcasts the same and saves a gather per call."""
        if fields is self._device_cache.get(fields.device, (None,))[0] and values.shape[0] == self.num_fields:
            return values
        return values[fields]

    # ------------------------------------------------------------------------------------------- validation
    def _fail(self, msg: str, error: type[ValueError] = ValueError) -> ValueError:
        return error(f"{getattr(self, 'registry_name', type(self).__name__)}: {msg}")

    def _device_check_message(self, what: str) -> str:
        # Short: CUDA copies the message into the kernel and refuses one of 255 characters or more.
        return f"{owner_name(self)}: {what}; run the batch on the CPU for an error naming them"[:200]

    def _check_ids(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise self._fail(f"ids must be a torch.Tensor of int64, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise self._fail(f"ids must be int64 (or int32), got dtype {ids.dtype}")
        ids = ids.long()
        mode = id_check_mode(ids.device)
        if ids.numel() == 0 or mode == "skip":
            return ids
        _, highest = self._consts(ids.device)
        bad = ids < 0
        if self._bounded[ids.device]:
            bad |= ids > self.per_field(highest, fields)
        if mode == "async":
            # Checked on the device, with no host read (which would wait for the GPU every forward).
            torch._assert_async(~bad.any(), self._device_check_message(
                "ids outside their field's domain (negative, or at or above its cardinality)"))
            return ids
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            value = int(ids[pos])
            f = int(torch.broadcast_to(fields, ids.shape)[pos])
            where = f"field {self.field_names[f]!r} (index {f})" if not self.single else "the table"
            if value < 0:
                raise self._fail(f"{where} got id {value} at position {list(pos)}; ids must be non-negative", IdError)
            raise self._fail(
                f"{where} got id {value} at position {list(pos)}, outside its domain [0, {self.cardinalities[f]})",
                IdError,
            )
        return ids

    # ---------------------------------------------------------------------------------------------- forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Vectors of valid ``ids`` (any shape) whose field indices ``fields`` broadcast to ``ids.shape``.

        Returns ``FloatTensor[*ids.shape, D]``. Implemented by every method.
        """
        raise NotImplementedError

    def checked_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, fields)``: ``forward``'s input validated (shape, dtype, domain) and the field of each id."""
        if not isinstance(ids, torch.Tensor):
            raise self._fail(f"ids must be a torch.Tensor of int64, got {type(ids).__name__}")
        positions, _ = self._consts(ids.device)
        if self.single:
            fields = positions[:1].reshape(())
        else:
            if ids.dim() < 1 or ids.shape[-1] != self.num_fields:
                raise self._fail(
                    f"expected ids of shape [..., {self.num_fields}] (one id per field), got {list(ids.shape)}"
                )
            fields = positions
        return self._check_ids(ids, fields), fields

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``LongTensor[..., F] -> FloatTensor[..., F, D]`` (or ``[...] -> [..., D]`` for a single table)."""
        return self.embed(*self.checked_ids(ids))

    def forward_bags(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        *,
        mode: str = "sum",
        weights: torch.Tensor | None = None,
        bag_fields: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pool multi-hot bags: ``values`` ``LongTensor[N]`` with ``lengths`` ``LongTensor[F, B]`` -> ``[B, F, D]``.

        ``values`` are laid out field-major, like a ``KeyedJaggedTensor``: all bags of field 0 (samples 0..B-1),
        then field 1, and so on. Each id is embedded on its own and the vectors are then pooled (sum, or mean
        over the bag; empty bags give zeros), optionally weighted by ``weights`` ``FloatTensor[N]``.
        ``bag_fields`` ``LongTensor[K]`` lets ``K`` features read fields of this table (several features may
        share one): ``lengths`` is then ``[K, B]`` and the result ``[B, K, D]``.
        """
        if mode not in POOLING_MODES:
            raise self._fail(f"mode must be one of {POOLING_MODES}, got {mode!r}")
        rows = self.num_fields if bag_fields is None else bag_fields.numel()
        if lengths.dim() != 2 or lengths.shape[0] != rows:
            raise self._fail(f"lengths must have shape [{rows}, B], got {list(lengths.shape)}")
        lengths = lengths.long()
        check = id_check_mode(values.device)
        if check == "raise":
            if bool((lengths < 0).any()):
                raise self._fail("lengths must be non-negative")
            total = int(lengths.sum())
            if values.dim() != 1 or values.numel() != total:
                raise self._fail(f"values must be 1-D with sum(lengths) = {total} entries, got {list(values.shape)}")
        else:  # no host read of lengths (see id_check_mode): the bags must cover values exactly, checked on device
            if values.dim() != 1:
                raise self._fail(f"values must be 1-D, got shape {list(values.shape)}")
            total = values.numel()
            if check == "async":
                torch._assert_async((lengths >= 0).all() & (lengths.sum() == total), self._device_check_message(
                    f"bag lengths negative or not summing to the {total} values"))
        if weights is not None and weights.shape != values.shape:
            raise self._fail(f"weights must match values' shape {list(values.shape)}, got {list(weights.shape)}")
        num_fields, batch = lengths.shape
        positions, _ = self._consts(values.device)
        # output_size: the sizes are known, so repeat_interleave need not read lengths back from the device.
        bag = torch.repeat_interleave(torch.arange(num_fields * batch, device=values.device), lengths.reshape(-1),
                                      output_size=total)
        fields = (positions if bag_fields is None else bag_fields)[bag // batch] if batch else bag
        vectors = self.embed(self._check_ids(values, fields), fields)
        if weights is not None:
            vectors = vectors * weights.unsqueeze(-1).to(vectors.dtype)
        pooled = vectors.new_zeros(num_fields * batch, self.embedding_dim).index_add(0, bag, vectors)
        if mode == "mean":
            pooled = pooled / lengths.reshape(-1, 1).clamp(min=1).to(pooled.dtype)
        return pooled.view(num_fields, batch, self.embedding_dim).transpose(0, 1)

    def forward_kjt(self, features, *, mode: str = "sum") -> torch.Tensor:
        """Pool a torchrec ``KeyedJaggedTensor`` whose keys are this table's field names -> ``[B, F, D]``."""
        keys = tuple(features.keys())
        if keys != self.field_names:
            raise self._fail(f"KeyedJaggedTensor keys {list(keys)} do not match the field names {list(self.field_names)}")
        lengths = features.lengths().view(self.num_fields, -1)
        return self.forward_bags(features.values(), lengths, mode=mode, weights=features.weights_or_none())

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse tensors (they need SparseAdam or Adagrad); none by default."""
        return []

    def sgd_parameter_groups(self) -> list[dict]:
        """Optimizer groups (``{"params": [...], "lr": float}``) the training loop updates with plain SGD at their
        own learning rate instead of the model's optimizer; none by default."""
        return []

    def undecayed_parameters(self) -> list[nn.Parameter]:
        """Parameters the training loop never applies ``embedding_weight_decay`` to: learned thresholds and
        architecture weights, whose values decide what is kept (decay would pull them all one way); none by
        default."""
        return []

    def regularization_loss(self) -> torch.Tensor | None:
        """A term the training loop adds to the loss (a scalar tensor), or None; none by default."""
        return None

    # ------------------------------------------------------------------------------------- memory & budget
    def memory_report(self, optimizers: Sequence[torch.optim.Optimizer] = ()) -> MemoryReport:
        """Exact bytes of every parameter and buffer, against the fp32 baseline ``sum(n_f) * D * 4``; with the
        ``optimizers`` that train the table, the state they hold for it too (training bytes); serving bytes from
        :meth:`serving_bytes`."""
        return measure(self, baseline_bytes(self.cardinalities, self.embedding_dim), optimizers=optimizers,
                       serving=self.serving_bytes())

    def serving_bytes(self) -> int | None:
        """Bytes of the table this one exports to serve, when it is not itself (``None``: it serves as it is).

        With a ``precision`` other than fp32 the served table is :meth:`export`'s: the stored bytes with every
        fp32 row table counted at its precision. Staged methods override it: OptEmbed's supernet serves its
        compact export."""
        masters = [t for t in self._row_tables().values() if isinstance(t, (torch.Tensor, FusedRows))]
        fused = [t for t in masters if isinstance(t, FusedRows)]
        if self.precision == "fp32" and not fused or not masters:
            return None
        # A fused kernel's metadata is not served: its export holds the rows alone.
        stored = measure(self, 0).total_bytes - sum(tensor_bytes(b) for t in fused for b in t.stored_tensors()[1])
        return stored + sum(quantized_bytes(t.shape[0], t.shape[1], self.served_precision(t.shape[1]))
                            - t.shape[0] * t.shape[1] * 4 for t in masters)

    # ---------------------------------------------------------------------------------------- row precision
    def served_precision(self, width: int) -> str:
        """The precision a row table of ``width`` numbers is served at: the table's ``precision``, unless storing
        it so would not make it smaller (an int8 row of 1 number takes 1 code + 4 bytes of scale and offset,
        more than its 4 bytes of fp32): such a table stays fp32."""
        p = self.precision
        return p if p == "fp32" or row_bytes(width, p) < row_bytes(width, "fp32") else "fp32"

    def _row_tables(self) -> dict:
        """``{attribute: table}`` of the row tables this table holds (an absent optional one left out)."""
        return {name: t for name in self.row_parameters if (t := getattr(*_holder(self, name))) is not None}

    def _after_init(self) -> None:
        """With ``train_quantized``, replace each fp32 row table by :class:`~embcompress.lowp.TrainedRows` at the
        table's precision (one that :meth:`served_precision` keeps fp32, being too narrow, stays a parameter);
        with ``fused_optimizer``, by :class:`~embcompress.fused.FusedRows` (fbgemm's kernel, the update fused into
        backward)."""
        fused = getattr(self, "fused_optimizer", None)
        if fused is not None:
            if self.train_quantized:
                raise self._fail(f"fused_optimizer={fused!r} trains fp32 rows in fbgemm's kernel; train_quantized "
                                 "holds them at low precision with its own optimizer: choose one")
            for name, table in self._row_tables().items():
                # fbgemm's kernel takes widths that are multiples of 4: a narrower table (hash embedding's
                # importance weights, mixed dimension's 1- and 2-wide rows) stays an autograd parameter.
                if isinstance(table, nn.Parameter) and table.shape[1] % 4 == 0:
                    parent, leaf = _holder(self, name)
                    del parent._parameters[leaf]
                    setattr(parent, leaf, FusedRows(table.detach(), optimizer=fused))
            return
        if not self.train_quantized:
            return
        if self.precision not in TRAINABLE_PRECISIONS:
            raise self._fail(f"train_quantized=True holds the rows at an integer precision while they train "
                             f"({' or '.join(TRAINABLE_PRECISIONS)}), got precision={self.precision!r}")
        for name, table in self._row_tables().items():
            if isinstance(table, nn.Parameter) and self.served_precision(table.shape[1]) != "fp32":
                parent, leaf = _holder(self, name)
                del parent._parameters[leaf]
                setattr(parent, leaf, TrainedRows(table.detach(), self.precision))

    def trains_rows_itself(self) -> bool:
        """True when rows of this table train outside autograd's parameters (``train_quantized``, ALPT): its
        :meth:`row_optimizers` update them, in one process."""
        return any(isinstance(m, (CapturesRowGradients, FusedRows)) for m in self.modules())

    def row_optimizers(self, lr: float, *, seed: int = 0) -> list[torch.optim.Optimizer]:
        """Optimizers the table brings, which the training loop steps after the model's: those of the rows it
        trains itself (``train_quantized``: a :class:`~embcompress.lowp.QuantizedRowOptimizer` at ``lr``; ALPT's),
        and per-step work that must follow an update (DeepLight's pruning ramp, AutoDim's temperature); none by
        default. A custom training loop steps them too."""
        tables = self._row_tables().values()
        stores = [t for t in tables if isinstance(t, TrainedRows)]
        fused = [t for t in tables if isinstance(t, FusedRows)]
        return ([QuantizedRowOptimizer(stores, lr=lr, seed=seed)] if stores else []) + \
            ([FusedLearningRate(fused, lr=lr)] if fused else [])

    def kernel_rows(self, table) -> FusedRows | None:
        """``table`` when it is fused rows whose kernel may also pool them (sum or weigh several rows of an id in
        one call): rows served at fp32, with no per-row rounding to apply first; else None."""
        if isinstance(table, FusedRows) and self.served_precision(table.width) == "fp32":
            return table
        return None

    def read_rows(self, table: "torch.Tensor | QuantizedRows", rows: torch.Tensor) -> torch.Tensor:
        """Rows ``[*rows.shape, width]`` of one of :attr:`row_parameters`, as the method's ``embed`` reads them.

        fp32 masters are gathered (sparse gradients with ``sparse=True``); in eval mode they are returned at the
        table's ``precision`` (the values its export serves, see :mod:`embcompress.quantize`), in training mode
        as they are (fp32 training, low-precision serving). An export's :class:`QuantizedRows` dequantize.
        """
        if isinstance(table, QuantizedRows):
            return table.lookup(rows)
        if isinstance(table, FusedRows):
            out = table.lookup(rows)
        elif table.device.type == "cpu" and not getattr(self, "sparse", False):
            # A dense gradient: index_select's backward (one index_add into zeros) is 2-3x faster on the CPU
            # than embedding's sort-based dense backward; the same sums, accumulated in batch order.
            out = table.index_select(0, rows.reshape(-1)).view(*rows.shape, table.shape[1])
        else:
            out = F.embedding(rows, table, sparse=getattr(self, "sparse", False))
        if self.precision != "fp32" and not self.training:
            out = fake_quantize_rows(out, self.served_precision(table.shape[1]))
        return out

    def export(self, precision: str | None = None) -> "CompressedEmbedding":
        """A frozen copy that serves the row tables at ``precision`` (default: the table's own), stored as
        :class:`QuantizedRows` buffers; its outputs equal this table's eval-mode outputs at that precision.

        A method without row tables exports a frozen fp32 copy; methods whose export is their own (staged ones,
        codebooks) override it.
        """
        precision = self.precision if precision is None else check_precision(precision, owner=self._owner_name())
        if not self.row_parameters and precision != "fp32":
            raise ValueError(f"{self._owner_name()}: has no row tables to store at precision={precision!r}; "
                             "it exports at fp32 only")
        masters = self._row_tables()
        # The fp32 masters are not copied (the memo maps them to None): only their quantized form is kept.
        served = copy.deepcopy(self, memo={id(t): None for t in masters.values()})
        served.precision = precision
        for name, table in masters.items():
            parent, leaf = _holder(served, name)
            parent._parameters.pop(leaf, None)
            parent._modules.pop(leaf, None)
            at = served.served_precision(table.shape[1])
            if isinstance(table, QuantizedRows) and table.precision == at:  # its codes, as they are
                setattr(parent, leaf, QuantizedRows.from_stored(
                    tuple(getattr(table, n).detach().clone() for n in table._names), at, table.width))
                continue
            if isinstance(table, QuantizedRows):  # another precision: from the values it serves
                table = table.dequantized()
            if isinstance(table, FusedRows):  # plain rows out of the kernel: fp32 ones serve as a parameter does
                rows = table.weight.detach().clone()
                setattr(parent, leaf, nn.Parameter(rows, requires_grad=False) if at == "fp32" else
                        QuantizedRows(rows, at))
                continue
            setattr(parent, leaf, QuantizedRows(table.detach(), at))
        for p in served.parameters():
            p.requires_grad_(False)
        if "precision" in served._saved_options:
            served._saved_options = {**served._saved_options, "precision": precision}
        if "fused_optimizer" in served._saved_options:  # frozen plain rows, served by any backend
            served._saved_options = {**served._saved_options, "fused_optimizer": None}
            served.fused_optimizer = None
        if "train_quantized" in served._saved_options:  # the export is frozen: its rows no longer train
            served._saved_options = {**served._saved_options, "train_quantized": False}
            served.train_quantized = False
        return served.eval()

    @classmethod
    def budget_knob(cls, cardinalities: int | Sequence[int], embedding_dim: int, **options) -> BudgetKnob:
        """How this method's bytes follow one number (see :mod:`embcompress.budget`); methods that cannot be
        built to a budget raise :class:`BudgetError`."""
        raise BudgetError(f"{getattr(cls, 'registry_name', cls.__name__)} cannot be built to a memory budget")

    @classmethod
    def from_budget(cls, cardinalities: int | Sequence[int], embedding_dim: int, *, budget_bytes: int, **options):
        """The largest table this method builds with at most ``budget_bytes`` bytes (the shared solver).

        ``options`` are constructor arguments other than the ones the budget decides (:attr:`budget_keys`).
        Raises :class:`BudgetError` only when not even the smallest table fits, naming the smallest reachable
        budget. A budget above :meth:`budget_ceiling` (the full table's bytes) buys the largest table within the
        ceiling: a compressed table is never larger than the table it replaces.
        """
        check_table_options(cls, {**options, "budget_bytes": budget_bytes},
                            f"{getattr(cls, 'registry_name', cls.__name__)}.from_budget")
        ceiling = cls.budget_ceiling(cardinalities, embedding_dim)
        if ceiling is None or check_budget(budget_bytes) <= ceiling:
            return solve_budget(cls, cardinalities, embedding_dim, budget_bytes, options)
        try:
            return solve_budget(cls, cardinalities, embedding_dim, ceiling, options)
        except BudgetError as err:
            raise BudgetError(f"{err} (a budget of {budget_bytes:,} bytes is above the full table's {ceiling:,} "
                              "bytes, and a compressed table may not be larger than the full one)") from None

    @classmethod
    def budget_ceiling(cls, cardinalities: int | Sequence[int], embedding_dim: int) -> int | None:
        """The most bytes a budget can buy: the exact bytes of the full table (``None``: no ceiling)."""
        return full_table_bytes(cardinalities, embedding_dim)

    @classmethod
    def planned_bytes(cls, cardinalities: int | Sequence[int], embedding_dim: int, **options) -> int:
        """Exact bytes a table built with these arguments would serve, measured on the ``meta`` device: budgets
        are on serving bytes (what it stores, unless it serves an export, e.g. at a lower ``precision``)."""
        with torch.device("meta"):
            return cls(cardinalities, embedding_dim, **options).memory_report().serving_bytes

    @staticmethod
    def _check_budget(budget_bytes: int | float) -> int:
        return check_budget(budget_bytes)

    # ------------------------------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict:
        """The options this table was built with (plain values), saved in its state_dict."""
        return {"format": FORMAT, "table": self._owner_name(), "options": dict(self._saved_options)}

    def set_extra_state(self, state: dict) -> None:
        """Refuse a checkpoint of a table built with other options (naming the first that differs)."""
        check_saved_options(self._owner_name(), state, self._saved_options, self.checkpoint_ignores, LATE_OPTIONS)

    def _owner_name(self) -> str:
        return getattr(self, "registry_name", type(self).__name__)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:  # checked before any tensor is copied: a refused checkpoint leaves the table as it was
            self.set_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in missing_keys:  # a checkpoint from before tables saved their options: still loads, unchecked
            missing_keys.remove(key)
            warnings.warn(f"{self._owner_name()}: the checkpoint has no saved table options (saved by an older "
                          "embcompress); loaded without checking that they match", stacklevel=2)
        self._device_cache.clear()  # the id limits may follow loaded buffers
        self.loaded_state_()

    def loaded_state_(self) -> None:
        """Recompute what is derived from buffers after a load (tables with such Python-side flags override)."""

    def extra_repr(self) -> str:
        n = self.cardinalities[0] if self.single else list(self.cardinalities)
        return f"cardinalities={n}, embedding_dim={self.embedding_dim}"


def _holder(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the row table ``name`` and its attribute there: ``weights.2`` is entry 2 of the
    ``weights`` list (mixed dimension's tables of each width)."""
    parent, _, leaf = name.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def default_init_std(embedding_dim: int) -> float:
    """The library's default ``init_std``: ``1 / sqrt(D)``, a unit-norm row in expectation."""
    return embedding_dim**-0.5


def resolve_init_std(init_std: float | None, embedding_dim: int, *, owner=None) -> float:
    """``init_std`` checked (a positive finite number: the std of the returned vectors), or the library default
    ``1/sqrt(D)`` for ``None``."""
    if init_std is None:
        return default_init_std(embedding_dim)
    return check_number("init_std", init_std, positive=True, optional=True, owner=owner)


def init_rows_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """Fill embedding rows with ``N(0, std**2)`` in place (on the ``meta`` device: nothing to fill)."""
    with torch.no_grad():
        return weight.normal_(0.0, std)
