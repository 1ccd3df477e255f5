"""The output folder of a data preparation (Criteo and CSV): lock, reuse or rebuild aside, disk space, OS errors.

:func:`embcompress.criteo.prepare_criteo` and :func:`embcompress.csvdata.prepare_csv` share these rules:

* **Lock.** A lock file ``.<out name>.embcompress-spill.lock`` beside ``out`` is held (``flock``) while a
  preparation runs: a second preparation of the same ``out`` is refused, and what a killed run left beside
  ``out`` (whose lock nobody holds: an aside build, a half-done swap, pass 1's temporary rows) is cleaned up
  by the next run, whatever it then does. The holder removes the lock file when it ends; a run that opened
  the file just before that removal locks a file no longer at the path, so after ``flock`` the open file must
  still be the one at the path, else the run opens the path again.
* **Reuse.** ``out`` holding a complete data set of the same format, options and inputs (names, sizes and
  sha256 of the input files, which costs one read of the inputs) is not rebuilt: the preparation returns its
  manifest with ``already_prepared: True``. ``force=True`` (``--force``) rebuilds it. A data set of other
  options or inputs is refused unless ``force``; a non-empty folder without ``manifest.json`` is always refused.
  Where the lock cannot be created because the folder beside ``out`` is read-only (``EROFS``, ``EACCES``,
  ``EPERM``), a finished identical data set is still recognised (read without the lock, nothing written);
  anything else to do is the one-line error about the lock.
* **Rebuild aside.** A rebuild over a complete data set is written to ``.<out name>.embcompress-new`` beside
  ``out`` and swapped in at the end (``out`` -> ``.<out name>.embcompress-old``, new -> ``out``, old removed),
  so a kill or an error leaves the old data set intact until the new one is complete. A kill between the two
  renames is repaired by the next run (the new folder is put in place if complete, else the old one is put
  back). A fresh folder, or one left incomplete by a killed run, is written in place: it holds
  ``manifest.json`` with ``complete: false`` until the end, so an interrupted run stays recognisable.
  ``out`` that is a mount point cannot be renamed, so a rebuild aside of it is refused before any work.
* **Disk space and write errors.** Free space (``shutil.disk_usage``) is checked against what will be written
  before it is written (counting as free the files of an earlier run in the folder that the write replaces),
  and the memory-mapped outputs are allocated (``posix_fallocate``) before they are
  mapped: a full disk is then an ``OSError`` at allocation, not a ``SIGBUS`` at the first unbacked page.
  Every ``OSError`` met while preparing becomes one :class:`OutputError` line naming the file (or folder) and
  the error.

What is written inside the folder (arrays, vocabularies, manifest) is :mod:`embcompress.dataformat`; the inputs
are read through :mod:`embcompress.textreader`.
"""

from __future__ import annotations

import contextlib
import errno as errno_
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from .dataformat import FORMATS, MANIFEST, combined_sha256, read_manifest
from .dataformat import DataWarning  # noqa: F401 (the warning of a preparation: callers import it from here)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock; leftovers are still removed
    fcntl = None

__all__ = ["OutputError", "DataWarning", "Target", "prepare_into", "locked", "target", "side_paths",
           "check_free_space", "allocate", "os_errors", "naming", "write_json_atomic", "sha256_file"]


class OutputError(ValueError):
    """The output cannot be written (disk full, read-only folder, ...): one line naming the file and the error."""


class _LockUnwritable(OutputError):
    """The lock file cannot be created: the folder beside the output is read-only (or not ours to write)."""


