"""Any CSV/TSV through a YAML spec (embcompress.csvdata), on small generated MovieLens-like files."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from embcompress.cli import main as cli_main
from embcompress.criteo import decode_ids, encode_values, load_criteo, read_manifest
from embcompress.csvdata import (
    CSVSpec,
    LabelSpec,
    SplitSpec,
    load_csv,
    load_spec,
    parse_comparison,
    prepare_csv,
)
from embcompress.suite import load_data, load_suite

HEADER = "user_id,movie_id,rating,timestamp,age,genre"


def _ratings(n: int = 200, seed: int = 0) -> list[list[str]]:
    """MovieLens-like rows: user, movie, rating 1..5 (halves too), unix time, age (sometimes empty), genre."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        user = f"u{int(rng.zipf(1.5)) % 30}"
        movie = f"m{int(rng.zipf(1.3)) % 50}"
        rating = f"{rng.integers(2, 11) / 2:g}"
        ts = str(1_000_000_000 + int(rng.integers(0, 10_000_000)))
        age = "" if i % 7 == 0 else str(int(rng.integers(15, 70)))
        genre = '"Comedy, Drama"' if i % 3 == 0 else "Action"
        rows.append([user, movie, rating, ts, age, genre])
    return rows


def _write_csv(path: Path, rows: list[list[str]], header: str | None = HEADER, delimiter: str = ",") -> Path:
    text = "".join(delimiter.join(r) + "\n" for r in ([header.split(",")] if header else []) + rows)
    path.write_text(text)
    return path


def _spec(tmp_path: Path, files=("ratings.csv",), **kw) -> Path:
    raw = {"name": "movielens", "files": list(files), "label": {"column": "rating", "positive": ">= 4"},
           "categorical": ["user_id", "movie_id", "genre"], "dense": ["age"],
           "split": {"kind": "time", "column": "timestamp"}, **kw}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_movielens_like_time_split_exact(tmp_path):
    rows = _ratings()
    _write_csv(tmp_path / "ratings.csv", rows)
    m = prepare_csv(_spec(tmp_path), tmp_path / "out")
    data = load_csv(tmp_path / "out")
    assert data.name == "movielens" and data.field_names == ("user_id", "movie_id", "genre")
    assert m["format"] == "embcompress-csv" and m["complete"] is True and m["rows"] == 200
    assert data.splits == {"train": (0, 160), "val": (160, 180), "test": (180, 200)}
    # reference in plain Python: rows sorted by time (stable), label rating >= 4, age log1p, missing -> 0
    order = sorted(range(len(rows)), key=lambda i: int(rows[i][3]))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "row_order.npy"), order)
    np.testing.assert_array_equal(data.labels, [float(float(rows[i][2]) >= 4) for i in order])
    np.testing.assert_allclose(data.dense[:, 0], [math.log1p(int(rows[i][4])) if rows[i][4] else 0.0 for i in order],
                               rtol=1e-6)
    assert m["positives"] == sum(float(r[2]) >= 4 for r in rows)
    for f, (name, col) in enumerate([("user_id", 0), ("movie_id", 1), ("genre", 5)]):
        values = [rows[i][col].strip('"') for i in order]
        counts = Counter(values)
        ranked = sorted(counts, key=lambda v: (-counts[v], v))
        assert data.cardinalities[f] == len(ranked) + 1
        assert decode_ids(tmp_path / "out", name, data.sparse[:, f]) == values
        np.testing.assert_array_equal(data.sparse[:, f], [ranked.index(v) for v in values])
        np.testing.assert_array_equal(encode_values(tmp_path / "out", name, values), data.sparse[:, f])
    assert encode_values(tmp_path / "out", "user_id", ["nobody"]).tolist() == [data.cardinalities[0] - 1]
    times = [int(rows[i][3]) for i in order]
    assert max(times[:160]) <= min(times[160:180]) and max(times[160:180]) <= min(times[180:])


def test_random_split_is_seeded_and_matches_the_time_rows(tmp_path):
    _write_csv(tmp_path / "ratings.csv", _ratings())
    prepare_csv(_spec(tmp_path), tmp_path / "t")
    a = prepare_csv(_spec(tmp_path, split={"kind": "random", "seed": 3}), tmp_path / "a")
    prepare_csv(_spec(tmp_path, split={"kind": "random", "seed": 3}), tmp_path / "b")
    prepare_csv(_spec(tmp_path, split={"kind": "random", "seed": 4}), tmp_path / "c")
    assert a["splits"] == {"train": [0, 160], "val": [160, 180], "test": [180, 200]}
    da, db, dc, dt = (load_csv(tmp_path / x) for x in "abct")
    np.testing.assert_array_equal(da.sparse, db.sparse)
    assert not np.array_equal(da.sparse, dc.sparse)
    # both hold the same input rows: map each back to input order with row_order
    inv_a = np.argsort(np.load(tmp_path / "a" / "row_order.npy"))
    inv_t = np.argsort(np.load(tmp_path / "t" / "row_order.npy"))
    np.testing.assert_array_equal(da.sparse[inv_a], dt.sparse[inv_t])
    np.testing.assert_array_equal(da.labels[inv_a], dt.labels[inv_t])


