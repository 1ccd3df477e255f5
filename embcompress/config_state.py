"""A table's construction options in its state_dict, so that a checkpoint loads only into the table it fits.

Two tables whose tensors have the same shapes can still disagree on what each row means: another field order
(``full.v1`` over ``[10, 20]`` and over ``[20, 10]``), another hash rule (``hash_small_fields``), QR's ``mult``
against ``add``. ``load_state_dict`` would accept the tensors and the model would quietly return other vectors,
or crash on its first forward. Every table therefore saves the options it was built with in the
``_extra_state`` entry of its state_dict (plain Python values, so ``torch.load(weights_only=True)`` reads them)
and refuses a checkpoint built otherwise, naming the option. Options that only shape training (``init_std``,
``sparse``) or whose effect is itself saved (``seed``: the derived hash seeds are buffers) are saved but not
compared (:attr:`~embcompress.contract.CompressedEmbedding.checkpoint_ignores`). Options are compared as
given, apart from the sizes (``cardinalities``, ``embedding_dim``, resolved): ``num_buckets=100`` and
``[100, 100]`` are two spellings, and a table is loaded by building it as the checkpoint's was (a table built
to a budget gets the same solved options from the same budget). The check runs before any tensor is copied,
so a refused checkpoint leaves the table as it was.

>>> import torch
>>> from embcompress.tables.qr import QREmbedding
>>> saved = QREmbedding([100, 200], 8, operation="mult").state_dict()
>>> QREmbedding([100, 200], 8, operation="add").load_state_dict(saved)
Traceback (most recent call last):
...
ValueError: qr.v1: the checkpoint was saved from a table built with operation='mult'; this table has operation='add' (build the table with the checkpoint's options to load it)
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Mapping

__all__ = ["recording_init", "plain", "check_saved_options", "FORMAT"]

FORMAT = 1  # version of the saved layout: {"format", "table", "options"}


class _Unsaved(Exception):
    """An option with no plain-value form (a module, a tensor of ranks): its content is in the tensors."""


def plain(value: Any) -> Any:
    """``value`` as bool / int / float / str / None / list / dict, or ``_Unsaved``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy scalars and 0-d arrays
        value = value.item()
        if isinstance(value, bool):
            return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    raise _Unsaved


@functools.lru_cache(maxsize=None)
def _signature(init: Callable) -> inspect.Signature:
    return inspect.signature(init)


def recording_init(init: Callable) -> Callable:
    """Wrap a table class's ``__init__`` so the instance keeps the options it was built with.

    Only the constructor of the instance's own class records (a subclass calling ``super().__init__`` with
    other arguments keeps its own options).
    """

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is not wrapped:
            return
        bound = _signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        options = {}
        for name, value in list(bound.arguments.items())[1:]:
            try:
                options[name] = plain(value)
            except _Unsaved:
                continue
        # The resolved sizes, not the spelling they were given in (a numpy array, a tuple).
        options["cardinalities"] = self.cardinalities[0] if self.single else list(self.cardinalities)
        options["embedding_dim"] = self.embedding_dim
        self._saved_options = options
        after = getattr(self, "_after_init", None)
        if after is not None:  # work the base class does once the whole table is built
            after()

    return wrapped


def check_saved_options(owner: str, state: Any, own: Mapping[str, Any], ignore: tuple[str, ...],
                        late: Mapping[str, Any] | None = None) -> None:
    """Raise ``ValueError`` naming the first option in which a saved ``state`` differs from ``own``.

    ``late``: options added after checkpoints were first saved, with the value every table had before (a
    checkpoint without the option was built with it), so older checkpoints keep loading."""
    late = late or {}
    if not isinstance(state, Mapping) or not isinstance(state.get("options"), Mapping):
        raise ValueError(f"{owner}: the checkpoint's _extra_state is {state!r}, expected the saved table options")
    if state.get("table") != owner:
        raise ValueError(f"{owner}: the checkpoint was saved from a {state.get('table')!r} table")
    saved = {**{k: v for k, v in late.items() if k in own}, **state["options"]}
    for name in sorted(set(saved) | set(own)):
        if name in ignore or saved.get(name) == own.get(name):
            continue
        was = f"{name}={saved[name]!r}" if name in saved else f"no option {name!r}"
        has = f"{name}={own[name]!r}" if name in own else f"no option {name!r}"
        raise ValueError(f"{owner}: the checkpoint was saved from a table built with {was}; this table has {has} "
                         "(build the table with the checkpoint's options to load it)")
