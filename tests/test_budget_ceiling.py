"""A budget above the full table's bytes buys at most the full table's bytes (issue 14, item 14)."""

import pytest

from embcompress import TABLES, BudgetError, list_tables
from embcompress.tables import FullEmbedding

CARDS, DIM = [1000, 50, 7], 8


@pytest.mark.parametrize("budget", [10**30, 2**63, 3.3], ids=["1e30", "2^63", "3.3x-full"])
@pytest.mark.parametrize("name", list_tables())
def test_an_enormous_budget_never_builds_a_table_larger_than_the_full_one(name, budget):
    full = FullEmbedding.planned_bytes(CARDS, DIM)
    budget = budget * full if isinstance(budget, float) else budget
    cls = TABLES.get(name)
    try:
        table = cls.from_budget(CARDS, DIM, budget_bytes=budget)
    except BudgetError as err:  # methods that cannot be built to a budget say so, nothing else
        assert "cannot" in str(err)
        return
    if cls.trains_in_stages:  # it meets its budget with the table it exports
        assert table.budget_bytes <= full
    else:
        assert table.memory_report().serving_bytes <= full  # budgets are on serving bytes
