"""Criteo TSV preprocessing (embcompress.criteo) on the 200 real rows of ../shared/data and on hand-made files."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from embcompress.cli import main as cli_main
from embcompress.criteo import (SPARSE_FIELDS, decode_ids, encode_values, load_criteo, prepare_criteo,
                                read_manifest)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo_sample_200.tsv"
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason=f"shared fixture {SAMPLE} is absent")


def _reference(path: Path):
    """The sample parsed line by line in plain Python: labels, dense (transformed), raw categorical strings."""
    labels, dense, cats = [], [], []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        assert len(f) == 40
        labels.append(float(f[0]))
        dense.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in f[1:14]])
        cats.append(f[14:])
    return np.array(labels, np.float32), np.array(dense, np.float32), cats


def _good_line(label="0", dense="1", cat="0a1b2c3d") -> str:
    return "\t".join([label] + [dense] * 13 + [cat] * 26)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    if not SAMPLE.is_file():
        pytest.skip(f"shared fixture {SAMPLE} is absent")
    out = tmp_path_factory.mktemp("criteo") / "ds"
    prepare_criteo(SAMPLE, out)
    return out


@needs_sample
def test_sample_preprocesses_exactly(sample_dir):
    labels, dense, cats = _reference(SAMPLE)
    data = load_criteo(sample_dir)
    assert data.name == "criteo" and data.bayes_auc is None and data.field_names == SPARSE_FIELDS
    assert data.sparse.dtype == np.int64 and data.dense.dtype == np.float32 and data.labels.dtype == np.float32
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_allclose(data.dense, dense, rtol=1e-6)
    # spot checks straight from the file: row 0 = "0 \t \t 3 \t 260 ...", row 1 = "0 \t \t -1 \t 19 ..."
    assert data.labels[0] == 0 and data.labels.sum() == labels.sum()
    assert data.dense[0, 0] == 0.0  # I1 missing
    assert data.dense[0, 1] == pytest.approx(math.log1p(3))
    assert data.dense[0, 2] == pytest.approx(math.log1p(260))
    assert data.dense[1, 1] == 0.0  # I2 = -1
    m = read_manifest(sample_dir)
    assert m["complete"] is True and m["rows"] == 200 and m["sparse_dtype"] == "uint8"
    for f, name in enumerate(SPARSE_FIELDS):
        column = [row[f] for row in cats]
        counts = Counter(column)
        assert data.cardinalities[f] == len(counts) + 1  # + the reserved id
        top = min(counts, key=lambda v: (-counts[v], v))
        assert data.sparse[column.index(top), f] == 0  # most frequent value -> id 0
        ids = data.sparse[:, f]
        assert ids.max() < data.cardinalities[f] - 1  # min_count=1: nothing maps to the reserved id
        assert decode_ids(sample_dir, name, ids) == column  # round trip, "" (missing) included
        np.testing.assert_array_equal(encode_values(sample_dir, name, column), ids)
        # ids ordered by descending frequency, ties by value string
        order = sorted(counts, key=lambda v: (-counts[v], v))
        assert decode_ids(sample_dir, name, range(len(order))) == order
    assert encode_values(sample_dir, "C1", ["ffffffff"])[0] == data.cardinalities[0] - 1  # unseen -> reserved


@needs_sample
def test_dlrm_split_boundaries(sample_dir):
    data = load_criteo(sample_dir)
    # 200 rows in 7 days: 29,29,29,29,28,28 | 28; day 6 halved (test first, as in facebookresearch/dlrm)
    assert data.splits == {"train": (0, 172), "test": (172, 186), "val": (186, 200)}
    assert data.split("val").labels.shape[0] == 14


@needs_sample
def test_min_count_maps_rare_values_to_reserved_id(tmp_path, sample_dir):
    _, _, cats = _reference(SAMPLE)
    prepare_criteo(SAMPLE, tmp_path / "mc", min_count=3)
    data, full = load_criteo(tmp_path / "mc"), load_criteo(sample_dir)
    for f in range(26):
        counts = Counter(row[f] for row in cats)
        reserved = data.cardinalities[f] - 1
        assert reserved == sum(c >= 3 for c in counts.values())
        rare = np.array([counts[row[f]] < 3 for row in cats])
        assert (data.sparse[rare, f] == reserved).all()
        np.testing.assert_array_equal(data.sparse[~rare, f], full.sparse[~rare, f])  # same ids for kept values


@needs_sample
def test_random_split_is_seeded(tmp_path, sample_dir):
    a = prepare_criteo(SAMPLE, tmp_path / "a", split="random", seed=1)
    prepare_criteo(SAMPLE, tmp_path / "b", split="random", seed=1)
    prepare_criteo(SAMPLE, tmp_path / "c", split="random", seed=2)
    assert a["splits"] == {"train": [0, 160], "val": [160, 180], "test": [180, 200]}
    da, db, dc = (load_criteo(tmp_path / x) for x in "abc")
    np.testing.assert_array_equal(da.sparse, db.sparse)
    assert not np.array_equal(da.sparse, dc.sparse)
    full = load_criteo(sample_dir)
    order = np.load(tmp_path / "a" / "row_order.npy")
    np.testing.assert_array_equal(da.sparse, full.sparse[order])
    np.testing.assert_array_equal(da.dense, full.dense[order])
    np.testing.assert_array_equal(da.labels, full.labels[order])


@needs_sample
def test_gzip_and_small_blocks_give_identical_arrays(tmp_path, sample_dir):
    gz = tmp_path / "sample.tsv.gz"
    gz.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    prepare_criteo(gz, tmp_path / "gz", block_rows=7)
    for name in ("labels", "dense", "sparse"):
        np.testing.assert_array_equal(np.load(tmp_path / "gz" / f"{name}.npy"), np.load(sample_dir / f"{name}.npy"))


@needs_sample
def test_cli_data_criteo(tmp_path, capsys):
    assert cli_main(["data", "criteo", str(SAMPLE), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "200 rows" in capsys.readouterr().out
    assert load_criteo(tmp_path / "o").labels.shape == (200,)


BAD = {
    "field count": "\t".join(["0"] + ["1"] * 13 + ["0a1b2c3d"] * 25),
    "empty line": "",
    "dense": _good_line(dense="1.5"),
    "label": _good_line(label="2"),
    "categorical": _good_line(cat="0A1B2C3D"),
    "short categorical": _good_line(cat="abc"),
}


@pytest.mark.parametrize("block_rows", [2, 1000])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_raises_with_file_and_line(tmp_path, case, block_rows):
    lines = [_good_line()] * 5 + [BAD[case]] + [_good_line(label="1")] * 3
    src = _write(tmp_path / "bad.tsv", lines)
    with pytest.raises(ValueError, match=r"bad\.tsv: line 6\b"):
        prepare_criteo(src, tmp_path / "out", block_rows=block_rows)
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = prepare_criteo(src, tmp_path / "skip", on_bad_line="skip", block_rows=block_rows)
    assert m["rows"] == 8 and m["skipped"]["total"] == 1 and m["skipped"]["first"] == ["bad.tsv:6"]
    assert load_criteo(tmp_path / "skip").labels.tolist() == [0] * 5 + [1] * 3


def test_skip_counts_many_bad_lines(tmp_path):
    lines = []
    for i in range(30):
        lines += [_good_line(), _good_line(label="x")]
    m = prepare_criteo(_write(tmp_path / "t.tsv", lines), tmp_path / "o", on_bad_line="skip", block_rows=3)
    assert m["rows"] == 30 and m["skipped"]["total"] == 30 and m["skipped"]["by_reason"] == {"label": 30}
    assert m["skipped"]["first"] == [f"t.tsv:{2 * k}" for k in range(1, 11)]


def test_multiple_inputs_line_numbers_per_file(tmp_path):
    a = _write(tmp_path / "a.tsv", [_good_line()] * 3)
    b = _write(tmp_path / "b.tsv", [_good_line()] * 2 + [_good_line(dense="x")])
    with pytest.raises(ValueError, match=r"b\.tsv: line 3\b"):
        prepare_criteo([a, b], tmp_path / "o")


def test_missing_final_newline_and_negative_dense(tmp_path):
    src = tmp_path / "t.tsv"
    src.write_text(_good_line(dense="-7") + "\n" + _good_line(label="1", dense="20"))
    m = prepare_criteo(src, tmp_path / "o")
    data = load_criteo(tmp_path / "o")
    assert m["rows"] == 2 and data.dense[0].tolist() == [0.0] * 13
    assert data.dense[1, 0] == pytest.approx(math.log1p(20))


def test_empty_input(tmp_path):
    src = _write(tmp_path / "empty.tsv", [])
    with pytest.raises(ValueError, match="no data rows"):
        prepare_criteo(src, tmp_path / "o")
    gz = tmp_path / "empty.tsv.gz"
    gz.write_bytes(gzip.compress(b""))
    with pytest.raises(ValueError, match="no data rows"):
        prepare_criteo(gz, tmp_path / "o")


def test_truncated_gzip(tmp_path):
    blob = gzip.compress("".join(_good_line(cat=f"{i:08x}") + "\n" for i in range(2000)).encode())
    gz = tmp_path / "t.tsv.gz"
    gz.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"t\.tsv\.gz.*truncated"):
        prepare_criteo(gz, tmp_path / "o")


def test_out_dir_holding_another_data_set(tmp_path):
    a = _write(tmp_path / "a.tsv", [_good_line()] * 3)
    b = _write(tmp_path / "b.tsv", [_good_line(cat="00000001")] * 3)  # same name length and size as a
    prepare_criteo(a, tmp_path / "o")
    prepare_criteo(a, tmp_path / "o")  # the same data set again: allowed (rebuilt)
    with pytest.raises(ValueError, match="another data set"):
        prepare_criteo(a, tmp_path / "o", min_count=2)
    b2 = tmp_path / "x" / "a.tsv"
    b2.parent.mkdir()
    b2.write_bytes(b.read_bytes())
    with pytest.raises(ValueError, match="other inputs"):
        prepare_criteo(b2, tmp_path / "o")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prepare_criteo(a, tmp_path / "junk")


def test_incomplete_manifest_is_rejected(tmp_path):
    prepare_criteo(_write(tmp_path / "a.tsv", [_good_line()] * 3), tmp_path / "o")
    path = tmp_path / "o" / "manifest.json"
    m = json.loads(path.read_text())
    m["complete"] = False
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="incomplete"):
        load_criteo(tmp_path / "o")
    del m["complete"]
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="incomplete"):
        load_criteo(tmp_path / "o")


@needs_sample
def test_numpy_fallback_gives_identical_arrays(tmp_path, sample_dir, monkeypatch):
    """Without pandas' private hash tables (another pandas version) the numpy path must give the same output."""
    import embcompress.criteo as criteo

    monkeypatch.setattr(criteo, "_Int64HashTable", None)
    monkeypatch.setattr(criteo, "_value_count", None)
    out = tmp_path / "fallback"
    prepare_criteo([SAMPLE], out, min_count=2)
    ref = tmp_path / "ref"
    monkeypatch.undo()
    prepare_criteo([SAMPLE], ref, min_count=2)
    for name in ("labels.npy", "dense.npy", "sparse.npy"):
        assert np.array_equal(np.load(out / name), np.load(ref / name)), name