# --------------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to a temporary file beside ``path`` and rename it over ``path`` (removed if writing fails)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with naming(path), open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a stray temp file would make the folder look like someone else's
            tmp.unlink()
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- errors, space
@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` that names no file (a failed write, flush or fsync) ``path`` as its file name."""
    try:
        yield
    except OSError as err:
        if err.filename or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err


def _describe(err: OSError) -> str:
    text = os.strerror(err.errno) if err.errno else str(err)
    name = errno_.errorcode.get(err.errno, "")
    return f"{text}{f' ({name})' if name else ''}"


@contextlib.contextmanager
def os_errors(folder: Path, after: str = "") -> Iterator[None]:
    """Turn an ``OSError`` into one :class:`OutputError` line: file (or ``folder``), error text, then ``after``."""
    try:
        yield
    except OSError as err:
        where = err.filename if err.filename else None
        msg = f"{where}: {_describe(err)} while preparing {folder}" if where else \
            f"{_describe(err)} while preparing {folder}"
        raise OutputError(msg + (f"; {after}" if after else "")) from err


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _allocated(path: Path) -> int:
    """Disk bytes of a file, or of the files under a folder (0 if missing): what removing or truncating frees."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        return sum(_allocated(Path(root) / f) for root, _, files in os.walk(path) for f in files)
    return st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size


def check_free_space(folder: Path, needed: int, what: str, replaces: Sequence[Path] = ()) -> None:
    """Refuse to write ``needed`` bytes into ``folder`` (or its nearest existing parent) when they do not fit.

    ``replaces``: files (or folders) already there that the write truncates or removes before it writes its
    own, e.g. the arrays of a run killed in pass 2: their bytes count as free, else such a run could not be
    redone in place on a disk that holds the data set once. (Allocation still catches what this misses.)
    """
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    reusable = sum(_allocated(p) for p in replaces)
    if needed > free + reusable:
        also = f" (+ {reusable:,} in the files it replaces)" if reusable else ""
        raise OutputError(f"{folder}: not enough free disk space for {what}: {needed:,} bytes needed, {free:,} "
                          f"free{also}")


def allocate(path: Path) -> None:
    """Reserve the disk blocks of a file just created (sparse) by ``open_memmap``, so that a full disk fails here
    with ENOSPC instead of killing the process with SIGBUS when a page of the mapping is first written."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows: nothing portable to do
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno_.EOPNOTSUPP, errno_.ENOSYS, errno_.EINVAL):  # a file system that cannot: go on
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- lock, reuse, swap
def side_paths(out: Path) -> dict[str, Path]:
    """What a preparation of ``out`` puts beside it: the lock, pass 1's temporary rows, the aside build, the old one."""
    out = _real(out)
    base = out.parent / f".{out.name}.embcompress"
    return {"lock": Path(f"{base}-spill.lock"), "spill": Path(f"{base}-spill"), "new": Path(f"{base}-new"),
            "old": Path(f"{base}-old")}


def _real(out: Path) -> Path:
    """``out`` with symlinks resolved: the folder that is renamed in a swap (never a link to it)."""
    return Path(os.path.realpath(out))


def _complete(folder: Path) -> bool:
    try:
        return read_manifest(folder).get("complete") is True
    except (OSError, ValueError):
        return False


def _recover(out: Path, progress: bool) -> None:
    """Under the lock: finish or undo a swap a kill interrupted, drop an unfinished aside build and pass 1's
    temporary rows (GBs at Kaggle scale) of a killed run, whatever this run then does."""
    side, out = side_paths(out), _real(out)
    if side["spill"].exists():
        if progress:
            print(f"removing {side['spill']}, left by an interrupted run", flush=True)
        shutil.rmtree(side["spill"])
    if side["old"].exists():
        if not out.exists():  # killed between the two renames of a swap
            keep = "new" if side["new"].exists() and _complete(side["new"]) else "old"
            if progress:
                print(f"{out} was being replaced when a run was interrupted: putting the {keep} data set in place",
                      flush=True)
            os.replace(side[keep], out)
        if side["old"].exists():
            shutil.rmtree(side["old"])
    if side["new"].exists():
        if progress:
            print(f"removing {side['new']}, left by an interrupted run", flush=True)
        shutil.rmtree(side["new"])


_READ_ONLY = (errno_.EROFS, errno_.EACCES, errno_.EPERM)


def _open_lock(lock_path: Path):
    try:
        with os_errors(lock_path.parent, "the folder beside the output must be writable (it holds the lock)"):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            return open(lock_path, "a+b")
    except OutputError as err:
        if isinstance(err.__cause__, OSError) and err.__cause__.errno in _READ_ONLY:
            raise _LockUnwritable(str(err)) from err.__cause__
        raise


def _acquire(out: Path, lock_path: Path):
    """The lock file, open and locked. A holder removes the file when it ends: a run that opened it just before
    locks a file no longer at the path (while a third run locks a new one), so it opens the path again."""
    while True:
        lock = _open_lock(lock_path)
        if fcntl is None:
            return lock
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ValueError(f"another preparation of {out} is running (it holds {lock_path}); wait for it "
                             "to finish or stop it") from None
        held = os.fstat(lock.fileno())
        try:
            at_path = os.stat(lock_path)
        except FileNotFoundError:
            at_path = None
        if at_path is not None and (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino):
            return lock
        lock.close()  # a removed lock file: locking it excludes nobody


@contextlib.contextmanager
def locked(out: Path, progress: bool = False) -> Iterator[None]:
    """Hold the lock of a preparation of ``out`` (refused if another run holds it); tidy up after killed runs."""
    lock_path = side_paths(out)["lock"]
    lock = _acquire(out, lock_path)
    try:
        try:
            with os_errors(out):
                _recover(out, progress)
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while still locked: see _acquire
    finally:
        lock.close()


def prepare_into(out: Path, fmt: str, options: dict, sources: list[dict], paths: Sequence[Path], build, *,
                 force: bool, option_defaults: dict | None = None, progress: bool = False) -> dict:
    """Run ``build(target) -> manifest`` under the lock of ``out``, unless ``out`` holds this data set already.

    :func:`target` decides where ``build`` writes (``target.build``); an ``OSError`` it meets is one
    :class:`OutputError` line, and an aside build it leaves after an error is removed.
    """
    try:
        with locked(out, progress):
            with os_errors(out):
                t = target(out, fmt, options, sources, paths, force=force, option_defaults=option_defaults,
                           progress=progress)
            if t.done is not None:
                return t.done
            try:
                with os_errors(out, t.failed_note()):
                    return build(t)
            except BaseException:
                t.discard()
                raise
    except _LockUnwritable:
        # a read-only folder: a finished identical data set is still "already prepared" (read only); a failed
        # check (other data set, incomplete, unreadable) says nothing the lock error does not: that one is raised
        if not force:
            with contextlib.suppress(OSError, ValueError):
                done = target(out, fmt, options, sources, paths, force=False, option_defaults=option_defaults,
                              progress=progress).done
                if done is not None:
                    return done
        raise


class Target:
    """Where a preparation of ``out`` writes (``build``: ``out`` itself, or the aside folder), and what was there.

    ``done``: the manifest of the identical complete data set already in ``out`` (nothing to do), else None.
    ``existing``: the manifest of the same data set left incomplete in ``out`` (checked against the inputs'
    checksum after pass 1), else None.
    """

    def __init__(self, out: Path, build: Path, existing: dict | None = None, done: dict | None = None):
        self.out, self.build, self.existing, self.done = out, build, existing, done

    @property
    def aside(self) -> bool:
        return self.build != self.out

    def check_checksum(self, checksum: str) -> None:
        if self.existing is not None and self.existing.get("source_sha256") not in (None, checksum):
            raise ValueError(f"output folder {self.out} already holds a data set of other inputs (sha256 differs); "
                             "choose another --out, or --force (force=True) to replace it")

    def begin(self) -> None:
        """Create the folder to write; over an incomplete earlier run, drop its vocabularies (other names maybe)."""
        if self.aside:
            shutil.rmtree(self.build, ignore_errors=True)
        self.build.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.build / "vocab", ignore_errors=True)

    def failed_note(self) -> str:
        """What an error leaves, for its message."""
        if self.aside:
            return f"the data set in {self.out} is unchanged"
        return f"{self.out} holds no complete data set (manifest complete: false or none); fix the cause and rerun"

    def discard(self) -> None:
        """After an error: remove an aside build (its space is wanted back); an in-place one stays incomplete."""
        if self.aside:
            shutil.rmtree(self.build, ignore_errors=True)

    def commit(self) -> None:
        """Put a complete aside build in place of ``out`` (two renames; see :func:`_recover` for a kill between)."""
        if not self.aside:
            return
        old, real = side_paths(self.out)["old"], _real(self.out)
        os.replace(real, old)
        try:
            os.replace(self.build, real)
        except BaseException:
            os.replace(old, real)  # the old data set back in place; the caller removes the new one
            raise
        shutil.rmtree(old, ignore_errors=True)


def _check_writable(folder: Path) -> None:
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: the output folder is not writable ({os.strerror(errno_.EACCES)})")


def target(out: Path, fmt: str, options: dict, sources: list[dict], paths: Sequence[Path], *, force: bool,
           option_defaults: dict | None = None, progress: bool = False) -> Target:
    """Decide, under :func:`locked`, what a preparation of ``out`` does (see the module docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if not out.exists():
        _check_writable(_existing_ancestor(out))
        return Target(out, out)
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise ValueError(f"output folder {out} is not empty and holds no {MANIFEST}; choose another --out")
        _check_writable(out)
        return Target(out, out)
    m = read_manifest(out)
    if m.get("format") not in FORMATS:
        raise ValueError(f"{out / MANIFEST} is not the manifest of an embcompress data set (format "
                         f"{m.get('format')!r}); choose another --out")
    old_options = m.get("options") if isinstance(m.get("options"), dict) else {}
    old_sources = m.get("sources") if isinstance(m.get("sources"), list) else []
    same = (m.get("format") == fmt and {**(option_defaults or {}), **old_options} == options
            and [(s.get("name"), s.get("bytes")) for s in old_sources if isinstance(s, dict)]
            == [(s["name"], s["bytes"]) for s in sources])
    complete = m.get("complete") is True
    if not same and not force:
        raise ValueError(f"output folder {out} already holds another data set (different inputs or options); "
                         "choose another --out, or --force (force=True) to replace it")
    if complete and not force:  # a read-only finished data set is still "already prepared"
        if progress:
            print(f"{out} holds a complete data set of the same options: checking the inputs' sha256", flush=True)
        if combined_sha256([sha256_file(p) for p in paths]) != m.get("source_sha256"):
            raise ValueError(f"output folder {out} already holds a data set of other inputs (sha256 differs); "
                             "choose another --out, or --force (force=True) to replace it")
        return Target(out, out, done={**m, "already_prepared": True})
    if complete:  # written beside out (whose parent holds the lock: writable), swapped in at the end
        if os.path.ismount(_real(out)):  # the rename of the swap would fail (EBUSY) after all the work
            raise OutputError(f"{out} is a mount point: a rebuild (--force) is written beside the folder, in "
                              f"{side_paths(out)['new']}, and swapped in by renaming, which a mount point cannot "
                              f"be; prepare the data set into a subfolder of the mount (e.g. {out / 'data'}), or "
                              "empty the folder and prepare it again")
        if progress:
            print(f"rebuilding {out} in {side_paths(out)['new']}: the old data set stays until the new one is "
                  "complete", flush=True)
        return Target(out, side_paths(out)["new"])
    _check_writable(out)  # in place, over what an interrupted run left
    return Target(out, out, existing=None if force else m)
