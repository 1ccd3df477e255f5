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
    import embcompress.vocab as vocab

    monkeypatch.setattr(vocab, "_Int64HashTable", None)
    monkeypatch.setattr(vocab, "_value_count", None)
    out = tmp_path / "fallback"
    prepare_criteo([SAMPLE], out, min_count=2)
    ref = tmp_path / "ref"
    monkeypatch.undo()
    prepare_criteo([SAMPLE], ref, min_count=2)
    for name in ("labels.npy", "dense.npy", "sparse.npy"):
        assert np.array_equal(np.load(out / name), np.load(ref / name)), name


# ------------------------------------------------------------------------------------ per-field cap
def _counted_file(tmp_path: Path) -> Path:
    """C1 values with counts 5 (0000000a), 3 (0000000b), 3 (0000000c), 2 (0000000d), 1 (0000000e)."""
    values = ["0000000a"] * 5 + ["0000000c"] * 3 + ["0000000b"] * 3 + ["0000000d"] * 2 + ["0000000e"]
    return _write(tmp_path / "c.tsv", ["\t".join(["0"] + ["1"] * 13 + [v] * 26) for v in values])


@pytest.mark.parametrize("cap, kept", [(1, []), (2, ["0000000a"]), (3, ["0000000a", "0000000b"]),
                                       (4, ["0000000a", "0000000b", "0000000c"]), (100, None)])
def test_max_rows_per_field_keeps_the_most_frequent(tmp_path, cap, kept):
    src = _counted_file(tmp_path)
    m = prepare_criteo(src, tmp_path / "o", max_rows_per_field=cap)
    order = ["0000000a", "0000000b", "0000000c", "0000000d", "0000000e"]  # by count, ties (b, c) by value
    kept = order if kept is None else kept
    assert m["cardinalities"] == [len(kept) + 1] * 26 and m["options"]["max_rows_per_field"] == cap
    data = load_criteo(tmp_path / "o")
    raw = [line.split("\t")[14] for line in src.read_text().splitlines()]
    expected = [kept.index(v) if v in kept else len(kept) for v in raw]
    assert data.sparse[:, 0].tolist() == expected
    assert decode_ids(tmp_path / "o", "C1", range(len(kept) + 1)) == kept + [None]


def test_max_rows_per_field_after_min_count(tmp_path):
    m = prepare_criteo(_counted_file(tmp_path), tmp_path / "o", min_count=3, max_rows_per_field=10)
    assert m["cardinalities"][0] == 4  # a, b, c (count >= 3) + reserved: the cap does not bind
    m = prepare_criteo(_counted_file(tmp_path), tmp_path / "p", min_count=3, max_rows_per_field=3)
    assert m["cardinalities"][0] == 3
    assert decode_ids(tmp_path / "p", 0, [0, 1, 2]) == ["0000000a", "0000000b", None]


@needs_sample
def test_max_rows_per_field_on_sample(tmp_path, sample_dir):
    _, _, cats = _reference(SAMPLE)
    prepare_criteo(SAMPLE, tmp_path / "cap", max_rows_per_field=5)
    data, full = load_criteo(tmp_path / "cap"), load_criteo(sample_dir)
    for f in range(26):
        n_values = len({row[f] for row in cats})
        assert data.cardinalities[f] == min(5, n_values + 1)
        reserved = data.cardinalities[f] - 1
        capped = full.sparse[:, f] >= reserved  # the ids past the cap in the uncapped set
        np.testing.assert_array_equal(data.sparse[~capped, f], full.sparse[~capped, f])
        assert (data.sparse[capped, f] == reserved).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_max_rows_per_field_is_validated(tmp_path, bad):
    with pytest.raises(ValueError, match=rf"max_rows_per_field .*got {bad!r}"):
        prepare_criteo(_counted_file(tmp_path), tmp_path / "o", max_rows_per_field=bad)


