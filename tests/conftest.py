import pytest
import torch

from embcompress import TABLES, list_tables
from embcompress.contract import BudgetError
from embcompress.memory import baseline_bytes

CARDS = [1000, 3, 57, 400]
DIM = 8


def make_table(name: str, cards=CARDS, dim: int = DIM, ratio: float = 4.0, **options):
    """Build any registered table the same way: to a budget when the method can, else as constructed."""
    cls = TABLES.get(name)
    try:
        table = cls.from_budget(cards, dim, budget_bytes=baseline_bytes(cards, dim) / ratio, **options)
    except BudgetError:
        table = cls(cards, dim, **options)
    # Tables that sample in training mode (OptEmbed's supernet draws a width per id, like dropout) are compared
    # across calls in eval mode, where the contract requires a deterministic output; gradients still flow.
    return table.eval() if cls.stochastic_training else table


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def assert_bytes(table, expected: int, *, parameters: int | None = None, buffers: int | None = None):
    """Check a table's ``memory_report()`` against a hand count, and against the tensors the module holds.

    ``expected`` is the total; ``parameters`` and ``buffers``, where given, the parameter and buffer bytes. Either
    way the report's parameter and buffer bytes must equal those of the module's parameters and buffers. A
    failure shows the report beside every tensor's name, dtype, shape and bytes. Returns the report.
    """
    report = table.memory_report()
    held_parameters = sum(_tensor_bytes(p) for p in table.parameters())
    held_buffers = sum(_tensor_bytes(b) for b in table.buffers())
    want = {
        "total": expected,
        "parameters": held_parameters if parameters is None else parameters,
        "buffers": held_buffers if buffers is None else buffers,
    }
    got = {"total": report.total_bytes, "parameters": report.parameter_bytes, "buffers": report.buffer_bytes}
    if got != want or (held_parameters, held_buffers) != (report.parameter_bytes, report.buffer_bytes):
        lines = [f"  {kind:<9} {name}: {t.dtype} {tuple(t.shape)} = {_tensor_bytes(t):,} bytes"
                 for kind, named in (("parameter", table.named_parameters()), ("buffer", table.named_buffers()))
                 for name, t in named]
        raise AssertionError(
            f"{type(table).__name__} bytes: report {got}, expected {want}; "
            f"the module holds {held_parameters:,} parameter + {held_buffers:,} buffer bytes:\n" + "\n".join(lines)
        )
    return report


@pytest.fixture(params=list_tables())
def table_name(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # The tests use tiny models, where a second intra-op thread costs more than it saves, and a one-thread
    # run cannot be slowed down by oversubscribing a shared machine.
    torch.set_num_threads(1)
