"""The results store: one row per (image, model, method, method parameters) with every metric and the map.

A store is a folder::

    results/<profile>/
        parts/part-r<rank>-<time>-<sha256>.parquet    # rows written by the runner, one part per (method, batch)
        tables/<name>/part-...parquet                 # the other tables: traces (Fig. 1), images, sanity, road
        results-<time>-<sha256>.parquet               # optional: the rows merged by :meth:`ResultsStore.compact`
        <name>-<time>-<sha256>.parquet                # ... and each other table merged
        run.json                                      # the latest run: its config, plan and provenance
        runs.jsonl                                    # every finished run, one JSON object a line (appended)
        .lock                                         # held by the run writing to the store

**Atomic.** Every file is written to a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``-d onto its final name (and the folder fsync'ed), so a reader sees the whole file or nothing.
A killed writer loses at most the part it was writing; its leftover ``*.tmp`` file is ignored by readers and
removed by :meth:`ResultsStore.compact`. The store is correct without ever being compacted: reading
concatenates the merged file and the parts (oldest first, by the write time in their names, whatever rank
wrote them) and keeps the newest row of each key (duplicates arise only from a recomputed stale row or a
compaction killed between its rename and its cleanup).

**Verified.** A part's name carries the SHA-256 of its bytes and parquet pages carry CRC checksums; both are
checked on every read, so a flipped byte anywhere in a file is reported (with the command that recomputes
it) instead of being read as a number.

**Shared.** Files get the mode the umask allows (``0644`` under ``umask 022``), like any file the user
writes; ``runs.jsonl`` is appended with one ``write`` per record, never rewritten; a run holds ``.lock`` (an
``flock``) while it writes, so a second run on the same store waits for it and :meth:`compact` never removes
a running writer's temporary file.

A row's key is :data:`KEY_COLUMNS`. ``params_key`` is :func:`params_key` of the method's parameters, so
IS-CAM with ``N=10`` and ``N=15`` are different rows; ``metrics_key`` is the same for the metric
parameters, so changing the insertion substrate adds rows instead of mixing protocols. What a row's numbers
depend on beyond its key (code and weights) is in :data:`STAMP_COLUMNS` (see :mod:`iscam.provenance`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "CURVE_COLUMNS",
    "KEY_COLUMNS",
    "MAP_COLUMNS",
    "METRIC_COLUMNS",
    "ROW_COLUMNS",
    "STAMP_COLUMNS",
    "TABLE_KEYS",
    "TIMING_COLUMNS",
    "ResultsStore",
    "StoreBusyError",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_mode",
    "params_key",
]

#: Columns that identify a row: the same key is never computed twice.
KEY_COLUMNS: tuple[str, ...] = (
    "file",  # image file name as in the manifest
    "model",  # iscam.models name
    "weights",  # weights spec ("default" or a path)
    "resize",  # preprocessing: "crop" (Resize+CenterCrop, the authors') or "stretch"
    "layer",  # target layer the method explains
    "precision",  # "fp32", "bf16" or "fp16"
    "method",  # iscam.methods name
    "params_key",  # canonical JSON of the method's parameters (params_key())
    "metrics_key",  # canonical JSON of the metric parameters
)
#: Per-image results. ``drop`` and ``increase`` are fractions / 0-1 (the tables multiply by 100).
METRIC_COLUMNS: tuple[str, ...] = (
    "index",  # position of the image in the manifest
    "label",  # ground-truth class (torchvision index; -1 when the images come without labels)
    "target",  # explained class: argmax of the clean logits
    "correct",  # target == label
    "y",  # softmax probability of target on the image
    "o",  # ... on saliency * image
    "drop",  # max(0, y - o) / y                         (Average Drop, per image)
    "increase",  # 1.0 if o > y else 0.0                  (Increase in Confidence, per image)
    "change",  # y - o                                   (Win %: the smaller wins)
    "insertion_auc",
    "deletion_auc",
    "pointing",  # energy-based pointing game proportion in [0, 1]; null when skipped (see pointing_skip)
    "pointing_skip",  # "" when computed, else why not ("no boxes", "every box outside the crop")
)
CURVE_COLUMNS: tuple[str, ...] = ("insertion_curve", "deletion_curve")
#: The map, as :meth:`iscam.methods.CAM.raw_maps` (flattened float32, and its [h, w]); the random baseline
#: stores none (its map is rebuilt from the row's seed). :func:`iscam.methods.reconstruct` rebuilds the map.
MAP_COLUMNS: tuple[str, ...] = ("map", "map_shape")
#: What the numbers depend on besides the key: rows with other stamps are stale, never mixed (the runner).
STAMP_COLUMNS: tuple[str, ...] = ("iscam_version", "algorithm_version", "metrics_version", "torch_version",
                                  "weights_id")
#: Measured, so they differ between runs and are excluded from store comparisons. Seconds and forward passes
#: per image: ``method_*`` for the map, ``metric_*`` for the metrics' perturbed inputs (a row whose map the
#: runner took from the same map's row under other metrics carries that row's map cost).
TIMING_COLUMNS: tuple[str, ...] = ("method_seconds", "metric_seconds", "forward_count", "metric_forward_count",
                                   "rank")
ROW_COLUMNS: tuple[str, ...] = (KEY_COLUMNS + METRIC_COLUMNS + CURVE_COLUMNS + MAP_COLUMNS + STAMP_COLUMNS
                                + TIMING_COLUMNS)

#: The key columns of each table of a store (``rows`` is the table above).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "rows": KEY_COLUMNS,
    # Fig. 1: one IS-CAM trace per (image, setup, parameters)
    "traces": ("file", "model", "weights", "resize", "layer", "precision", "method", "params_key"),
    # the preprocessed inputs the figures show (uint8), so a book renders where the images are not
    "images": ("file", "model", "resize"),
    # saliency sanity checks: one row per (image, setup, method, parameters, randomisation, stage)
    "sanity": KEY_COLUMNS[:-1] + ("randomisation", "stage"),
    # ROAD, from the base rows' stored maps: one row per (image, setup, method, parameters, ROAD settings); no
    # metrics_key, since ROAD reads only the map
    "road": KEY_COLUMNS[:-1] + ("road_key",),
}

_PARTS = "parts"
_TABLES = "tables"
_MERGED_PREFIX = {"rows": "results"}
_TMP_SUFFIX = ".tmp"
_PART_NAME = re.compile(r"^part-r(?P<rank>\d{3})-(?P<time>\d{20})-(?P<digest>[0-9a-f]{16})\.parquet$")
_MERGED_NAME = re.compile(r"^(?P<table>[a-z]+)-(?P<time>\d{20})-(?P<digest>[0-9a-f]{16})\.parquet$")


class StoreError(RuntimeError):
    """A results folder that cannot be read or written; the message names the file and what to do."""


class StoreBusyError(StoreError):
    """Another process holds the store's lock (a run or a compaction is writing to it)."""