# ------------------------------------------------------------------------------------ dense buckets
# hand-computed floor(ln(x) ** 2) of the first three rows of the sample (I1..I13; "" = missing, "<1" = x < 1):
# row 0: I2 = 3 -> ln 3 = 1.0986, ^2 = 1.207 -> 1; I3 = 260 -> 5.5607^2 = 30.92 -> 30; I5 = 17668 ->
#        9.7794^2 = 95.64 -> 95; I8 = 33 -> 3.4965^2 = 12.23 -> 12; I12 = 0 -> <1
# row 1: I2 = -1 -> <1; I3 = 19 -> 2.9444^2 = 8.67 -> 8; I4 = I8 = I13 = 35 -> 3.5553^2 = 12.64 -> 12;
#        I5 = 30251 -> 10.317^2 = 106.4 -> 106; I6 = 247 -> 5.5094^2 = 30.35 -> 30; I7 = I11 = 1 -> 0;
#        I9 = 160 -> 5.0752^2 = 25.76 -> 25
# row 2: I1 = I2 = I10 = 0 -> <1; I3 = 2 -> 0.6931^2 = 0.48 -> 0; I4 = 12 -> 2.4849^2 = 6.17 -> 6;
#        I5 = 2013 -> 7.6074^2 = 57.87 -> 57; I6 = 164 -> 5.0999^2 = 26.01 -> 26; I7 = 6 -> 1.7918^2 = 3.21
#        -> 3; I9 = 523 -> 6.2596^2 = 39.18 -> 39; I11 = 3 -> 1; I13 = 18 -> 2.8904^2 = 8.35 -> 8
SAMPLE_BUCKETS = [
    # I1  I2    I3    I4    I5     I6    I7   I8    I9    I10   I11  I12  I13
    ["",   "1",  "30", "",   "95",  "",   "",  "12", "",   "",   "",  "<1", ""],
    ["",   "<1", "8",  "12", "106", "30", "0", "12", "25", "",   "0", "",   "12"],
    ["<1", "<1", "0",  "6",  "57",  "26", "3", "12", "39", "<1", "1", "",   "8"],
]


@needs_sample
def test_dense_buckets_on_sample_rows_hand_computed(tmp_path, sample_dir):
    first = [line.split("\t")[1:14] for line in SAMPLE.read_text().splitlines()[:3]]
    assert first[0] == ["", "3", "260", "", "17668", "", "", "33", "", "", "", "0", ""]
    m = prepare_criteo(SAMPLE, tmp_path / "b", dense_buckets=True)
    data = load_criteo(tmp_path / "b")
    names = [f"I{k}_bucket" for k in range(1, 14)]
    assert data.field_names == SPARSE_FIELDS + tuple(names) and data.sparse.shape == (200, 39)
    assert m["schema"]["sparse"] == list(SPARSE_FIELDS) + names and len(m["cardinalities"]) == 39
    assert m["options"]["dense_buckets"] is True and "dense_buckets" in m["schema"]
    for r, expected in enumerate(SAMPLE_BUCKETS):
        got = [decode_ids(tmp_path / "b", name, [data.sparse[r, 26 + k]])[0] for k, name in enumerate(names)]
        assert got == expected, r
    full = load_criteo(sample_dir)  # the categorical fields and the dense array are unchanged
    np.testing.assert_array_equal(data.sparse[:, :26], full.sparse)
    np.testing.assert_array_equal(data.dense, full.dense)
    # every row, from the raw text: bucket ids follow descending frequency of the buckets
    for k in range(13):
        raw = [line.split("\t")[1 + k] for line in SAMPLE.read_text().splitlines()]
        buckets = ["" if x == "" else "<1" if int(x) < 1 else str(math.floor(math.log(int(x)) ** 2)) for x in raw]
        assert decode_ids(tmp_path / "b", names[k], data.sparse[:, 26 + k]) == buckets
        counts = Counter(buckets)
        assert data.cardinalities[26 + k] == len(counts) + 1
        np.testing.assert_array_equal(encode_values(tmp_path / "b", names[k], raw), data.sparse[:, 26 + k])


