"""Per-run claims, so that processes sharing one results folder never train the same run twice.

Several ``bench run`` processes may work on one results folder: shards, or two unsharded runs of one suite started
by hand. Before it trains a run, a process takes the run's claim while it holds the results file's lock
(:func:`embcompress.runner.run_suite` does this): it reads the results again (a run another process recorded
meanwhile is skipped), then looks for the claim file ``.claims/<run key>.json`` beside ``results.jsonl``. A
claim held by a live process is left alone and the run is skipped here (and said so); a claim whose process is
gone, killed part-way, is taken over, so a resumed suite runs what the dead one left. The claim file is removed
once the run's line is recorded.

A claim names its process by host, pid and, where ``/proc`` has it, the pid's start time, so a pid reused by a
later process is not taken for the claimer. A claim made on another host cannot be checked from here and is
honoured; if that host died, remove its files from ``.claims/``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

__all__ = ["Claims"]

_HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from ``/proc/<pid>/stat``; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _alive(claim: dict) -> bool:
    """Whether the process that wrote ``claim`` still runs (a claim from another host: assumed so)."""
    if claim.get("host") != _HOST:
        return True
    pid = claim.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False  # malformed, or this process's own claim left by an aborted call: free to take
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state == "Z" or claim.get("start") not in (None, start):
            return False  # a zombie, or the pid now belongs to a later process
    return True


class Claims:
    """The claims of one results folder (call :meth:`holder` and :meth:`take` under the results file's lock)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.dir = Path(folder) / ".claims"

    def _file(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def holder(self, key: str) -> dict | None:
        """The live claim another process holds on ``key`` (``{"pid", "host", ...}``), or None."""
        try:
            claim = json.loads(self._file(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no claim, or a torn one: nobody holds it
        return claim if isinstance(claim, dict) and _alive(claim) else None

    def take(self, key: str) -> None:
        """Claim ``key`` for this process (replacing a dead process's claim)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stat = _proc_stat(os.getpid())
        claim = {"pid": os.getpid(), "host": _HOST, **({"start": stat[1]} if stat else {})}
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(claim), encoding="utf-8")
        os.replace(tmp, self._file(key))

    def release(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def tidy(self) -> None:
        """Remove the claims folder once it is empty (call under the results file's lock)."""
        try:
            self.dir.rmdir()
        except OSError:
            pass  # absent, or another process's claims are in it
