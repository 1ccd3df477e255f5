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
