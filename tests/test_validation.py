"""Typed option validation (issue 14, item 12): nothing is coerced, numpy scalars are accepted.

The matrix is registry-driven: every keyword option of every registered table and model is classified by its
annotation (``KINDS``), and each kind has values that must raise (naming the owner and the option) and numpy
values that must be accepted. A new option with an annotation not in ``KINDS`` fails
``test_every_option_has_a_known_kind`` until it is classified here.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re

import numpy as np
import pytest
import torch

from embcompress import MODELS, TABLES, build_table, list_models, list_tables
from embcompress.budget import check_budget
from embcompress.contract import BudgetError
from embcompress.optembed import SearchConfig
from embcompress.validate import (
    check_bool, check_choice, check_int, check_int_list, check_number, check_per_field, check_positive_int,
)

from .test_models import SMALL

CARDS = [1000, 3, 57, 400]
DIM = 8
NUM_DENSE = 3

# Annotation (as written in the signature) -> kind of option.
KINDS = {
    "bool": "bool",
    "int": "int",
    "int | None": "int",
    "int | Sequence[int]": "per_field",
    "float": "number",
    "float | None": "number",
    "str": "choice",
    "str | None": "choice",
    "Sequence[int]": "int_list",
    "Sequence[int] | None": "int_list",
}
# Values that must raise, per kind (None is added for options whose default is not None).
BAD = {
    "bool": ["no", "false", 1, 0, 1.0],
    "int": [2.7, "5", True, 4.0],
    "per_field": [2.7, "5", True, 100.0, ["5"] * len(CARDS), [2.7] * len(CARDS)],
    "number": ["5", True, math.nan, math.inf],
    "choice": [1, "no-such-choice"],
    "int_list": [[2.7], ["5"], [True], [-8], "16", 16],
}
# A valid value for required options and for options whose default is None, by option name.
VALUES = {"num_buckets": 64, "scale": 4.0, "init_std": 0.1, "budget_bytes": 10**6, "retrain_epochs": 2,
          "low_rank": 4, "size": 64, "block_size": 4,
          "kept_blocks": 16,  # dedup.v1's budget key (default None: every block)
          "groups": 4,  # autosrh.v1's dimension groups (default None: min(6, D)); kept_numbers is its budget key
          "candidates": [2, 4, 8],  # autodim.v1's candidate widths (default None: powers of two up to D)
          "kept_numbers": 100,
          "fused_optimizer": "sgd"}  # deeplight.v1's (and pep.v1's) budget key (default None: every number)
PROVIDED = {"cardinalities", "embedding_dim", "embeddings", "num_dense", "self"}


def options_of(cls) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls).parameters
    return {n: p for n, p in params.items() if n not in PROVIDED}


def valid_value(owner: str, name: str, param: inspect.Parameter):
    if name in SMALL.get(owner, {}):
        return SMALL[owner][name]
    if param.default is not param.empty and param.default is not None:
        return param.default
    return VALUES[name]


def numpy_value(kind: str, value):
    """``value`` as numpy scalars of its Python kind (which every option must accept)."""
    if kind == "bool":
        return np.bool_(value)
    if kind in ("int", "per_field"):
        return np.int64(value)
    if kind == "number":
        return np.float64(value)
    if kind == "int_list":
        return [np.int64(v) for v in value]
    return value


def required(cls) -> dict:
    return {k: VALUES[k] for k, p in options_of(cls).items() if p.default is p.empty}


def build(registry_kind: str, name: str, **options):
    """A table or model with ``options`` (the required ones filled from VALUES; small models from SMALL)."""
    if registry_kind == "table":
        cls = TABLES.get(name)
        return cls(CARDS, DIM, **{**required(cls), **options})
    table = TABLES.get("full.v1")(CARDS, DIM)
    return MODELS.get(name)(table, NUM_DENSE, **{**SMALL.get(name, {}), **options})


def all_options():
    for kind, names in (("table", list_tables()), ("model", list_models())):
        registry = TABLES if kind == "table" else MODELS
        for name in names:
            for option, param in options_of(registry.get(name)).items():
                yield pytest.param(kind, name, option, param, id=f"{name}-{option}")


OPTIONS = list(all_options())


@pytest.mark.parametrize("registry_kind, name, option, param", OPTIONS)
def test_every_option_has_a_known_kind(registry_kind, name, option, param):
    assert param.annotation in KINDS, (
        f"{name}: option {option!r} has annotation {param.annotation!r}; classify it in KINDS (and BAD)"
    )
    assert param.kind is param.KEYWORD_ONLY, f"{name}: option {option!r} must be keyword-only"


@pytest.mark.parametrize("registry_kind, name, option, param", OPTIONS)
def test_bad_option_types_raise_naming_owner_and_option(registry_kind, name, option, param):
    kind = KINDS[param.annotation]
    bad = list(BAD[kind]) + ([] if "None" in param.annotation else [None])
    pattern = rf"{re.escape(name)}: {re.escape(option)}\b"
    for value in bad:
        with pytest.raises(ValueError, match=pattern):
            build(registry_kind, name, **{option: value})


@pytest.mark.parametrize("registry_kind, name, option, param", OPTIONS)
def test_numpy_scalars_are_accepted(registry_kind, name, option, param):
    kind = KINDS[param.annotation]
    value = numpy_value(kind, valid_value(name, option, param))
    built = build(registry_kind, name, **{option: value})
    stored = getattr(built, option, None)
    if isinstance(stored, (numbers.Number, np.generic)):  # stored options are plain Python values
        assert type(stored) in (bool, int, float), (name, option, type(stored))


@pytest.mark.parametrize("name", list_tables())
def test_embedding_dim_and_cardinalities_are_typed(name):
    cls = TABLES.get(name)
    opts = required(cls)
    for bad in (True, 8.0, "8", 0):
        with pytest.raises(ValueError, match="embedding_dim"):
            cls(CARDS, bad, **opts)
    for bad in ([10, 2.5], [10, True], 100.0, "100", [], [10, -1]):
        with pytest.raises(ValueError, match="cardinalit"):
            cls(bad, DIM, **opts)
    table = cls([np.int64(c) for c in CARDS], np.int64(DIM), **opts)
    assert table.embedding_dim == DIM and type(table.embedding_dim) is int
    assert table.cardinalities == tuple(CARDS) and all(type(c) is int for c in table.cardinalities)


@pytest.mark.parametrize("name", list_models())
def test_num_dense_is_typed(name):
    cls, options = MODELS.get(name), SMALL.get(name, {})
    for bad in (True, 3.0, "3", -1):
        with pytest.raises(ValueError, match=f"{name}: num_dense must be"):
            cls(TABLES.get("full.v1")(CARDS, DIM), bad, **options)
    model = cls(TABLES.get("full.v1")(CARDS, DIM), np.int64(NUM_DENSE), **options)
    assert model.num_dense == NUM_DENSE and type(model.num_dense) is int


# ---------------------------------------------------------------------------- the cases the issue names
@pytest.mark.parametrize("spec, pattern", [
    ({"type": "hashing.v1", "num_buckets": 64, "shared": "no"}, "hashing.v1: shared must be a bool.*'no'"),
    ({"type": "full.v1", "sparse": "false"}, "full.v1: sparse must be a bool.*'false'"),
    # OptEmbed's rewind / mutations / generations are schedule options now (tests/test_optembed.py checks them).
    ({"type": "optembed.v1", "sparse": "no"}, "optembed.v1: sparse must be a bool.*'no'"),
    ({"type": "optembed.v1", "oov": 2.7}, r"optembed.v1: oov must be one of.*2\.7"),
    ({"type": "hashing.v1", "num_buckets": 100.0}, r"hashing.v1: num_buckets must be a positive int.*100\.0"),
    ({"type": "unified.v1", "num_buckets": 100.0}, r"unified.v1: num_buckets must be a positive int.*100\.0"),
    ({"type": "hashing.v1", "num_buckets": 64, "hash_small_fields": "yes"}, "hash_small_fields must be a bool"),
])
def test_issue_cases_raise(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_table(spec, CARDS, DIM)


@pytest.mark.parametrize("budget", [np.int64(4096), np.int32(4096), np.float64(4096.0), 4096, 4096.0])
def test_numpy_budgets_are_accepted(budget):
    assert check_budget(budget) == 4096 and type(check_budget(budget)) is int
    table = build_table({"type": "hashing.v1", "budget_bytes": budget}, CARDS, DIM)
    assert table.memory_report().total_bytes <= 4096


@pytest.mark.parametrize("budget", [0, -3, True, "4096", math.nan, math.inf, np.float64("nan"), None, [4096]])
def test_bad_budgets_raise_budget_error(budget):
    with pytest.raises(BudgetError, match="budget_bytes must be a positive finite number"):
        check_budget(budget)


@pytest.mark.parametrize("field, value", [
    ("population", True), ("population", 2.0), ("keep", "3"), ("mutations", 2.7), ("crossovers", -1),
    ("generations", "5"), ("mutate_prob", "0.1"), ("mutate_prob", 1.5), ("mutate_prob", True), ("seed", 1.5),
    ("seed", "0"),
])
def test_search_config_is_typed(field, value):
    with pytest.raises(ValueError, match=rf"SearchConfig: {field} must be"):
        SearchConfig(**{field: value})


def test_search_config_takes_numpy_scalars_as_python_values():
    cfg = SearchConfig(population=np.int64(4), keep=np.int64(2), generations=np.int32(1),
                       mutate_prob=np.float64(0.5), seed=np.int64(3))
    assert (cfg.population, cfg.keep, cfg.generations, cfg.mutate_prob, cfg.seed) == (4, 2, 1, 0.5, 3)
    assert all(type(v) in (int, float) for v in (cfg.population, cfg.keep, cfg.generations, cfg.mutate_prob,
                                                 cfg.seed))


# ---------------------------------------------------------------------------------------- the validators
def test_validators_refuse_coercion_and_accept_numpy():
    assert check_bool("x", np.bool_(True)) is True
    for bad in ("no", 1, 0, None, np.int64(1)):
        with pytest.raises(ValueError, match=r"^t.v1: x must be a bool \(True or False\), got "):
            check_bool("x", bad, owner="t.v1")
    assert check_int("x", np.int64(3), lo=0, hi=3) == 3 and type(check_int("x", np.uint8(3))) is int
    for bad in (2.7, 3.0, "5", True, np.bool_(True), None, 4):
        with pytest.raises(ValueError, match=r"x must be an int in \[0, 3\]"):
            check_int("x", bad, lo=0, hi=3)
    with pytest.raises(ValueError, match="x must be a positive int, got 0"):
        check_positive_int("x", 0)
    assert check_number("x", np.int64(2)) == 2.0 and type(check_number("x", np.float32(0.5))) is float
    with pytest.raises(ValueError, match=r"dropout must be a finite number in \[0, 1\), got 1"):
        check_number("dropout", 1, lo=0, hi=1, hi_open=True)
    with pytest.raises(ValueError, match="x must be a positive finite number, got 0"):
        check_number("x", 0, positive=True)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 1"):
        check_choice("mode", 1, ("a", "b"))
    assert check_int_list("m", [np.int64(4), 2]) == (4, 2)
    with pytest.raises(ValueError, match=r"m\[1\] must be a positive int, got -8"):
        check_int_list("m", [4, -8])
    with pytest.raises(ValueError, match="m must be a non-empty list of positive ints, got 16"):
        check_int_list("m", 16)
    assert check_int_list("m", [], allow_empty=True) == ()
    assert check_per_field("n", np.int64(5), 3) == [5, 5, 5]
    with pytest.raises(ValueError, match="n has 2 entries for 3 fields"):
        check_per_field("n", [1, 2], 3)
    with pytest.raises(ValueError, match=r"n must be a positive int or a list of one per field, got 100\.0"):
        check_per_field("n", 100.0, 3)


@pytest.mark.parametrize("options, match", [
    (dict(epochs=True), "TrainConfig: epochs must be"),
    (dict(batch_size=2.5), "TrainConfig: batch_size must be"),
    (dict(lr=float("nan")), "TrainConfig: lr must be"),
    (dict(progress="no"), "TrainConfig: progress must be a bool"),
    (dict(seed=-1), "TrainConfig: seed must be"),
    (dict(lr_decay=0), "TrainConfig: lr_decay must be"),
])
def test_train_config_is_typed(options, match):
    from embcompress.training import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**options)
    assert TrainConfig(epochs=np.int64(2), lr=np.float32(0.01)).epochs == 2


@pytest.mark.parametrize("options, match", [
    (dict(rows=True), "SyntheticConfig: rows must be"),
    (dict(seed=-1), "SyntheticConfig: seed must be"),
    (dict(latent_dim=2.5), "SyntheticConfig: latent_dim must be"),
    (dict(click_rate=float("inf")), "SyntheticConfig: click_rate must be"),
])
def test_synthetic_config_is_typed(options, match):
    from embcompress.synthetic import SyntheticConfig

    with pytest.raises(ValueError, match=match):
        SyntheticConfig(**options)


def test_a_numpy_frequent_count_shapes_the_budget_like_an_int():
    from embcompress.tables import HashingEmbedding

    cards = [1000, 300]
    a = HashingEmbedding.from_budget(cards, 8, budget_bytes=8_000, frequent=50)
    b = HashingEmbedding.from_budget(cards, 8, budget_bytes=8_000, frequent=np.int64(50))
    assert torch.equal(a.rows, b.rows) and a.memory_report().total_bytes == b.memory_report().total_bytes