def params_key(params: Mapping[str, Any]) -> str:
    """Canonical JSON of ``params``: sorted keys, no spaces, integral floats kept as written.

    >>> params_key({"schedule": "authors", "N": 10})
    '{"N":10,"schedule":"authors"}'
    """
    return json.dumps(_plain(dict(params)), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(value: Any) -> Any:
    """Numbers, strings, lists and dicts only (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            raise StoreError(f"parameter value {value!r} is not a finite number")
        return value
    raise StoreError(f"parameter value {value!r} of type {type(value).__name__} cannot be stored as JSON")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def _read_umask() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)  # elsewhere: read it by setting it (this runs once, at import)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from the process's umask (``0o644`` under ``umask 022``)."""
    return 0o666 & ~_read_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, or the whole new one, never a part.

    The file gets the umask's mode; on any error (a read-only folder, a full disk) the temporary file is
    removed and an ``OSError`` naming ``path`` is raised.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, write_page_checksum=True)
    return buffer.getvalue()


def _write_order(path: Path) -> tuple[int, int, str]:
    """(write time, rank, name) of a part or merged file, from its name (see :meth:`ResultsStore.files`)."""
    match = _PART_NAME.match(path.name)
    if match is not None:
        return int(match.group("time")), int(match.group("rank")), path.name
    match = _MERGED_NAME.match(path.name)
    return (int(match.group("time")), -1, path.name) if match is not None else (-1, -1, path.name)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------

