"""Data preparation under faults and hostile input (issue 14, items 1-6): full or read-only disks, bad bytes,
column names that look like paths, overflowing numbers, reruns over a finished data set, odd inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import yaml

import embcompress.criteo as criteo
from embcompress.cli import main as cli_main
from embcompress.criteo import decode_ids, encode_values, load_criteo, prepare_criteo, read_manifest
from embcompress.csvdata import load_spec, parse_comparison, prepare_csv
from embcompress.prepared import DataWarning, OutputError

_Usage = namedtuple("_Usage", "total used free")


def _line(label="0", dense="1", cat="0a1b2c3d") -> str:
    return "\t".join([label] + [dense] * 13 + [cat] * 26)


def _tsv(path: Path, n: int = 40) -> Path:
    path.write_text("".join(_line(label=str(i % 2), cat=f"{i % 7:08x}") + "\n" for i in range(n)))
    return path


def _csv(tmp_path: Path, rows: list[str] | None, header: str = "user,item,rating,age", **spec) -> Path:
    """A spec of ``r.csv`` beside it, and that file (``rows=None``: left as it is)."""
    if rows is not None:
        (tmp_path / "r.csv").write_text("\n".join([header, *rows]) + "\n")
    raw = {"name": "r", "files": ["r.csv"], "label": {"column": "rating", "positive": ">= 4"},
           "categorical": ["user", "item"], "dense": ["age"], "split": {"kind": "random", "seed": 0}, **spec}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "spec.yaml"


def _rows(n: int = 20) -> list[str]:
    return [f"u{i % 5},i{i % 3},{1 + i % 5},{20 + i}" for i in range(n)]


def _make_read_only(folder: Path) -> None:
    """chmod 555, or skip where that does not stop writes (root, unless run without CAP_DAC_OVERRIDE)."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()
    folder.chmod(0o755)
    pytest.skip("file permissions do not apply to this user (root)")


def _enospc(*_args, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------ 1. disk full / read-only
def test_criteo_free_space_checked_before_pass_1(tmp_path, monkeypatch):
    src = _tsv(tmp_path / "a.tsv")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OutputError, match=r"embcompress-spill: not enough free disk space .* bytes needed, 100 free"):
        prepare_criteo(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_criteo_free_space_checked_before_pass_2(tmp_path, monkeypatch):
    src = _tsv(tmp_path / "a.tsv")
    # room for the temporary rows of pass 1, not for the arrays: 40 rows x (4 + 13 * 4 + 26 * 1) bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 0, 10**9 if "spill" in str(p) else 1000))
    with pytest.raises(OutputError, match=rf"{tmp_path.name}.*not enough free disk space .*: [0-9,]+ bytes "
                                          r"needed, 1,000 free"):
        prepare_criteo(src, tmp_path / "o")
    assert not (tmp_path / "o" / "sparse.npy").exists()
    monkeypatch.undo()
    assert prepare_criteo(src, tmp_path / "o")["complete"] is True


def test_criteo_disk_full_in_pass_2_is_one_clear_error_not_sigbus(tmp_path, monkeypatch):
    src = _tsv(tmp_path / "a.tsv")
    # a full disk: the allocation of the memory-mapped outputs fails (instead of a SIGBUS when a page is written)
    monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    with pytest.raises(OutputError, match=r"labels\.npy: No space left on device"):
        prepare_criteo(src, tmp_path / "o")
    assert read_manifest(tmp_path / "o")["complete"] is False  # recognisably incomplete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "o"]  # the temporary rows are gone
    monkeypatch.undo()
    assert prepare_criteo(src, tmp_path / "o")["complete"] is True


def test_criteo_disk_full_in_pass_1_and_vocab_save(tmp_path, monkeypatch):
    src = _tsv(tmp_path / "a.tsv")
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, _data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_spill(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        return Full(fh) if Path(path).name == "rows.bin" and "w" in mode else fh

    monkeypatch.setattr(criteo, "open", full_spill, raising=False)
    with pytest.raises(OutputError, match=r"No space left on device .*while preparing .*\bo\b"):
        prepare_criteo(src, tmp_path / "o")
    monkeypatch.undo()
    monkeypatch.setattr(np, "save", _enospc)
    with pytest.raises(OutputError, match=r"No space left on device") as err:
        prepare_criteo(src, tmp_path / "o")
    assert "\n" not in str(err.value) and str(tmp_path / "o") in str(err.value)
    assert read_manifest(tmp_path / "o")["complete"] is False
    monkeypatch.undo()
    assert prepare_criteo(src, tmp_path / "o")["complete"] is True


def test_csv_disk_full(tmp_path, monkeypatch):
    spec = _csv(tmp_path, _rows())
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 0, 10))
    with pytest.raises(OutputError, match=r"not enough free disk space .* bytes needed, 10 free"):
        prepare_csv(spec, tmp_path / "o")
    monkeypatch.undo()
    monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    with pytest.raises(OutputError, match=r"\.npy: No space left on device"):
        prepare_csv(spec, tmp_path / "o")
    assert read_manifest(tmp_path / "o")["complete"] is False
    monkeypatch.undo()
    monkeypatch.setattr(json, "dump", _enospc)
    with pytest.raises(OutputError, match=r"No space left on device"):
        prepare_csv(spec, tmp_path / "p")
    monkeypatch.undo()
    assert prepare_csv(spec, tmp_path / "o")["complete"] is True