def test_dense_buckets_negative_missing_and_large(tmp_path):
    dense_rows = [["-3", "0", "1", "2", "3", "7", "8", "100", "", "999999999999999999", "20", "21", "1"],
                  ["-1", "", "1", "2", "3", "7", "8", "100", "", "54", "55", "22", "1"]]
    lines = ["\t".join(["1"] + d + ["0000000a"] * 26) for d in dense_rows]
    m = prepare_criteo(_write(tmp_path / "d.tsv", lines), tmp_path / "o", dense_buckets=True)
    # 999999999999999999: ln = 41.4465, ^2 = 1717.8 -> 1717; 20 -> 8.97 -> 8; 21 -> 9.27 -> 9; 54 -> 15.9 -> 15;
    # 55 -> 16.06 -> 16; 22 -> 9.55 -> 9
    expected = [["<1", "<1", "0", "0", "1", "3", "4", "21", "", "1717", "8", "9", "0"],
                ["<1", "", "0", "0", "1", "3", "4", "21", "", "15", "16", "9", "0"]]
    data = load_criteo(tmp_path / "o")
    for r in range(2):
        assert [decode_ids(tmp_path / "o", 26 + k, [data.sparse[r, 26 + k]])[0] for k in range(13)] == expected[r]
    assert m["cardinalities"][26:] == [2, 3, 2, 2, 2, 2, 2, 2, 2, 3, 3, 2, 2]
    assert encode_values(tmp_path / "o", "I10_bucket", ["55"])[0] == m["cardinalities"][35] - 1  # unseen
    with pytest.raises(ValueError, match="malformed dense value '1.5'"):
        encode_values(tmp_path / "o", "I1_bucket", ["1.5"])


def test_dense_buckets_min_count_and_cap_apply(tmp_path):
    dense = ["5"] * 3 + ["100"] * 2 + [""]  # buckets 2 (x3), 21 (x2), missing (x1)
    lines = ["\t".join(["0"] + [d] * 13 + ["0000000a"] * 26) for d in dense]
    src = _write(tmp_path / "t.tsv", lines)
    m = prepare_criteo(src, tmp_path / "a", dense_buckets=True, min_count=2)
    assert m["cardinalities"][26:] == [3] * 13
    assert decode_ids(tmp_path / "a", "I1_bucket", [0, 1, 2]) == ["2", "21", None]
    m = prepare_criteo(src, tmp_path / "b", dense_buckets=True, max_rows_per_field=2)
    assert m["cardinalities"] == [2] * 39


@needs_sample
def test_cli_cap_and_buckets(tmp_path, capsys):
    assert cli_main(["data", "criteo", str(SAMPLE), "--out", str(tmp_path / "o"), "--quiet", "--dense-buckets",
                     "--max-rows-per-field", "4"]) == 0
    data = load_criteo(tmp_path / "o")
    assert data.sparse.shape == (200, 39) and max(data.cardinalities) == 4


# ------------------------------------------------------------------------------------ 1TB day split
def _day_files(tmp_path: Path, rows_per_day: list[int], gz_days=(3, 23)) -> list[Path]:
    paths = []
    for d, n in enumerate(rows_per_day):
        text = "".join(_good_line(label=str((d + i) % 2), cat=f"{d:08x}") + "\n" for i in range(n))
        if d in gz_days:
            p = tmp_path / f"day_{d}.gz"
            p.write_bytes(gzip.compress(text.encode()))
        else:
            p = tmp_path / f"day_{d}"
            p.write_text(text)
        paths.append(p)
    return paths


def test_day_split_boundaries(tmp_path):
    rows = [2 + d % 3 for d in range(23)] + [7]
    paths = _day_files(tmp_path, rows)
    m = prepare_criteo(paths, tmp_path / "o", split="day")
    n_train = sum(rows[:23])
    # day 23 (7 rows) halved as in the dlrm split: np.array_split -> 4 test rows first, then 3 val rows
    assert m["splits"] == {"train": [0, n_train], "test": [n_train, n_train + 4], "val": [n_train + 4, n_train + 7]}
    assert [s["rows"] for s in m["sources"]] == rows and m["options"]["split"] == "day"
    data = load_criteo(tmp_path / "o")
    day_of_row = np.repeat(np.arange(24), rows)
    assert decode_ids(tmp_path / "o", "C1", data.sparse[:, 0]) == [f"{d:08x}" for d in day_of_row]
    assert (day_of_row[slice(*data.splits["train"])] < 23).all()
    assert (day_of_row[data.splits["test"][0]:] == 23).all()


