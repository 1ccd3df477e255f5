"""The synthetic Criteo-like data set: determinism, layout, id ranking, click rate and the Bayes AUC."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from embcompress.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    NUM_DENSE,
    SyntheticConfig,
    make_synthetic,
    scaled_cardinalities,
)

ROWS = 40_000
CONFIG = SyntheticConfig(rows=ROWS, seed=0)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(CONFIG)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_config_same_arrays(data):
    again = make_synthetic(SyntheticConfig(rows=ROWS, seed=0))
    assert np.array_equal(data.dense, again.dense)
    assert np.array_equal(data.sparse, again.sparse)
    assert np.array_equal(data.labels, again.labels)
    assert data.bayes_auc == again.bayes_auc
    assert data.splits == again.splits
    assert data.cardinalities == again.cardinalities
    assert data.meta == again.meta


def test_different_seed_different_arrays(data):
    other = make_synthetic(SyntheticConfig(rows=ROWS, seed=1))
    assert data.sparse.shape == other.sparse.shape
    assert not np.array_equal(data.dense, other.dense)
    assert not np.array_equal(data.sparse, other.sparse)
    assert not np.array_equal(data.labels, other.labels)
    assert data.bayes_auc != other.bayes_auc
    # Same cardinalities (they depend on the exponent, not the seed).
    assert data.cardinalities == other.cardinalities


def test_default_config_is_the_documented_one():
    cfg = SyntheticConfig()
    assert cfg.click_rate == 0.256
    assert cfg.seed == 0


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------


def test_shapes_and_dtypes(data):
    assert NUM_DENSE == 13
    assert data.dense.shape == (ROWS, 13)
    assert data.dense.dtype == np.float32
    assert data.sparse.shape == (ROWS, 26)
    assert data.sparse.dtype == np.int64
    assert data.labels.shape == (ROWS,)
    assert data.labels.dtype == np.float32
    assert set(np.unique(data.labels).tolist()) == {0.0, 1.0}
    assert data.num_dense == 13
    assert data.name == "synthetic"


def test_dense_values_are_log_counts(data):
    assert np.isfinite(data.dense).all()
    assert (data.dense >= 0).all()
    # log(1 + x) of integer counts: expm1 gives (close to) integers; missing values read as 0.
    counts = np.expm1(data.dense.astype(np.float64))
    assert np.allclose(counts, np.round(counts), atol=1e-3 * np.maximum(1.0, counts))
    zero_fraction = (data.dense == 0).mean(axis=0)
    assert (zero_fraction > 0).all() and (zero_fraction < 0.9).all()


def test_field_names(data):
    assert data.field_names == tuple(f"C{i}" for i in range(1, 27))


def test_ids_within_cardinality(data):
    cards = np.asarray(data.cardinalities)
    assert data.cardinalities == scaled_cardinalities(CONFIG.cardinality_exponent)
    assert (data.sparse >= 0).all()
    assert (data.sparse < cards[None, :]).all()
    # Small fields are fully used.
    for f, n in enumerate(data.cardinalities):
        if n <= 30:
            assert len(np.unique(data.sparse[:, f])) == n


def test_splits_cover_all_rows_contiguously(data):
    assert set(data.splits) == {"train", "val", "test"}
    bounds = sorted(data.splits.values())
    assert bounds[0][0] == 0
    assert bounds[-1][1] == ROWS
    for (_, hi), (lo, _) in zip(bounds, bounds[1:]):
        assert hi == lo
    assert [data.splits[k] for k in ("train", "val", "test")] == bounds
    sizes = {k: hi - lo for k, (lo, hi) in data.splits.items()}
    assert sum(sizes.values()) == ROWS
    assert sizes["test"] == round(ROWS * CONFIG.test_fraction)
    assert sizes["val"] == round(ROWS * CONFIG.val_fraction)
    assert all(s > 0 for s in sizes.values())


def test_split_batches_are_views(data):
    lo, hi = data.splits["test"]
    batch = data.split("test")
    assert len(batch) == hi - lo
    assert batch.sparse.dtype == torch.int64
    assert batch.dense.dtype == torch.float32
    assert np.array_equal(batch.sparse.numpy(), data.sparse[lo:hi])
    assert np.array_equal(batch.labels.numpy(), data.labels[lo:hi])


# ---------------------------------------------------------------------------------------------------------------
# Cardinalities
# ---------------------------------------------------------------------------------------------------------------


def test_criteo_cardinalities():
    assert len(CRITEO_KAGGLE_CARDINALITIES) == 26
    assert scaled_cardinalities(1.0) == CRITEO_KAGGLE_CARDINALITIES


@pytest.mark.parametrize("exponent", [0.05, 0.2, 0.4, 0.5, 0.7, 0.9, 1.0])
def test_scaled_cardinalities_keep_order_and_small_fields(exponent):
    orig = CRITEO_KAGGLE_CARDINALITIES
    scaled = scaled_cardinalities(exponent)
    assert len(scaled) == len(orig)
    assert all(isinstance(n, int) for n in scaled)
    for i, j in itertools.combinations(range(len(orig)), 2):
        if orig[i] < orig[j]:
            assert scaled[i] <= scaled[j], (i, j)
        elif orig[i] > orig[j]:
            assert scaled[i] >= scaled[j], (i, j)
    # Without ties, the sorting orders agree exactly.
    if len(set(scaled)) == len(scaled):
        assert np.array_equal(np.argsort(scaled), np.argsort(orig))
    for n, s in zip(orig, scaled):
        if n <= 100:
            assert s == n
        else:
            assert 100 <= s <= n
            assert s == int(round(100 * (n / 100) ** exponent))


def test_scaled_cardinalities_shrink_with_exponent():
    a, b = scaled_cardinalities(0.3), scaled_cardinalities(0.6)
    assert all(x <= y for x, y in zip(a, b))
    assert max(a) < max(b) < max(CRITEO_KAGGLE_CARDINALITIES)


@pytest.mark.parametrize("exponent", [0, -0.5, 1.5, float("nan")])
def test_scaled_cardinalities_invalid(exponent):
    with pytest.raises(ValueError):
        scaled_cardinalities(exponent)


# ---------------------------------------------------------------------------------------------------------------
# Id distribution and labels
# ---------------------------------------------------------------------------------------------------------------


def test_ids_frequency_ranked(data):
    f = int(np.argmax(data.cardinalities))
    assert data.cardinalities[f] > 1000
    counts = np.bincount(data.sparse[:, f], minlength=data.cardinalities[f])
    assert counts[0] > counts[1] > counts[10] > counts[100]
    assert counts[0] == counts.max()


def test_ids_frequency_ranked_in_every_large_field(data):
    for f, n in enumerate(data.cardinalities):
        if n < 500:
            continue
        counts = np.bincount(data.sparse[:, f], minlength=n)
        assert counts[0] == counts.max(), data.field_names[f]
        # Head ranks dominate later ranks (averaged over blocks to keep it robust).
        assert counts[:10].mean() > counts[10:100].mean() > counts[100:500].mean(), data.field_names[f]


def test_click_rate(data):
    assert abs(float(data.labels.mean()) - CONFIG.click_rate) < 0.02
    assert data.meta["click_rate"] == pytest.approx(float(data.labels.mean()))


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_click_rate_follows_config(rate):
    d = make_synthetic(SyntheticConfig(rows=20_000, click_rate=rate, seed=3))
    assert abs(float(d.labels.mean()) - rate) < 0.02


def test_bayes_auc(data):
    assert data.bayes_auc is not None
    assert 0.6 < data.bayes_auc < 0.99
    lo, hi = data.splits["test"]
    y = data.labels[lo:hi]
    constant = roc_auc_score(y, np.zeros_like(y))
    assert constant == 0.5
    assert constant < data.bayes_auc


def test_bayes_logloss_beats_constant(data):
    lo, hi = data.splits["test"]
    y = data.labels[lo:hi].astype(np.float64)
    p = y.mean()
    constant_logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    assert 0 < data.meta["bayes_logloss"] < constant_logloss


def test_features_carry_signal(data):
    # The labels depend on the ids: the empirical click rate of the most frequent id of a field differs from the
    # click rate of the rest in at least one large field (the click model has a bias per value).
    rate = data.labels.mean()
    gaps = []
    for f, n in enumerate(data.cardinalities):
        if n < 100:
            continue
        head = data.sparse[:, f] == 0
        gaps.append(abs(data.labels[head].mean() - rate))
    assert max(gaps) > 0.04


def test_config_recorded_in_meta(data):
    assert data.meta["config"] == dataclasses.asdict(CONFIG)


# ---------------------------------------------------------------------------------------------------------------
# Invalid configs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 5},
        {"rows": 0},
        {"click_rate": 1.5},
        {"click_rate": 0.0},
        {"click_rate": 1.0},
        {"cardinality_exponent": 0},
        {"cardinality_exponent": 1.2},
        {"zipf_exponent": 0},
        {"latent_dim": 0},
        {"val_fraction": 0.0},
        {"test_fraction": 1.0},
        {"val_fraction": 0.5, "test_fraction": 0.5},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_configs(kwargs):
    with pytest.raises(ValueError):
        SyntheticConfig(**kwargs)


def test_smallest_valid_config():
    d = make_synthetic(SyntheticConfig(rows=10, seed=5))
    assert d.sparse.shape == (10, 26)
    assert sum(hi - lo for lo, hi in d.splits.values()) == 10
    assert all(hi - lo >= 1 for lo, hi in d.splits.values())


@pytest.mark.parametrize("val, test", [(0.98, 0.01), (0.46, 0.535)])
def test_fractions_that_leave_no_training_rows_are_rejected(val, test):
    with pytest.raises(ValueError, match="no training rows"):
        SyntheticConfig(rows=10, val_fraction=val, test_fraction=test)


def test_seen_values_auc_is_bayes_with_every_value_and_falls_as_values_are_hidden():
    from embcompress.synthetic import seen_values_auc

    data = make_synthetic(SyntheticConfig(rows=30_000, seed=4))
    assert seen_values_auc(data, 0) == pytest.approx(data.bayes_auc, abs=1e-6)  # the same click model
    aucs = [seen_values_auc(data, k) for k in (1, 10, 100, 10**9)]
    assert aucs == sorted(aucs, reverse=True) and aucs[0] <= data.bayes_auc + 1e-9
    assert 0.5 < aucs[-1] < aucs[0] - 0.05  # with no value known, only the dense features are left