def test_cli_prints_disk_full_as_one_line(tmp_path, monkeypatch, capsys):
    src = _tsv(tmp_path / "a.tsv")
    monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    assert cli_main(["data", "criteo", str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embcompress: error: ") and "No space left on device" in err


def test_unwritable_lock_is_one_clear_error(tmp_path, monkeypatch):
    """What a read-only folder gives even to root: the lock file beside the output cannot be created."""
    import embcompress.prepared as prepared

    src = _tsv(tmp_path / "a.tsv")
    real_open = open

    def read_only(path, *a, **kw):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(prepared, "open", read_only, raising=False)
    with pytest.raises(OutputError, match=r"\.o\.embcompress-spill\.lock: Permission denied"):
        prepare_criteo(src, tmp_path / "o")
    with pytest.raises(OutputError, match=r"Permission denied"):
        prepare_csv(_csv(tmp_path, _rows()), tmp_path / "c")


def test_read_only_parent_folder(tmp_path):
    src = _tsv(tmp_path / "a.tsv")
    spec = _csv(tmp_path, _rows())
    ro = tmp_path / "ro"
    ro.mkdir()
    _make_read_only(ro)
    try:
        with pytest.raises(OutputError, match=r"ro.*Permission denied"):
            prepare_criteo(src, ro / "o")
        with pytest.raises(OutputError, match=r"ro.*Permission denied"):
            prepare_csv(spec, ro / "o")
        assert cli_main(["data", "criteo", str(src), "--out", str(ro / "o"), "--quiet"]) == 2
    finally:
        ro.chmod(0o755)


def test_read_only_output_folder(tmp_path):
    src = _tsv(tmp_path / "a.tsv")
    out = tmp_path / "o"
    out.mkdir()
    _make_read_only(out)
    try:
        with pytest.raises(OutputError, match=rf"{out.name}: .*not writable"):
            prepare_criteo(src, out)
        with pytest.raises(OutputError, match=rf"{out.name}: .*not writable"):
            prepare_csv(_csv(tmp_path, _rows()), out)
    finally:
        out.chmod(0o755)
    prepare_criteo(src, out)
    out.chmod(0o555)  # a finished data set on a read-only folder is still recognised
    try:
        assert prepare_criteo(src, out)["already_prepared"] is True
    finally:
        out.chmod(0o755)


# ------------------------------------------------------------------------------------ 2. invalid UTF-8
@pytest.mark.parametrize("block_rows", [2, 1000])
def test_criteo_invalid_utf8_names_file_and_line_and_is_skippable(tmp_path, block_rows):
    good = [_line().encode()] * 5
    bad = "\t".join(["0"] + ["1"] * 13 + ["0a1b2c3d"] * 5).encode() + b"\t\xff\xfe1b2c3d" + b"\t0a1b2c3d" * 20
    src = tmp_path / "bad.tsv"
    src.write_bytes(b"\n".join(good + [bad] + [_line(label="1").encode()] * 3) + b"\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: line 6: bad line \(encoding: invalid UTF-8 in field C6"):
        prepare_criteo(src, tmp_path / "o", block_rows=block_rows)
    m = prepare_criteo(src, tmp_path / "s", on_bad_line="skip", block_rows=block_rows)
    assert m["rows"] == 8 and m["skipped"]["by_reason"] == {"encoding": 1} and m["skipped"]["first"] == ["bad.tsv:6"]


@pytest.mark.parametrize("block_rows", [2, 1000])
def test_csv_invalid_utf8_names_file_line_and_column_and_is_skippable(tmp_path, block_rows):
    rows = [r.encode() for r in _rows(6)]
    rows[3] = b"u1,i\xe9,4,30"  # latin-1, not UTF-8: line 5 (the header is line 1)
    (tmp_path / "r.csv").write_bytes(b"\n".join([b"user,item,rating,age", *rows]) + b"\n")
    spec = _csv(tmp_path, None)
    with pytest.raises(ValueError, match=r"r\.csv: line 5: invalid UTF-8 in column 'item'"):
        prepare_csv(spec, tmp_path / "o", block_rows=block_rows)
    m = prepare_csv(_csv(tmp_path, None, on_bad_line="skip"), tmp_path / "s", block_rows=block_rows)
    assert m["rows"] == 5 and m["skipped"]["by_reason"] == {"encoding": 1} and m["skipped"]["first"] == ["r.csv:5"]


# ------------------------------------------------------------------------------------ 3. column names as paths
def test_csv_column_names_never_become_paths(tmp_path):
    outside = tmp_path / "abs"
    names = ["../../escaped", str(outside), "a/b", "a_b"]
    rows = [f"x{i % 3},y{i % 2},z{i % 4},w{i},{i % 5}" for i in range(20)]
    (tmp_path / "w").mkdir()
    spec = _csv(tmp_path / "w", rows, header=",".join(names + ["rating"]), categorical=names, dense=[])
    out = tmp_path / "o"  # before: o/vocab/../../escaped.json is tmp_path/escaped.json
    prepare_csv(spec, out)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(p.startswith(("w/", "o/")) for p in written), written
    assert not (tmp_path / "escaped.json").exists() and not outside.with_suffix(".json").exists()
    assert sorted(p.name for p in (out / "vocab").iterdir()) == [f"field_{k:03d}.json" for k in range(4)]
    data = load_criteo(out)
    assert data.field_names == tuple(names)
    for f, name in enumerate(names):
        raw = [r.split(",")[f] for r in rows]
        order = np.load(out / "row_order.npy")
        assert decode_ids(out, name, data.sparse[:, f]) == [raw[i] for i in order]
        np.testing.assert_array_equal(encode_values(out, name, [raw[i] for i in order]), data.sparse[:, f])


def test_criteo_vocab_refuses_a_field_name_from_a_tampered_manifest(tmp_path):
    prepare_criteo(_tsv(tmp_path / "a.tsv"), tmp_path / "o")
    m = read_manifest(tmp_path / "o")
    m["schema"]["sparse"][0] = "../../../etc/x"
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"field name '../../../etc/x'"):
        criteo.load_vocab(tmp_path / "o", 0)


# ------------------------------------------------------------------------------------ 4. overflowing numbers
def test_csv_non_finite_dense_value_is_a_bad_value(tmp_path):
    rows = _rows(6)
    rows[2] = "u1,i1,4,1e400"
    with pytest.raises(ValueError, match=r"r\.csv: line 4: column 'age' = '1e400', expected a finite number"):
        prepare_csv(_csv(tmp_path, rows), tmp_path / "o")
    m = prepare_csv(_csv(tmp_path, rows, on_bad_line="skip"), tmp_path / "s")
    assert m["rows"] == 5 and m["skipped"]["first"] == ["r.csv:4"] and m["skipped"]["by_reason"] == {"dense": 1}
    assert np.isfinite(np.load(tmp_path / "s" / "dense.npy")).all()
    rows[2] = "u1,i1,4,1e39"  # finite as float64, inf as the float32 stored without a transform
    with pytest.raises(ValueError, match=r"line 4: column 'age' = '1e39', expected a finite number"):
        prepare_csv(_csv(tmp_path, rows, dense_transform="none"), tmp_path / "n")
    rows[2] = "u1,i1,1e400,3"  # a label that overflows would be positive (inf >= 4)
    with pytest.raises(ValueError, match=r"line 4: column 'rating' = '1e400', expected a finite number"):
        prepare_csv(_csv(tmp_path, rows), tmp_path / "l")


def test_non_finite_label_rule_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"label rule '>= 1e400'.*not a finite number"):
        parse_comparison(">= 1e400")
    with pytest.raises(ValueError, match=r"spec\.yaml: .*label rule '>= 1e400'"):
        load_spec(_csv(tmp_path, _rows(), label={"column": "rating", "positive": ">= 1e400"}))