def test_day_split_skipped_lines_count_per_day(tmp_path):
    paths = _day_files(tmp_path, [2] * 23 + [5])
    with open(paths[0], "a") as fh:
        fh.write("garbage\n")
    m = prepare_criteo(paths, tmp_path / "o", split="day", on_bad_line="skip")
    assert m["splits"]["train"] == [0, 46] and m["skipped"]["first"] == ["day_0:3"]


def test_day_split_needs_24_files_in_order(tmp_path):
    paths = _day_files(tmp_path, [2] * 24)
    with pytest.raises(ValueError, match="needs the 24 .*got 23 input"):
        prepare_criteo(paths[:23], tmp_path / "o", split="day")
    with pytest.raises(ValueError, match="got 25 input"):
        prepare_criteo(paths + paths[:1], tmp_path / "o", split="day")
    glob_order = sorted(paths, key=lambda p: p.name)  # day_0 day_1 day_10 ...: the shell's order
    with pytest.raises(ValueError, match="day order .*day_0 day_1 day_10"):
        prepare_criteo(glob_order, tmp_path / "o", split="day")
    (tmp_path / "s").mkdir()
    short = _day_files(tmp_path / "s", [2] * 23 + [1])
    with pytest.raises(ValueError, match="day_23.gz: day 23 has 1 row"):
        prepare_criteo(short, tmp_path / "o2", split="day")
    assert cli_main(["data", "criteo", *map(str, paths[:3]), "--out", str(tmp_path / "c"), "--split", "day",
                     "--quiet"]) == 2


def test_cli_day_split(tmp_path, capsys):
    paths = _day_files(tmp_path, [1] * 23 + [2])
    assert cli_main(["data", "criteo", *map(str, paths), "--out", str(tmp_path / "o"), "--split", "day",
                     "--quiet"]) == 0
    assert read_manifest(tmp_path / "o")["splits"] == {"train": [0, 23], "test": [23, 24], "val": [24, 25]}


# ------------------------------------------------------------------------------------ killed runs
def _spill(out: Path) -> Path:
    return out.parent / f".{out.name}.embcompress-spill"


