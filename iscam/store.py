"""The results store: one row per (image, model, method, method parameters) with every metric.

A store is a folder::

    results/<run name>/
        parts/part-r<rank>-<time>-<uuid>.parquet   # written by the runner, one per (method, image batch)
        results.parquet                           # optional: parts merged by :meth:`ResultsStore.compact`
        run.json                                  # provenance of the latest run (see iscam.experiment)
        runs.jsonl                                # provenance of every run, one JSON object a line

Every file is written atomically: a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``-d onto its final name (and the folder fsync'ed), so a reader sees either the whole file or
nothing. Killing a writer at any moment therefore loses at most the part it was writing; the leftover
``*.tmp`` file is ignored by readers and removed by :meth:`ResultsStore.compact`. The store is correct
without ever being compacted: reading concatenates ``results.parquet`` and the parts and drops rows whose
key appears twice (which happens only when a compaction was killed between its rename and its cleanup).

A row's key is :data:`KEY_COLUMNS`. ``params_key`` is :func:`params_key` of the method's parameters, so
IS-CAM with ``N=10`` and ``N=15`` are different rows; ``metrics_key`` is the same for the metric
parameters, so changing the insertion substrate adds rows instead of mixing protocols.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "KEY_COLUMNS",
    "METRIC_COLUMNS",
    "CURVE_COLUMNS",
    "TIMING_COLUMNS",
    "ROW_COLUMNS",
    "StoreError",
    "ResultsStore",
    "params_key",
    "atomic_write_bytes",
    "atomic_write_text",
]

#: Columns that identify a row: the same key is never computed twice.
KEY_COLUMNS: tuple[str, ...] = (
    "file",  # image file name as in the manifest
    "model",  # iscam.models name
    "weights",  # weights spec ("default" or a path)
    "resize",  # preprocessing: "crop" (Resize+CenterCrop, the authors') or "stretch"
    "layer",  # target layer the method explains
    "precision",  # "fp32" or "bf16"
    "method",  # iscam.methods name
    "params_key",  # canonical JSON of the method's parameters (params_key())
    "metrics_key",  # canonical JSON of the metric parameters
)
#: Per-image results. ``drop`` and ``increase`` are fractions / 0-1 (the tables multiply by 100).
METRIC_COLUMNS: tuple[str, ...] = (
    "index",  # position of the image in the manifest
    "label",  # ground-truth class (torchvision index)
    "target",  # explained class: argmax of the clean logits
    "correct",  # target == label
    "y",  # softmax probability of target on the image
    "o",  # ... on saliency * image
    "drop",  # max(0, y - o) / y                         (Average Drop, per image)
    "increase",  # 1.0 if o > y else 0.0                  (Increase in Confidence, per image)
    "change",  # y - o                                   (Win %: the smaller wins)
    "insertion_auc",
    "deletion_auc",
    "pointing",  # energy-based pointing game proportion in [0, 1]
)
CURVE_COLUMNS: tuple[str, ...] = ("insertion_curve", "deletion_curve")
#: Timings are measured, so they differ between runs and are excluded from store comparisons.
TIMING_COLUMNS: tuple[str, ...] = ("method_seconds", "metric_seconds", "forward_count", "rank")
ROW_COLUMNS: tuple[str, ...] = KEY_COLUMNS + METRIC_COLUMNS + CURVE_COLUMNS + TIMING_COLUMNS

_PARTS = "parts"
_COMPACT = "results.parquet"
_TMP_SUFFIX = ".tmp"


class StoreError(RuntimeError):
    """A results folder that cannot be read or a row set that cannot be written."""


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
    """Write ``data`` to ``path`` so that readers see the old file, or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _frame_to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow")
    return buffer.getvalue()