def test_tsv_without_header_gz_two_files_and_string_label(tmp_path):
    rows = [["u1", "click", "3"], ["u2", "view", ""], ["u1", "view", "10"], ["u3", "click", "-4"]]
    (tmp_path / "a.tsv.gz").write_bytes(gzip.compress("".join("\t".join(r) + "\n" for r in rows[:2]).encode()))
    _write_csv(tmp_path / "b.tsv", rows[2:], header=None, delimiter="\t")
    spec = CSVSpec(name="events", files=(str(tmp_path / "a.tsv.gz"), str(tmp_path / "b.tsv")),
                   label=LabelSpec("event", '== "click"'), categorical=("user",), dense=("x",), delimiter="\t",
                   header=False, columns=("user", "event", "x"), dense_transform="none",
                   split=SplitSpec(kind="random", seed=0))
    m = prepare_csv(spec, tmp_path / "o")
    data = load_csv(tmp_path / "o")
    inv = np.argsort(np.load(tmp_path / "o" / "row_order.npy"))
    assert data.labels[inv].tolist() == [1, 0, 0, 1]
    assert data.dense[inv, 0].tolist() == [3, 0, 10, -4]  # none: as read; missing -> 0
    assert decode_ids(tmp_path / "o", "user", data.sparse[inv, 0]) == ["u1", "u2", "u1", "u3"]
    assert [s["rows"] for s in m["sources"]] == [2, 2]


def test_label_without_rule_must_be_0_or_1(tmp_path):
    _write_csv(tmp_path / "c.csv", [["a", "1"], ["b", "0"], ["c", "2"]], header="item,clicked")
    spec = CSVSpec(name="c", files=(str(tmp_path / "c.csv"),), label=LabelSpec("clicked"), categorical=("item",))
    with pytest.raises(ValueError, match=r"c\.csv: line 4: column 'clicked' = '2', expected 0 or 1"):
        prepare_csv(spec, tmp_path / "o")