def test_rerun_after_a_kill_removes_the_stale_temporary_folder(tmp_path):
    src = _write(tmp_path / "a.tsv", [_good_line()] * 3)
    out = tmp_path / "o"
    prepare_criteo(src, out)
    # what a killed run leaves: an incomplete manifest and a spill folder that nobody holds the lock of
    m = read_manifest(out)
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    _spill(out).mkdir()
    (_spill(out) / "rows.bin").write_bytes(b"x" * 1000)
    (tmp_path / f".{out.name}.embcompress-spill.lock").write_text("")
    assert prepare_criteo(src, out)["complete"] is True
    assert not _spill(out).exists() and not (tmp_path / f".{out.name}.embcompress-spill.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "o"]  # nothing accumulates beside out


def test_a_running_preparation_of_the_same_out_is_refused(tmp_path):
    import fcntl

    src = _write(tmp_path / "a.tsv", [_good_line()] * 3)
    out = tmp_path / "o"
    with open(tmp_path / f".{out.name}.embcompress-spill.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        with pytest.raises(ValueError, match="another preparation of .* is running"):
            prepare_criteo(src, out)
    assert prepare_criteo(src, out)["complete"] is True


@pytest.mark.slow
def test_a_real_kill_then_rerun(tmp_path):
    """SIGKILL a preparation during pass 1, then rerun: same arrays as a clean run, no temporary folder left."""
    import signal
    import subprocess
    import sys
    import time

    src = _write(tmp_path / "big.tsv", [_good_line(label=str(i % 2), cat=f"{i % 977:08x}") for i in range(20000)])
    out = tmp_path / "o"
    code = (f"from embcompress.criteo import prepare_criteo; "
            f"prepare_criteo({str(src)!r}, {str(out)!r}, block_rows=20)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    rows = _spill(out) / "rows.bin"
    while not (rows.exists() and rows.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the preparation finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _spill(out).exists()  # what the kill left
    m = prepare_criteo(src, out)
    assert m["complete"] is True and m["rows"] == 20000 and not _spill(out).exists()
    prepare_criteo(src, tmp_path / "clean")
    for name in ("labels.npy", "dense.npy", "sparse.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "clean" / name))


def test_folder_prepared_before_the_new_options_can_be_rebuilt(tmp_path):
    src = _write(tmp_path / "a.tsv", [_good_line()] * 3)
    prepare_criteo(src, tmp_path / "o")
    path = tmp_path / "o" / "manifest.json"
    m = json.loads(path.read_text())
    for key in ("dense_buckets", "max_rows_per_field"):
        del m["options"][key]
    path.write_text(json.dumps(m))
    assert prepare_criteo(src, tmp_path / "o")["complete"] is True
    with pytest.raises(ValueError, match="another data set"):
        prepare_criteo(src, tmp_path / "o", dense_buckets=True)


# ------------------------------------------------------------------------------------ experiment scripts
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "data_scripts").glob("*.sh"))


def _run_script(name: str, *args: str, cwd: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "data_scripts" / name), *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_strict(script):
    import subprocess

    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert not any(tool in text for tool in ("wget ", "curl ")), "the scripts never download"
    assert "@" not in "".join(line for line in text.splitlines() if line.startswith("#")), "unfilled placeholder"


@pytest.mark.slow
def test_prepare_1tb_script_checks_and_prepares(tmp_path):
    days = tmp_path / "days"
    days.mkdir()
    r = _run_script("prepare_criteo_1tb.sh", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode == 1 and "is not a folder" in r.stderr
    _day_files(days, [2] * 23 + [4])
    (days / "day_23.gz").unlink()
    r = _run_script("prepare_criteo_1tb.sh", str(days), str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 1 and "lacks day_23" in r.stderr and "never downloads" in r.stderr
    (days / "day_23").write_text("".join(_good_line() + "\n" for _ in range(4)))
    (days / "day_5.gz").write_bytes(b"")
    r = _run_script("prepare_criteo_1tb.sh", str(days), str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 1 and "both" in r.stderr
    (days / "day_5.gz").unlink()
    r = _run_script("prepare_criteo_1tb.sh", str(days), str(tmp_path / "o"), "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = read_manifest(tmp_path / "o")
    assert m["options"]["split"] == "day" and m["options"]["max_rows_per_field"] == 40_000_000
    assert m["splits"] == {"train": [0, 46], "test": [46, 48], "val": [48, 50]}
    assert [s["name"] for s in m["sources"]][:3] == ["day_0", "day_1", "day_2"]  # day order, not glob order


def test_grid_script_checks_the_prepared_folder(tmp_path):
    r = _run_script("run_criteo_kaggle_grid.sh", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode == 1 and "no manifest.json" in r.stderr and "never" not in r.stdout
    prepare_criteo(_write(tmp_path / "a.tsv", [_good_line()] * 3), tmp_path / "o")
    path = tmp_path / "o" / "manifest.json"
    m = json.loads(path.read_text())
    m["complete"] = False
    path.write_text(json.dumps(m))
    r = _run_script("run_criteo_kaggle_grid.sh", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 1 and "did not finish" in r.stderr


@needs_sample
def test_grid_suite_loads_on_a_prepared_folder(sample_dir):
    from embcompress.suite import load_suite
    from embcompress.registry import list_tables

    suite = load_suite(ROOT / "benchmarks" / "criteo_kaggle_grid.yaml", data_path=sample_dir)
    assert suite.data == {"criteo": {"path": str(sample_dir)}}
    assert [m.name for m in suite.models] == ["dlrm", "dcn"] and suite.seeds == (0, 1, 2)
    assert suite.train["epochs"] == 1 and len(suite.runs()) == 1206
    ratios = {r for m in suite.methods for r in m.compression}
    assert min(ratios) == 2 and max(ratios) == 1000
    in_grid = {m.table["type"] for m in suite.methods}
    families = {n.rsplit(".", 1)[0] for n in list_tables()} - {n.rsplit(".", 1)[0] for n in in_grid}
    assert not families, f"add {families} to criteo_kaggle_grid.yaml"
