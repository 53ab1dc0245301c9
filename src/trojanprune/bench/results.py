"""The grid's results file: JSON Lines, a header line then one line per finished cell.

Each cell is appended as ONE complete line in one ``write`` followed by ``fsync``, so a crash
can only leave a torn LAST line, which :func:`open_results` drops on resume. A file of another
format or format version is refused (never silently mixed), and so is one made under other
settings (training, clean data, ...): start a new ``--out`` for those.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError, DataError
from ..progress import log

RESULTS_FORMAT = "trojanprune-bench-results"
RESULTS_FORMAT_VERSION = 1
RESULTS_FILE = "results.jsonl"
KEY_FIELDS = ("dataset", "arch", "attack", "defense", "seed")


def cell_key(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


def header(config) -> dict:
    from ..runs import versions

    return {"format": RESULTS_FORMAT, "format_version": RESULTS_FORMAT_VERSION,
            "name": config.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": config.settings(), "config": config.to_dict(), "versions": versions()}


def read_results(path: str | Path, *, repair: bool = False) -> tuple[dict, list[dict]]:
    """(header, cell records) of a results file. A torn last line (a crash mid-write) is
    ignored, and with ``repair`` cut off the file so that appends start on a clean line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    complete, sep, torn = raw.rpartition(b"\n")
    if torn:
        log(f"[yellow]{path}: ignoring an unfinished last line ({len(torn)} bytes, from an "
            f"interrupted run); its cell will run again[/yellow]")
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(complete) + len(sep))
                f.flush()
                os.fsync(f.fileno())
    lines = complete.decode("utf-8", errors="replace").split("\n") if sep else []
    if not lines or not lines[0].strip():
        raise DataError(f"{path} has no header line; it is not a trojanprune benchmark results "
                        f"file (choose another --out)")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        raise DataError(f"{path}: the first line is not JSON; not a trojanprune results file") from None
    check_header(head, path)
    records = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {number} is corrupt (not JSON); only the last line "
                            f"can be torn by a crash, so this file was edited or damaged") from None
    return head, records


def check_header(head: dict, path) -> None:
    if not isinstance(head, dict) or head.get("format") != RESULTS_FORMAT:
        raise DataError(f"{path} is not a trojanprune benchmark results file (format "
                        f"{head.get('format') if isinstance(head, dict) else None!r}); choose "
                        f"another --out")
    version = head.get("format_version")
    if version != RESULTS_FORMAT_VERSION:
        newer = isinstance(version, int) and version > RESULTS_FORMAT_VERSION
        raise DataError(
            f"{path} has results format version {version!r} but this trojanprune writes version "
            f"{RESULTS_FORMAT_VERSION}; refusing to mix them: "
            + ("upgrade trojanprune to extend it" if newer else
               "use a new --out (or move the old file away) to rerun the grid"))


def latest(records: Iterable[dict]) -> dict[tuple, dict]:
    """The last record of each cell (a retried cell's newer line wins)."""
    out: dict[tuple, dict] = {}
    for record in records:
        out[cell_key(record)] = record
    return out


class ResultsFile:
    """Open (create or resume) ``OUT/results.jsonl`` for a config."""

    def __init__(self, out_dir: str | Path, config):
        self.path = Path(out_dir) / RESULTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            head, self.records = read_results(self.path, repair=True)
            if head.get("settings") != _normalise(config.settings()):
                changed = sorted(k for k in set(head.get("settings") or {}) | set(config.settings())
                                 if (head.get("settings") or {}).get(k)
                                 != _normalise(config.settings()).get(k))
                raise ConfigError(f"{self.path} was made with other settings (changed: "
                                  f"{', '.join(changed)}); its numbers would not be comparable. "
                                  f"Use a new --out, or restore the old settings to resume")
            self.header = head
        else:
            self.header = header(config)
            self._write_new(self.header)
            self.records = []

    def _write_new(self, head: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write((json.dumps(head, sort_keys=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def finished(self) -> dict[tuple, dict]:
        return latest(self.records)

    def append(self, record: dict) -> None:
        """Append one cell's record as a single complete line (one write, then fsync)."""
        line = (json.dumps(record, sort_keys=False, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a full disk; never leave a line that looks complete
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
                raise DataError(f"could not write {self.path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)


def _normalise(value):
    """JSON round trip, so that tuples and lists compare equal to what was read back."""
    return json.loads(json.dumps(value))


def load_records(path: str | Path) -> list[dict]:
    """The latest record of every cell of a results file (or a run's OUT directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise DataError(f"{path} does not exist")
    _, records = read_results(path)
    return list(latest(records).values())