def test_split_without_positives_warns_and_is_recorded(tmp_path, capsys):
    spec = _csv(tmp_path, _rows(), label={"column": "rating", "positive": ">= 100"})
    with pytest.warns(DataWarning, match=r"split 'train' has no positive") as caught:
        m = prepare_csv(spec, tmp_path / "o")
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller of prepare_csv
    assert any("'train' has no positive" in w for w in m["warnings"])
    assert read_manifest(tmp_path / "o")["warnings"] == m["warnings"]
    assert m["split_positives"] == {"train": 0, "val": 0, "test": 0}
    src = tmp_path / "n.tsv"
    src.write_text("".join(_line(label="1") + "\n" for _ in range(30)))
    assert cli_main(["data", "criteo", str(src), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: split 'train' has no negative" in err and "warning: split 'test' has no negative" in err
    assert read_manifest(tmp_path / "c")["split_positives"] == {"train": 26, "test": 2, "val": 2}


# ------------------------------------------------------------------------------------ 5. reruns
def test_criteo_rerun_is_already_prepared_force_rebuilds_aside(tmp_path, capsys):
    src = _tsv(tmp_path / "a.tsv")
    out = tmp_path / "o"
    prepare_criteo(src, out)
    inode = (out / "sparse.npy").stat().st_ino
    m = prepare_criteo(src, out)
    assert m["already_prepared"] is True and (out / "sparse.npy").stat().st_ino == inode  # nothing rewritten
    assert cli_main(["data", "criteo", str(src), "--out", str(out), "--quiet"]) == 0
    assert "already prepared" in capsys.readouterr().out
    m = prepare_criteo(src, out, force=True)
    assert "already_prepared" not in m and (out / "sparse.npy").stat().st_ino != inode
    with pytest.raises(ValueError, match="another data set.*--force"):
        prepare_criteo(src, out, min_count=2)
    assert cli_main(["data", "criteo", str(src), "--out", str(out), "--quiet", "--min-count", "2", "--force"]) == 0
    assert read_manifest(out)["options"]["min_count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "o"]


def test_criteo_failed_rebuild_leaves_the_old_data_set(tmp_path, monkeypatch):
    src = _tsv(tmp_path / "a.tsv")
    out = tmp_path / "o"
    prepare_criteo(src, out)
    before = {n: (out / n).read_bytes() for n in ("manifest.json", "sparse.npy", "labels.npy")}

    def killed(*_a, **_kw):
        raise KeyboardInterrupt  # as a kill in the middle of pass 2 (an exception cannot be caught for SIGKILL)

    monkeypatch.setattr(os, "posix_fallocate", killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_criteo(src, out, min_count=2, force=True)
    assert {n: (out / n).read_bytes() for n in before} == before
    monkeypatch.undo()
    assert load_criteo(out).labels.shape == (40,)


@pytest.mark.slow
def test_criteo_sigkill_during_forced_rebuild_keeps_the_old_data_set(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = _write_big(tmp_path / "big.tsv")
    out = tmp_path / "o"
    prepare_criteo(src, out)
    before = (out / "sparse.npy").read_bytes()
    code = (f"from embcompress.criteo import prepare_criteo; "
            f"prepare_criteo({str(src)!r}, {str(out)!r}, block_rows=20, min_count=2, force=True)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    rows = tmp_path / ".o.embcompress-spill" / "rows.bin"
    deadline = time.monotonic() + 60
    while not (rows.exists() and rows.stat().st_size > 0) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        assert proc.returncode == 0, "the forced rebuild failed"
        pytest.skip("the preparation finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(out)["complete"] is True and (out / "sparse.npy").read_bytes() == before
    assert read_manifest(out)["options"]["min_count"] == 1
    m = prepare_criteo(src, out, min_count=2, force=True)  # the next run cleans up and rebuilds
    assert m["options"]["min_count"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tsv", "o"]


def _write_big(path: Path) -> Path:
    path.write_text("".join(_line(label=str(i % 2), cat=f"{i % 977:08x}") + "\n" for i in range(20000)))
    return path


def test_kill_between_the_two_renames_of_a_swap_is_repaired(tmp_path):
    src = _tsv(tmp_path / "a.tsv")
    out = tmp_path / "o"
    prepare_criteo(src, out)
    os.replace(out, tmp_path / ".o.embcompress-old")  # the old one moved away, the new one not yet in place
    m = prepare_criteo(src, out)
    assert m["already_prepared"] is True and sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "o"]


def test_csv_rerun_lock_and_checksum(tmp_path):
    import fcntl

    spec = _csv(tmp_path, _rows())
    out = tmp_path / "o"
    prepare_csv(spec, out)
    assert prepare_csv(spec, out)["already_prepared"] is True
    with open(tmp_path / ".o.embcompress-spill.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live run holds it
        with pytest.raises(ValueError, match="another preparation of .* is running"):
            prepare_csv(spec, out, force=True)
    text = (tmp_path / "r.csv").read_text()
    (tmp_path / "r.csv").write_text(text.replace("u1,", "u7,"))  # same name and size, other content
    with pytest.raises(ValueError, match=r"other inputs \(sha256 differs\)"):
        prepare_csv(spec, out)
    m = prepare_csv(spec, out, force=True)
    assert "already_prepared" not in m and "u7" in decode_ids(out, "user", range(5))
    assert cli_main(["data", "csv", str(spec), "--out", str(out), "--quiet"]) == 0
    assert cli_main(["data", "csv", str(spec), "--out", str(out), "--quiet", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "r.csv", "spec.yaml"]


# ------------------------------------------------------------------------------------ 6. odd inputs
def test_a_directory_as_input_says_so(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"'.*d' is a directory; expected a file"):
        prepare_criteo(tmp_path / "d", tmp_path / "o")
    spec = _csv(tmp_path, _rows(), files=["d"])
    with pytest.raises(ValueError, match=r"'.*d' is a directory; expected a file"):
        prepare_csv(spec, tmp_path / "o")
    with pytest.raises(ValueError, match=r"spec .* is a directory; expected a file"):
        load_spec(tmp_path / "d")
    assert cli_main(["data", "criteo", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--quiet"]) == 2


@pytest.mark.parametrize("text", ["[1, 2, 3]", "{not json", '"a string"'])
def test_a_manifest_that_is_not_an_object_names_the_file(tmp_path, text):
    src = _tsv(tmp_path / "a.tsv")
    prepare_criteo(src, tmp_path / "o")
    (tmp_path / "o" / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=r"o/manifest\.json: .*(JSON object|not valid JSON)"):
        read_manifest(tmp_path / "o")
    with pytest.raises(ValueError, match=r"o/manifest\.json: "):
        load_criteo(tmp_path / "o")
    with pytest.raises(ValueError, match=r"o/manifest\.json: "):
        prepare_criteo(src, tmp_path / "o", force=True)
    with pytest.raises(ValueError, match=r"o/manifest\.json: "):
        prepare_csv(_csv(tmp_path, _rows()), tmp_path / "o")


# ------------------------------------------------------------------------------------ review of the fixes above
def _prepare(kind: str, tmp_path: Path):
    """A preparation of a small data set into a given folder: Criteo (a.tsv) or CSV (spec.yaml)."""
    if kind == "criteo":
        src = _tsv(tmp_path / "a.tsv")
        return lambda out, **kw: prepare_criteo(src, out, **kw)
    spec = load_spec(_csv(tmp_path, _rows()))

    def prep(out, min_count=1, **kw):
        return prepare_csv(dataclasses.replace(spec, min_count=min_count), out, **kw)

    return prep


@pytest.mark.parametrize("kind", ["criteo", "csv"])
def test_redo_in_place_counts_the_files_it_replaces_as_free(tmp_path, monkeypatch, kind):
    prep = _prepare(kind, tmp_path)
    out = tmp_path / "o"
    prep(out)
    m = read_manifest(out)
    m["complete"] = False  # what a kill in pass 2 leaves: the arrays allocated, the manifest incomplete
    (out / "manifest.json").write_text(json.dumps(m))
    # 100 bytes free beside the old arrays (pass 1's temporary rows fit): the data set fits only in their place
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 0, 10**9 if "-spill" in str(p) else 100))
    with pytest.raises(OutputError, match=r"not enough free disk space .* bytes needed, 100 free"):
        prep(tmp_path / "fresh")
    m = prep(out)
    assert m["complete"] is True and "already_prepared" not in m


def test_stale_spill_folder_is_removed_by_any_next_run(tmp_path):
    src = _tsv(tmp_path / "a.tsv")
    spec = _csv(tmp_path, _rows())
    prepare_criteo(src, tmp_path / "o")
    prepare_csv(spec, tmp_path / "c")
    runs = [lambda: prepare_criteo(src, tmp_path / "o"),  # already prepared
            lambda: prepare_criteo(src, tmp_path / "o", min_count=2),  # refused: other options
            lambda: prepare_csv(spec, tmp_path / "o"),  # refused: another data set, by the CSV pipeline
            lambda: prepare_csv(spec, tmp_path / "c")]  # a CSV data set already prepared
    for k, run in enumerate(runs):
        spill = tmp_path / (".c.embcompress-spill" if k == 3 else ".o.embcompress-spill")
        spill.mkdir()
        (spill / "rows.bin").write_bytes(b"\0" * 4096)  # what a run killed in pass 1 leaves (nobody holds the lock)
        with contextlib.suppress(ValueError):
            run()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tsv", "c", "o", "r.csv", "spec.yaml"], k


def test_a_lock_file_removed_by_its_holder_is_not_a_lock(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder removed it must not lock that orphan while a
    third run locks the file now at the path: two holders."""
    fcntl = pytest.importorskip("fcntl")
    import embcompress.prepared as prepared

    out = tmp_path / "o"
    lock_path = prepared.side_paths(out)["lock"]
    real_flock = fcntl.flock
    third = []

    def racing_flock(fd, op):
        if not third:  # between this run's open and its flock: the holder ends, another run starts
            lock_path.unlink()
            third.append(open(lock_path, "a+b"))
            real_flock(third[0].fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_flock(fd, op)

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path.touch()
    monkeypatch.setattr(fcntl, "flock", racing_flock)
    with pytest.raises(ValueError, match=r"another preparation of .*\bo is running"):
        with prepared.locked(out):
            pass
    third[0].close()
    monkeypatch.undo()
    with prepared.locked(out):
        assert lock_path.exists()
    assert not lock_path.exists()


@pytest.mark.parametrize("kind", ["criteo", "csv"])
def test_forced_rebuild_of_a_mount_point_fails_before_any_work(tmp_path, monkeypatch, kind):
    import embcompress.csvdata as csvdata

    prep = _prepare(kind, tmp_path)
    out = tmp_path / "o"
    prep(out)
    before = (out / "sparse.npy").read_bytes()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == str(out) or real_ismount(p))

    def no_pass_1(*_a, **_kw):
        raise AssertionError("pass 1 ran")

    monkeypatch.setattr(criteo if kind == "criteo" else csvdata, "_prepare", no_pass_1)
    with pytest.raises(OutputError, match=r"\bo is a mount point: a rebuild \(--force\) is written beside .*"
                                          r"subfolder of the mount"):
        prep(out, force=True)
    assert (out / "sparse.npy").read_bytes() == before
    assert prep(out)["already_prepared"] is True  # not a rebuild: a mount point is fine


@pytest.mark.skipif(os.sep != "/", reason="a backslash is a path separator here")
def test_version_1_csv_data_set_with_a_backslash_column(tmp_path):
    (tmp_path / "r.csv").write_text("a\\b,y\n" + "".join(f"u{i % 3},{i % 2}\n" for i in range(20)))
    (tmp_path / "spec.yaml").write_text("files: [r.csv]\nlabel: y\ncategorical: ['a\\b']\n")
    out = tmp_path / "o"
    prepare_csv(tmp_path / "spec.yaml", out)
    m = read_manifest(out)  # as embcompress before the vocabularies by position wrote it: vocab/<column>.json
    values = json.loads((out / "vocab" / "field_000.json").read_text())["values"]
    (out / "vocab" / "field_000.json").unlink()
    (out / "vocab" / "a\\b.json").write_text(json.dumps(values))
    m["version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    assert criteo.load_vocab(out, 0).tolist() == values  # a legal POSIX file name: read
    m["schema"]["sparse"][0] = "../b"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"column name '../b' is not a plain file name.*rebuild it with --force"):
        criteo.load_vocab(out, 0)


@pytest.mark.parametrize("kind", ["criteo", "csv"])
def test_read_only_folder_rerun_over_a_finished_data_set_is_already_prepared(tmp_path, monkeypatch, kind):
    import embcompress.prepared as prepared

    prep = _prepare(kind, tmp_path)
    out = tmp_path / "o"
    prep(out)
    real_open = open

    def read_only(path, *a, **kw):  # a read-only file system: the lock file cannot be opened for writing
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(prepared, "open", read_only, raising=False)
    assert prep(out)["already_prepared"] is True
    for kw in ({"force": True}, {"min_count": 2}):  # anything to write: the one-line error about the lock
        with pytest.raises(OutputError, match=r"\.o\.embcompress-spill\.lock: Read-only file system \(EROFS\)"):
            prep(out, **kw)
    with pytest.raises(OutputError, match=r"Read-only file system"):
        prep(tmp_path / "new")


def test_bad_lines_shared_counter():
    from embcompress import criteo_rows, csvdata, textreader

    assert criteo_rows.utf8_error is textreader.utf8_error and csvdata.utf8_error is textreader.utf8_error
    assert criteo.check_input_files is textreader.check_input_files is csvdata.check_input_files
    assert criteo.BadLines is textreader.BadLines is csvdata.BadLines
    bad = textreader.BadLines("skip", "hint")
    for line in range(12):
        bad.add(Path("d/f.csv"), line + 1, "dense" if line % 2 else "label", "detail")
    assert bad.skipped == {"total": 12, "by_reason": {"label": 6, "dense": 6},
                           "first": [f"f.csv:{k}" for k in range(1, 11)]}
    with pytest.raises(ValueError, match=r"^d/f\.csv: line 3: bad value; use skip$"):
        textreader.BadLines("error", "use skip").add(Path("d/f.csv"), 3, "dense", "bad value")
