"""Optuna's journal file (the default results index), made safe against a full disk and a torn write.

Optuna appends one JSON record per line and refuses the whole file once a line does not parse, so a write cut
short (a full disk, a crash, a power loss) used to corrupt the study for good: every later append landed
behind the torn bytes. ``SafeJournalBackend`` keeps every line whole:

- an append that fails (``ENOSPC``…) truncates the file back to where it started, under the journal's lock,
  so a full disk leaves no partial line;
- every append first checks that the file ends with a newline, and every opening checks every line: torn
  bytes are moved to ``journal.log.torn-<time>`` beside the journal, with a warning naming both files and
  how many records were kept; a record that was appended right behind torn bytes is recovered.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optuna.storages.journal import JournalFileBackend

log = logging.getLogger(__name__)

#: Optuna starts every journal record with this key: where a record glued to torn bytes begins.
_RECORD_START = b'{"op_code"'


class SafeJournalBackend(JournalFileBackend):
    """Optuna's ``JournalFileBackend``: appends are all-or-nothing, and opening repairs torn lines."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        with self._locked():
            repair(Path(path))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def append_logs(self, logs: list[dict]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in logs).encode("utf-8")
        path = Path(self._file_path)
        with self._locked():
            start = _set_aside_torn_tail(path)
            try:
                with open(path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                os.truncate(path, start)  # nothing half-written stays behind
                if e.filename is None:
                    e.filename = str(path)
                raise


def _set_aside_torn_tail(path: Path) -> int:
    """Repair the journal if its last write was cut short (no final newline); its size afterwards."""
    if path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        if last != b"\n":
            repair(path)
    return path.stat().st_size


def repair(path: Path) -> bool:
    """Check every line of the journal ``path``; set torn bytes aside (recovering a record glued behind them)
    and rewrite the file atomically. True if anything was set aside."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was torn
    kept: list[bytes] = []
    torn: list[bytes] = [tail] if tail else []
    for line in lines:
        if _parses(line):
            kept.append(line)
            continue
        at = line.rfind(_RECORD_START)
        while at > 0 and not _parses(line[at:]):
            at = line.rfind(_RECORD_START, 0, at)
        if at > 0:  # torn bytes, then a whole record appended behind them
            torn.append(line[:at])
            kept.append(line[at:])
        else:
            torn.append(line)
    if not torn:
        return False
    _save_torn(path, b"\n".join(torn), kept=len(kept))
    tmp = path.with_name(path.name + ".repair")
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _save_torn(path: Path, torn: bytes, kept: int) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    aside = path.with_name(f"{path.name}.torn-{stamp}")
    aside.write_bytes(torn)
    log.warning(
        "%s: a write was cut short (a full disk or a crash); set %d torn bytes aside in %s and kept its %d "
        "whole records",
        path,
        len(torn),
        aside,
        kept,
    )
