"""Bad values are refused where data enters training, naming the split, row and column (issue 14, item 15)."""

import dataclasses

import numpy as np
import pytest
import torch

from embcompress import build_model, build_table, list_models
from embcompress.contract import IdError
from embcompress.data import CTRData
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, train


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(rows=6_000, cardinality_exponent=0.2, seed=5))


def changed(data: CTRData, **arrays) -> CTRData:
    """A copy of ``data`` with some arrays replaced (``dataclasses.replace`` runs the checks again)."""
    return dataclasses.replace(data, **arrays)


def val_row(data: CTRData, k: int) -> int:
    return data.splits["val"][0] + k


def test_a_nan_dense_value_is_refused_naming_split_row_and_column(data):
    dense = data.dense.copy()
    dense[val_row(data, 7), 2] = np.nan
    with pytest.raises(ValueError, match=r"split 'val' row 7 .* dense value nan in dense column 2"):
        changed(data, dense=dense)


def test_an_infinite_dense_value_is_refused(data):
    dense = data.dense.copy()
    dense[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"split 'train' row 3 .*inf"):
        changed(data, dense=dense)


def test_a_label_that_is_not_0_or_1_is_refused(data):
    labels = data.labels.copy()
    labels[val_row(data, 2)] = 2.0
    with pytest.raises(ValueError, match=r"split 'val' row 2 .* label 2\.0; labels must be 0 or 1"):
        changed(data, labels=labels)


def small_model(data: CTRData, model: str = "fm.v1"):
    torch.manual_seed(0)
    return build_model({"type": model}, build_table({"type": "full.v1"}, data.cardinalities, 4), data.num_dense)


def test_an_empty_train_split_says_so(data):
    n = data.labels.shape[0]
    empty = changed(data, splits={"train": (0, 0), "val": (0, n // 2), "test": (n // 2, n)})
    with pytest.raises(ValueError, match="the train split is empty"):
        train(small_model(empty), empty, TrainConfig(epochs=1, progress=False))


def test_a_diverged_model_is_named_not_left_to_scikit_learn(data):
    model = small_model(data)
    with torch.no_grad():
        model.embeddings.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite probabilities.*diverged"):
        train(model, data, TrainConfig(epochs=1, progress=False))


@pytest.mark.parametrize("name", list_models())
def test_every_model_built_for_another_num_dense_says_so(data, name):
    table = build_table({"type": "full.v1"}, data.cardinalities, 4)
    model = build_model({"type": name}, table, data.num_dense - 1)
    batch = data.split("train")
    with pytest.raises(ValueError, match=rf"dense must have shape \[{len(batch)}, {data.num_dense - 1}\]"):
        model(batch.dense, batch.sparse)


def test_an_id_out_of_range_in_training_names_the_data_row_and_field(data):
    sparse = data.sparse.copy()
    row = data.splits["train"][0] + 123
    sparse[row, 1] = data.cardinalities[1] + 5
    bad = changed(data, sparse=sparse)
    with pytest.raises(IdError, match=rf"split 'train' row 123 .* id {data.cardinalities[1] + 5} in field "
                                      rf"'{data.field_names[1]}' \(index 1\), outside \[0, {data.cardinalities[1]}\)"):
        train(small_model(bad), bad, TrainConfig(epochs=1, batch_size=512, progress=False))


def test_a_raw_id_in_a_hashed_field_is_not_blamed_for_a_bad_id_elsewhere(data):
    # Field 0 is hashed (any id is fine there), the smallest field is stored directly.
    sparse = data.sparse.copy()
    last = min(range(len(data.cardinalities)), key=data.cardinalities.__getitem__)
    sparse[data.splits["train"][0], 0] = 10**9
    sparse[data.splits["train"][0] + 30, last] = data.cardinalities[last]
    bad = changed(data, sparse=sparse)
    torch.manual_seed(0)
    table = build_table({"type": "hashing.v1", "num_buckets": 4}, bad.cardinalities, 4)
    assert table.id_limits()[0] == -1 and table.id_limits()[last] == bad.cardinalities[last]
    model = build_model({"type": "fm.v1"}, table, bad.num_dense)
    with pytest.raises(IdError, match=rf"split 'train' row 30 .* field '{bad.field_names[last]}'"):
        train(model, bad, TrainConfig(epochs=1, batch_size=512, progress=False))