class ResultsStore:
    """A results folder (see the module docstring). Cheap to create; nothing is read until asked.

    ``rank`` tags the part names written by this object, so ranks of a distributed run never collide.
    ``repair_hint`` (a callable taking the corrupt file's path) words the command a corrupt file's error
    suggests; by default it says to move the file away and rerun the run that wrote the store.
    """

    def __init__(self, folder: str | os.PathLike[str], *, rank: int = 0,
                 repair_hint: Callable[[Path], str] | None = None) -> None:
        self.folder = Path(folder)
        self.rank = int(rank)
        self._repair_hint = repair_hint

    # -- paths -------------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.folder / _PARTS

    def table_dir(self, table: str = "rows") -> Path:
        """The folder of ``table``'s parts."""
        self._check_table(table)
        return self.parts_dir if table == "rows" else self.folder / _TABLES / table

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def history_path(self) -> Path:
        return self.folder / "runs.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.folder / ".lock"

    @staticmethod
    def _check_table(table: str) -> None:
        if table not in TABLE_KEYS:
            raise StoreError(f"unknown table {table!r}; a store has {', '.join(TABLE_KEYS)}")

    def part_files(self, table: str = "rows") -> list[Path]:
        """Finished parts of ``table``, oldest first (temporary files of interrupted writes are not parts)."""
        folder = self.table_dir(table)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("part-*.parquet") if p.is_file())

    def merged_files(self, table: str = "rows") -> list[Path]:
        """The files :meth:`compact` wrote for ``table``, oldest first (one, unless a compaction was killed)."""
        self._check_table(table)
        prefix = _MERGED_PREFIX.get(table, table)
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"{prefix}-*.parquet") if p.is_file())

    def files(self, table: str = "rows") -> list[Path]:
        """Every file holding rows of ``table``, oldest first: the order in which newer rows win.

        Ordered by the write time in the names (merged files and parts alike, then rank), not by name: a
        row recomputed by rank 0 must win over the stale row rank 1 wrote earlier ("part-r001-..." sorts
        after "part-r000-..."). A name without a time (not written by this module) sorts first.
        """
        return sorted(self.merged_files(table) + self.part_files(table), key=_write_order)

    def exists(self) -> bool:
        return bool(self.files("rows"))

    # -- reading -----------------------------------------------------------------------------------
    def _hint(self, path: Path) -> str:
        if self._repair_hint is not None:
            return self._repair_hint(path)
        command = "the 'iscam run' command that wrote this store"
        try:
            record = self.provenance()
        except StoreError:
            record = None
        if record and isinstance(record.get("command"), str):
            command = record["command"]
        return f"move it away (mv '{path}' '{path}.corrupt') and recompute its rows with: {command}"

    def _read_file(self, path: Path, columns: list[str] | None) -> pd.DataFrame:
        """One part, its name's digest and its pages' checksums verified."""
        match = _PART_NAME.match(path.name) or _MERGED_NAME.match(path.name)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise StoreError(f"cannot read results file {path}: {error.strerror}") from None
        if match is None or _digest(data) != match.group("digest"):
            raise StoreError(f"results file {path} is corrupt (its SHA-256 does not match its name): "
                             f"{self._hint(path)}")
        try:
            table = pq.read_table(io.BytesIO(data), columns=columns, page_checksum_verification=True)
        except Exception as error:  # noqa: BLE001 - pyarrow's errors, whatever they are, name this file
            raise StoreError(f"results file {path} is corrupt ({error}): {self._hint(path)}") from None
        return table.to_pandas()

    def read(self, *, curves: bool = True, table: str = "rows", columns: Iterable[str] | None = None,
             maps: bool = True) -> pd.DataFrame:
        """Every row of ``table``, the newest of each key, in a stable order (the key columns).

        For the rows: ``curves=False`` / ``maps=False`` skip the list columns (faster for tables); ``columns``
        reads only those (the key columns are always read).
        """
        keys = list(TABLE_KEYS[table]) if table in TABLE_KEYS else []
        self._check_table(table)
        wanted: list[str] | None = None
        if columns is not None:
            wanted = list(dict.fromkeys(keys + list(columns)))
        elif table == "rows" and not (curves and maps):
            skipped = (() if curves else CURVE_COLUMNS) + (() if maps else MAP_COLUMNS)
            wanted = [c for c in ROW_COLUMNS if c not in skipped]
        frames = []
        for path in self.files(table):
            frame = self._read_file(path, None)
            if wanted is not None:
                frame = frame[[c for c in wanted if c in frame.columns]]
            frames.append(frame)
        if not frames:
            names = wanted or (list(ROW_COLUMNS) if table == "rows" else keys)
            return pd.DataFrame({c: pd.Series(dtype=object) for c in names})
        frame = pd.concat(frames, ignore_index=True)
        frame = frame.drop_duplicates(subset=keys, keep="last")
        order = [c for c in keys if c != "file"] + (["index"] if "index" in frame.columns else []) + ["file"]
        return frame.sort_values(order, kind="stable").reset_index(drop=True)

    def keys(self, table: str = "rows", *, with_columns: Iterable[str] = ()) -> pd.DataFrame:
        """The key columns (plus ``with_columns``) of every row present, the newest of each key."""
        return self.read(table=table, columns=list(with_columns))[list(TABLE_KEYS[table]) + list(with_columns)]

    # -- writing -----------------------------------------------------------------------------------
    def write_part(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame, table: str = "rows") -> Path | None:
        """Write ``rows`` as one new part of ``table``, atomically. Returns its path (None for no rows)."""
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if frame.empty:
            return None
        keys = list(TABLE_KEYS[table]) if table in TABLE_KEYS else []
        self._check_table(table)
        missing = [c for c in keys if c not in frame.columns]
        if missing:
            raise StoreError(f"rows lack the key columns {missing}")
        if frame.duplicated(subset=keys).any():
            raise StoreError("rows to write contain the same key twice")
        data = _parquet_bytes(frame.reset_index(drop=True))
        name = f"part-r{self.rank:03d}-{time.time_ns():020d}-{_digest(data)}.parquet"
        path = self.table_dir(table) / name
        atomic_write_bytes(path, data)
        return path

    def check_writable(self) -> None:
        """Fail now, naming the folder, if the store cannot be written (before any work is done)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"the results folder {self.folder} is a file, not a folder: "
                             "choose another folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".probe.", suffix=_TMP_SUFFIX):
                pass
        except OSError as error:
            raise StoreError(f"cannot write to the results folder {self.folder}: "
                             f"{error.strerror or error}") from None

    def remove_stale_tmp(self) -> int:
        """Remove temporary files left by killed writers (call it holding the lock, as :meth:`compact` does)."""
        removed = 0
        folders = [self.folder, self.parts_dir] + [self.table_dir(t) for t in TABLE_KEYS if t != "rows"]
        for folder in folders:
            if folder.is_dir():
                for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed

    def compact(self) -> list[Path]:
        """Merge each table's files into one new ``<table>-<time>-<sha>.parquet`` (atomically), then delete
        the merged files. Takes the lock (a :class:`StoreBusyError` while a run writes). Safe to kill."""
        written = []
        with self.lock(wait=False):
            for table in TABLE_KEYS:
                files = self.files(table)
                if len(files) <= 1 and not self.part_files(table):
                    written.extend(files)
                    continue
                frame = self.read(table=table)
                data = _parquet_bytes(frame)
                prefix = _MERGED_PREFIX.get(table, table)
                path = self.folder / f"{prefix}-{time.time_ns():020d}-{_digest(data)}.parquet"
                atomic_write_bytes(path, data)
                for old in files:  # a kill here leaves duplicates, which read() drops
                    old.unlink(missing_ok=True)
                _fsync_dir(self.folder)
                written.append(path)
            self.remove_stale_tmp()
        return written

    # -- the lock ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, *, wait: bool = True, owner: str = "",
             on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the store's lock (``.lock``, an ``flock``) for a run or a compaction.

        ``wait=False`` raises :class:`StoreBusyError` naming the holder when another process has it;
        ``wait=True`` calls ``on_wait(holder)`` once and blocks until it is released.
        """
        self.check_writable()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                if not wait:
                    raise StoreBusyError(f"the results folder {self.folder} is in use by {holder}; "
                                         "try again when it has finished") from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}{': ' + owner if owner else ''} (since {time.ctime()})".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    # -- provenance --------------------------------------------------------------------------------
    def write_provenance(self, record: Mapping[str, Any], *, history: bool = True) -> None:
        """``run.json`` := ``record``; with ``history`` the record is also appended to ``runs.jsonl``."""
        text = json.dumps(record, indent=2, sort_keys=True, default=str)
        atomic_write_text(self.run_json, text + "\n")
        if history:
            self.append_history(record)

    def append_history(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line of ``runs.jsonl`` (one ``write``: concurrent writers never lose a line)."""
        line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise StoreError(f"short write to {self.history_path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)

    def provenance(self) -> dict[str, Any] | None:
        """The latest run's ``run.json`` (None if there is none; a :class:`StoreError` naming it if unreadable)."""
        if not self.run_json.is_file():
            return None
        try:
            record = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreError(f"{self.run_json} is not a valid run record ({error}); it is rewritten by the "
                             "next 'iscam run' on this folder") from None
        if not isinstance(record, dict):
            raise StoreError(f"{self.run_json} is not a valid run record (not a JSON object)")
        return record

    def history(self) -> list[dict[str, Any]]:
        """Every record of ``runs.jsonl`` (a line that is not JSON raises, naming the file and line)."""
        if not self.history_path.is_file():
            return []
        records = []
        for number, line in enumerate(self.history_path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise StoreError(f"{self.history_path}, line {number}: not JSON ({error})") from None
        return records

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.folder)!r})"