class ResultsStore:
    """A results folder (see the module docstring). Cheap to create; nothing is read until asked.

    ``rank`` tags the part names written by this object, so ranks of a distributed run never collide.
    """

    def __init__(self, folder: str | os.PathLike[str], *, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = int(rank)

    # -- paths -------------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.folder / _PARTS

    @property
    def compact_path(self) -> Path:
        return self.folder / _COMPACT

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    def part_files(self) -> list[Path]:
        """Finished parts (temporary files of interrupted writes are not parts)."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("part-*.parquet") if p.is_file())

    def exists(self) -> bool:
        return self.compact_path.is_file() or bool(self.part_files())

    # -- reading -----------------------------------------------------------------------------------
    def read(self, *, curves: bool = True) -> pd.DataFrame:
        """Every row of the store, in a stable order (model, method, params_key, metrics_key, index, file).

        ``curves=False`` skips the list columns (faster for tables).
        """
        columns = None if curves else [c for c in ROW_COLUMNS if c not in CURVE_COLUMNS]
        files = ([self.compact_path] if self.compact_path.is_file() else []) + self.part_files()
        frames = []
        for path in files:
            try:
                frames.append(pd.read_parquet(path, columns=columns, engine="pyarrow"))
            except Exception as error:  # noqa: BLE001 - name the file, whatever pyarrow raised
                raise StoreError(f"cannot read results part {path}: {error}") from error
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in (columns or ROW_COLUMNS)})
        frame = pd.concat(frames, ignore_index=True)
        # Parts written later win; duplicates only arise from an interrupted compaction (identical rows).
        frame = frame.drop_duplicates(subset=list(KEY_COLUMNS), keep="last")
        order = ["model", "method", "params_key", "metrics_key", "layer", "precision", "weights", "resize"]
        frame = frame.sort_values(order + ["index", "file"], kind="stable").reset_index(drop=True)
        return frame

    def keys(self) -> set[tuple[Any, ...]]:
        """The keys (tuples in :data:`KEY_COLUMNS` order) of every row present."""
        files = ([self.compact_path] if self.compact_path.is_file() else []) + self.part_files()
        keys: set[tuple[Any, ...]] = set()
        for path in files:
            try:
                frame = pd.read_parquet(path, columns=list(KEY_COLUMNS), engine="pyarrow")
            except Exception as error:  # noqa: BLE001
                raise StoreError(f"cannot read results part {path}: {error}") from error
            keys.update(frame.itertuples(index=False, name=None))
        return keys

    # -- writing -----------------------------------------------------------------------------------
    def write_part(self, rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> Path | None:
        """Write ``rows`` as one new part, atomically. Returns its path (None when there are no rows)."""
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if frame.empty:
            return None
        missing = [c for c in KEY_COLUMNS if c not in frame.columns]
        if missing:
            raise StoreError(f"rows lack the key columns {missing}")
        if frame.duplicated(subset=list(KEY_COLUMNS)).any():
            raise StoreError("rows to write contain the same key twice")
        name = f"part-r{self.rank:03d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.parts_dir / name
        atomic_write_bytes(path, _frame_to_parquet_bytes(frame.reset_index(drop=True)))
        return path

    def remove_stale_tmp(self) -> int:
        """Remove temporary files left by killed writers. Only call when no writer is running."""
        removed = 0
        for folder in (self.folder, self.parts_dir):
            if folder.is_dir():
                for tmp in folder.glob(f".*{_TMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed

    def compact(self) -> Path | None:
        """Merge ``results.parquet`` and every part into a new ``results.parquet`` (atomically), then
        delete the merged parts. Only call when no writer is running. Safe to kill at any point."""
        parts = self.part_files()
        if not parts:
            self.remove_stale_tmp()
            return self.compact_path if self.compact_path.is_file() else None
        frame = self.read(curves=True)
        atomic_write_bytes(self.compact_path, _frame_to_parquet_bytes(frame))
        for part in parts:  # a kill here leaves duplicates, which read() drops
            part.unlink(missing_ok=True)
        _fsync_dir(self.parts_dir)
        self.remove_stale_tmp()
        return self.compact_path

    # -- provenance --------------------------------------------------------------------------------
    def write_provenance(self, record: Mapping[str, Any]) -> None:
        """``run.json`` := ``record``; the record is also appended to ``runs.jsonl`` (history)."""
        text = json.dumps(record, indent=2, sort_keys=True, default=str)
        atomic_write_text(self.run_json, text + "\n")
        history = self.folder / "runs.jsonl"
        previous = history.read_text(encoding="utf-8") if history.is_file() else ""
        line = json.dumps(record, sort_keys=True, default=str)
        atomic_write_text(history, previous + line + "\n")

    def provenance(self) -> dict[str, Any] | None:
        """The latest run's ``run.json`` (None if there is none)."""
        if not self.run_json.is_file():
            return None
        return json.loads(self.run_json.read_text(encoding="utf-8"))

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.folder)!r})"
