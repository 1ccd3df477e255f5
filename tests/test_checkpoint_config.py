"""A checkpoint loads only into a table built with the same options (issue 14, item 13)."""

import io
import warnings

import pytest
import torch

from embcompress import list_tables
from embcompress.tables import FullEmbedding, HashingEmbedding, QREmbedding, UnifiedEmbedding
from embcompress.tables.optembed import OptEmbedExport

from .conftest import make_table


def reloaded(state: dict) -> dict:
    """``state`` through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint file would be."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "saved, other, option",
    [
        # same shapes, another hash rule for the small field
        (lambda: HashingEmbedding([100, 5], 4, num_buckets=8), lambda: HashingEmbedding(
            [100, 5], 4, num_buckets=8, hash_small_fields=True), "hash_small_fields"),
        (lambda: QREmbedding([100, 200], 4, operation="mult", threshold=10),
         lambda: QREmbedding([100, 200], 4, operation="add", threshold=10), "operation"),
        # the same 30 rows, another field order: every row of field 0 would be read as field 1's
        (lambda: FullEmbedding([10, 20], 4), lambda: FullEmbedding([20, 10], 4), "cardinalities"),
        # 2 tables x 64 rows against 1 x 128: the same number of floats, a crash on the first forward before
        (lambda: UnifiedEmbedding([50, 60], 4, num_buckets=64, num_tables=2),
         lambda: UnifiedEmbedding([50, 60], 4, num_buckets=128, num_tables=1), "num_buckets"),
    ],
    ids=["hashing-small-fields", "qr-operation", "full-field-order", "unified-tables"],
)
def test_a_checkpoint_of_other_options_is_refused_naming_the_option(saved, other, option):
    state = reloaded(saved().state_dict())
    with pytest.raises(ValueError, match=rf"built with {option}=.*this table has {option}="):
        other().load_state_dict(state)


def test_an_export_with_other_cardinalities_is_refused():
    cards = [70, 30]
    mask = torch.rand(100, generator=torch.Generator().manual_seed(1)) < 0.5
    export = OptEmbedExport.from_rows(cards, 4, torch.randn(100, 4), mask, [4, 2])
    state = reloaded(export.state_dict())
    with pytest.raises(ValueError, match="cardinalities=\\[70, 30\\]"):
        OptEmbedExport.from_state_dict(state, [30, 70], 4)
    assert torch.equal(OptEmbedExport.from_state_dict(state, cards, 4).values, export.values)


def test_options_that_only_shape_training_do_not_block_a_load():
    table = HashingEmbedding([100, 5], 4, num_buckets=8, init_std=0.01, sparse=True, seed=3)
    other = HashingEmbedding([100, 5], 4, num_buckets=8, seed=4)
    other.load_state_dict(reloaded(table.state_dict()))
    ids = torch.tensor([[99, 4], [0, 0]])
    assert torch.equal(other(ids), table(ids))


def test_a_checkpoint_from_another_method_is_refused():
    state = reloaded(FullEmbedding([10, 20], 4).state_dict())
    other = HashingEmbedding([10, 20], 4, num_buckets=[10, 20])
    with pytest.raises((ValueError, RuntimeError)):
        other.load_state_dict(state)


def test_a_checkpoint_saved_before_tables_kept_their_options_still_loads_with_a_warning():
    table = FullEmbedding([10, 20], 4)
    state = {k: v for k, v in table.state_dict().items() if not k.endswith("_extra_state")}
    other = FullEmbedding([10, 20], 4)
    with pytest.warns(UserWarning, match="no saved table options"):
        other.load_state_dict(state)
    assert torch.equal(other.weight, table.weight)


def test_derived_flags_follow_the_loaded_state():
    # Without the saved options (an old checkpoint, loaded unchecked) the direct-field flag still comes from
    # the loaded buffer, so the forward pass reads the rows as the saved table did.
    small = HashingEmbedding([100, 5], 4, num_buckets=8)  # field 1 is stored directly
    hashed = HashingEmbedding([100, 5], 4, num_buckets=8, hash_small_fields=True)
    state = {k: v for k, v in small.state_dict().items() if not k.endswith("_extra_state")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hashed.load_state_dict(state)
    ids = torch.tensor([[1, 0], [2, 1], [3, 4]])
    assert torch.equal(hashed(ids), small(ids))


@pytest.mark.parametrize("name", list_tables())
def test_every_table_saves_plain_options_that_match_on_reload(name):
    table = make_table(name)
    state = reloaded(table.state_dict())  # weights_only: the options are plain values
    extra = state["_extra_state"]
    assert extra["table"] == table.registry_name
    assert extra["options"]["embedding_dim"] == table.embedding_dim
    twin = make_table(name)
    twin.load_state_dict(state)


def test_a_refused_checkpoint_leaves_the_table_untouched():
    torch.manual_seed(0)
    saved = QREmbedding([100, 200], 8, operation="mult").state_dict()
    torch.manual_seed(1)
    mine = QREmbedding([100, 200], 8, operation="add")
    before = {k: v.clone() for k, v in mine.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="operation"):
        mine.load_state_dict(saved)
    assert all(torch.equal(v, mine.state_dict()[k]) for k, v in before.items())


def test_id_limits_follow_a_load_made_after_a_forward():
    hashed = HashingEmbedding([100, 5], 4, num_buckets=8, hash_small_fields=True)  # field 1 hashed: any id
    direct = HashingEmbedding([100, 5], 4, num_buckets=8)  # field 1 stored directly: ids < 5
    direct(torch.tensor([[1, 1]]))  # caches the id limits
    state = {k: v for k, v in hashed.state_dict().items() if not k.endswith("_extra_state")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct.load_state_dict(state)
    assert torch.equal(direct(torch.tensor([[1, 7]])), hashed(torch.tensor([[1, 7]])))