@pytest.mark.parametrize("line, match", [
    ("u1,m1,4,1000,abc,Action", r"line 4: column 'age' = 'abc', expected a number or empty"),
    ("u1,m1,good,1000,30,Action", r"line 4: column 'rating' = 'good', expected a number"),
    ("u1,m1,4,,30,Action", r"line 4: column 'timestamp' = '', expected a number"),
    ("u1,m1,4,1000,30", r"line 4: 5 fields, expected 6"),
    ("", r"line 4: empty line"),
])
def test_bad_values_name_file_line_and_column(tmp_path, line, match):
    rows = [",".join(r) for r in _ratings(5)]
    (tmp_path / "ratings.csv").write_text("\n".join([HEADER, *rows[:2], line, *rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"ratings\.csv: " + match):
        prepare_csv(_spec(tmp_path), tmp_path / "o")
    m = prepare_csv(_spec(tmp_path, on_bad_line="skip"), tmp_path / "s", block_rows=2)
    assert m["rows"] == 5 and m["skipped"]["total"] == 1 and m["skipped"]["first"] == ["ratings.csv:4"]
    (tmp_path / "ref").mkdir()  # the same file without the bad line gives the same arrays
    _write_csv(tmp_path / "ref" / "ratings.csv", _ratings(5))
    prepare_csv(_spec(tmp_path / "ref"), tmp_path / "r")
    for name in ("labels", "dense", "sparse"):
        np.testing.assert_array_equal(np.load(tmp_path / "s" / f"{name}.npy"), np.load(tmp_path / "r" / f"{name}.npy"))


def test_first_bad_line_is_reported_whatever_its_column(tmp_path):
    rows = [",".join(r) for r in _ratings(6)]
    rows[4] = "u1,m1,4,1000,xx,Action"  # dense problem on line 6
    rows[1] = "u1,m1,4,zz,30,Action"  # time problem on line 3: the first
    (tmp_path / "ratings.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    with pytest.raises(ValueError, match=r"line 3: column 'timestamp'"):
        prepare_csv(_spec(tmp_path), tmp_path / "o")
    m = prepare_csv(_spec(tmp_path, on_bad_line="skip"), tmp_path / "s")
    assert m["skipped"]["first"] == ["ratings.csv:3", "ratings.csv:6"]
    assert m["skipped"]["by_reason"] == {"time": 1, "dense": 1}


def test_min_count_cap_and_blocks(tmp_path):
    rows = _ratings(300, seed=1)
    _write_csv(tmp_path / "ratings.csv", rows)
    full = prepare_csv(_spec(tmp_path), tmp_path / "full", block_rows=1000)
    small = prepare_csv(_spec(tmp_path), tmp_path / "small", block_rows=3)
    for name in ("labels", "dense", "sparse"):
        np.testing.assert_array_equal(np.load(tmp_path / "full" / f"{name}.npy"),
                                      np.load(tmp_path / "small" / f"{name}.npy"))
    assert small["cardinalities"] == full["cardinalities"]
    m = prepare_csv(_spec(tmp_path, min_count=5, max_rows_per_field=4), tmp_path / "mc")
    users = Counter(r[0] for r in rows)
    kept = sorted((u for u in users if users[u] >= 5), key=lambda u: (-users[u], u))[:3]
    assert m["cardinalities"][0] == len(kept) + 1
    assert decode_ids(tmp_path / "mc", "user_id", range(len(kept) + 1)) == kept + [None]


def test_spec_validation_names_the_bad_value(tmp_path):
    _write_csv(tmp_path / "ratings.csv", _ratings(5))
    with pytest.raises(ValueError, match=r"spec\.yaml: unknown key\(s\) \['labels'\]"):
        load_spec(_spec(tmp_path, labels="x"))
    with pytest.raises(ValueError, match="split kind 'time' needs split.column"):
        load_spec(_spec(tmp_path, split={"kind": "time"}))
    with pytest.raises(ValueError, match="split.kind must be 'random' or 'time', got 'days'"):
        load_spec(_spec(tmp_path, split={"kind": "days"}))
    with pytest.raises(ValueError, match=r"\['age'\] named twice"):
        load_spec(_spec(tmp_path, dense=["age", "age"]))
    with pytest.raises(ValueError, match="min_count must be an int >= 1, got 0"):
        load_spec(_spec(tmp_path, min_count=0))
    with pytest.raises(ValueError, match="label rule '~= 4'"):
        load_spec(_spec(tmp_path, label={"column": "rating", "positive": "~= 4"}))
    with pytest.raises(ValueError, match="the header has no column\\(s\\) \\['stars'\\]"):
        prepare_csv(_spec(tmp_path, label={"column": "stars", "positive": ">= 4"}), tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        prepare_csv(_spec(tmp_path, files=["nope.csv"]), tmp_path / "o")


@pytest.mark.parametrize("text, expected", [
    (">= 4", (">=", 4.0)), ("> 3.5", (">", 3.5)), ("<=-1", ("<=", -1.0)), ("< 1e3", ("<", 1000.0)),
    ("== 1", ("==", 1.0)), ("!= 0", ("!=", 0.0)), ('== "yes"', ("==", "yes")), ("!= 'a b'", ("!=", "a b")),
])
def test_parse_comparison(text, expected):
    assert parse_comparison(text) == expected


@pytest.mark.parametrize("text", ["4", ">= four", "=> 4", '>= "4"', "== __import__('os')", ">= 4 or 1", ""])
def test_parse_comparison_rejects(text):
    with pytest.raises(ValueError, match="label rule"):
        parse_comparison(text)


def test_cli_and_bench_suite_on_a_csv_data_set(tmp_path, capsys):
    _write_csv(tmp_path / "ratings.csv", _ratings(400))
    assert cli_main(["data", "csv", str(_spec(tmp_path)), "--out", str(tmp_path / "ml"), "--quiet"]) == 0
    assert "movielens: 400 rows" in capsys.readouterr().out
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "ml", "data": {"criteo": {"path": str(tmp_path / "ml")}}, "embedding_dim": 4,
        "model": {"type": "dlrm.v1", "bottom_mlp": [4], "top_mlp": [4]},
        "train": {"epochs": 1, "batch_size": 64}, "methods": [{"name": "full", "table": {"type": "full.v1"}}]}))
    data = load_data(load_suite(suite))
    assert data.field_names == ("user_id", "movie_id", "genre") and data.num_dense == 1
    assert cli_main(["bench", "run", str(suite), "--out", str(tmp_path / "res"), "--quiet"]) == 0
    reference, record = [json.loads(line) for line in (tmp_path / "res" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and 0 <= record["test_auc"] <= 1
    assert reference["status"] == "reference" and 0 <= reference["test_auc"] <= 1  # the LR row on CSV data too


def test_out_dir_rules_and_incomplete_manifest(tmp_path):
    _write_csv(tmp_path / "ratings.csv", _ratings(20))
    prepare_csv(_spec(tmp_path), tmp_path / "o")
    prepare_csv(_spec(tmp_path), tmp_path / "o")  # the same data set again: rebuilt
    with pytest.raises(ValueError, match="another data set"):
        prepare_csv(_spec(tmp_path, min_count=2), tmp_path / "o")
    m = read_manifest(tmp_path / "o")
    m["complete"] = False
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="incomplete.*embcompress data csv"):
        load_criteo(tmp_path / "o")
    assert prepare_csv(_spec(tmp_path), tmp_path / "o")["complete"] is True  # a killed run is simply redone
