"""The resumable, sharded runner that fills a :class:`~iscam.store.ResultsStore` from a config.

:func:`run` computes every row of a config's studies (:func:`iscam.config.expand`: the base rows, each
variant's sets, the figures' images) that the store does not hold yet, and the artifacts the book shows
(Fig. 1's IS-CAM trace, the figures' input images)::

    summary = run(load_config("smoke"), out="results/smoke")

How the runner keeps its promises:

* **Checked first.** Every method's parameters, the metrics, the device, the manifest (and that its images
  exist) and the store's writability are checked before the model is loaded; a complete store is recognised
  from the row keys alone, so rerunning a finished run loads nothing and forwards nothing.
* **Never mixed.** Each row carries the stamps of what its numbers depend on (:func:`iscam.provenance.row_stamp`:
  the method's and the metrics' algorithm versions, torch, the weights). A stored row with other stamps is
  stale: the run stops and names them, unless ``recompute_stale=True`` recomputes them.
* **Resumable.** Images are cut into fixed batches of ``batch_size`` consecutive selected images; each
  (method, batch) is computed and written as one atomic part. A kill loses at most the batch in flight; a
  rerun computes only the missing rows, so a new ``N`` adds rows.
* **Deterministic.** Batches are fixed by position, not by what is left to do, so a resumed run sends the
  same images together as an uninterrupted one. Stochastic methods (SS-CAM, Smooth Grad-CAM++, the random
  baseline) are run one image at a time with ``seed=image_seed(config seed, method, file)``, so a row never
  depends on which other images were computed with it (:class:`MethodRunner`, which ``iscam explain`` uses too).
* **One writer.** The run holds the store's lock: a second run on the same folder waits, then computes only
  what is still missing. ``run.json`` says what the run plans (``status: running``), then what it did.
* **Multi-GPU.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on CUDA,
  Gloo on CPU, GPU = ``LOCAL_RANK``) and batch ``j`` of a study goes to rank ``j % WORLD_SIZE``: every rank
  writes its own parts, and because a batch holds the same images whatever the world size, the merged store
  equals a one-process run. Rank 0 holds the lock and writes ``run.json``.
* **Robust.** Unreadable images are logged and skipped; a CUDA out-of-memory error halves the batch (and the
  forward batch inside methods and metrics) and retries; Ctrl-C propagates after the finished parts are on
  disk (the CLI turns it into exit status 130 with a resume hint).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import provenance
from .config import (
    DEVICES,
    ConfigError,
    ExperimentConfig,
    MethodSpec,
    Study,
    check_methods,
    default_output,
    expand,
    image_seed,
    method_class,
    method_kwargs,
    select_indices,
)
from .data import UNKNOWN_LABEL
from .store import KEY_COLUMNS, STAMP_COLUMNS, TABLE_KEYS, ResultsStore

__all__ = [
    "Cost",
    "MethodRunner",
    "PlannedStudy",
    "RunSummary",
    "StaleRowsError",
    "describe",
    "plan",
    "planned_studies",
    "resolve_device",
    "open_images",
    "run",
]

log = logging.getLogger("iscam.runner")


class StaleRowsError(ConfigError):
    """The store holds rows of this run computed by other code or weights (see :mod:`iscam.provenance`)."""


@dataclass
class Cost:
    """What one method's rows cost, per image: seconds and forward passes of the map and of the metrics."""

    images: int = 0
    map_seconds: float = 0.0
    metric_seconds: float = 0.0
    forwards: int = 0
    metric_forwards: int = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self.images += 1
        self.map_seconds += float(row["method_seconds"])
        self.metric_seconds += float(row["metric_seconds"])
        self.forwards += int(row["forward_count"])
        self.metric_forwards += int(row["metric_forward_count"])

    def per_image(self) -> dict[str, float]:
        """Means per image: ``map_seconds``, ``metric_seconds``, ``seconds`` (their sum), ``forwards``,
        ``metric_forwards``, ``total_forwards``, and ``images``."""
        n = max(1, self.images)
        return {"images": self.images, "map_seconds": self.map_seconds / n,
                "metric_seconds": self.metric_seconds / n,
                "seconds": (self.map_seconds + self.metric_seconds) / n, "forwards": self.forwards / n,
                "metric_forwards": self.metric_forwards / n,
                "total_forwards": (self.forwards + self.metric_forwards) / n}

    def merge(self, other: Cost) -> None:
        self.images += other.images
        self.map_seconds += other.map_seconds
        self.metric_seconds += other.metric_seconds
        self.forwards += other.forwards
        self.metric_forwards += other.metric_forwards


@dataclass
class RunSummary:
    """What :func:`run` did (this rank's counts; ``cost`` over every rank when run on rank 0)."""

    out: Path
    rows_written: int
    rows_skipped: int
    images_skipped: list[str]
    cost: dict[str, dict[str, float]]  # method label -> Cost.per_image()
    provenance: dict[str, Any] | None
    stale_recomputed: int = 0
    skipped_manifest_rows: int = 0

    @property
    def seconds_per_image(self) -> dict[str, float]:
        """Total seconds per image (map + metrics) of each method label."""
        return {label: cost["seconds"] for label, cost in self.cost.items()}


@dataclass(frozen=True)
class PlannedStudy:
    """A :class:`~iscam.config.Study` with the files it covers (and their manifest indices)."""

    study: Study
    files: tuple[str, ...]
    indices: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        return {"variant": self.study.variant, "label": self.study.label, "figures": self.study.figures,
                "config": self.study.config.to_dict(), "files": list(self.files)}


# --------------------------------------------------------------------------------------------------
# Devices, distribution, data
# --------------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without a GPU is a :class:`ConfigError`."""
    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)


def _barrier(info: _Dist) -> None:
    if info.active:
        import torch.distributed as dist

        dist.barrier()


def _gather(info: _Dist, value: Any) -> list[Any]:
    if not info.active:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * info.world
    dist.all_gather_object(values, value)
    return values


def _broadcast(info: _Dist, value: Any) -> Any:
    if not info.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def open_images(config: ExperimentConfig, root: Path | None, preprocess: Any) -> Any:
    """The config's images (:func:`iscam.data.open_dataset`: a manifest, a folder holding ``manifest.csv``, a
    name under the data root, or a folder of images), with every image file checked to exist up front."""
    from . import data as iscam_data

    dataset = iscam_data.open_dataset(config.data.manifest, preprocess, data_root=root,
                                      image_dir=config.data.image_dir, on_bad_rows=config.data.on_bad_rows)
    present = [f for f in dataset.files if (dataset.image_dir / f).is_file()]
    if not present:
        raise ConfigError(f"none of the {len(dataset.files)} images of {dataset.source} is in "
                          f"{dataset.image_dir} (first expected: {dataset.image_dir / dataset.files[0]}); "
                          "check data.image_dir")
    if len(present) < len(dataset.files):
        log.warning("%d of the %d images of %s are missing from %s; their rows will be reported missing",
                    len(dataset.files) - len(present), len(dataset.files), dataset.source, dataset.image_dir)
    skipped = getattr(dataset, "skipped_rows", [])
    if skipped:
        first = skipped[0]
        log.warning("%s: skipped %d bad row(s) (data.on_bad_rows: skip), e.g. line %d (%s): %s",
                    dataset.source, len(skipped), first.line, first.file, first.message)
    return dataset


def _figure_indices(config: ExperimentConfig, dataset: Any, base: Sequence[int]) -> list[int]:
    """The manifest rows the figures show: the first image of each wanted class, then the first selected."""
    from .models import imagenet_categories

    assert config.figures is not None
    categories = [c.lower() for c in imagenet_categories()]
    chosen: list[int] = []
    for name in config.figures.classes:
        if name.lower() not in categories:
            raise ConfigError(f"figures.classes: {name!r} is not an ImageNet class name")
        label = categories.index(name.lower())
        found = next((i for i, value in enumerate(dataset.labels) if value == label), None)
        if found is not None and found not in chosen:
            chosen.append(found)
    for index in base:
        if len(chosen) >= config.figures.images:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen[: config.figures.images]


def plan(config: ExperimentConfig, dataset: Any, *, only: Sequence[str] | None = None) -> list[PlannedStudy]:
    """The studies of ``config`` with their images (``only``: keep those variants; ``"base"`` = the base)."""
    files = list(dataset.files)
    base = select_indices(len(files), config.data)
    planned = []
    for study in expand(config):
        name = study.variant or "base"
        if only and name not in only:
            continue
        if study.figures:
            indices = _figure_indices(config, dataset, base)
        else:
            indices = base if study.images is None else base[: study.images]
        planned.append(PlannedStudy(study, tuple(files[i] for i in indices), tuple(indices)))
    if only:
        known = {s.variant or "base" for s in expand(config)}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise ConfigError(f"--only {', '.join(unknown)}: this config has {', '.join(sorted(known))}")
    return planned


def planned_studies(config: ExperimentConfig, store: ResultsStore | None = None, *,
                    data_root: str | os.PathLike[str] | None = None,
                    only: Sequence[str] | None = None) -> list[PlannedStudy]:
    """:func:`plan` of ``config`` for reading a store: the images of each study come from the store's own
    records (``run.json``, then ``runs.jsonl``) when a run of the same study wrote them, so a store renders
    where its images and manifest are not; otherwise from the manifest under the data root."""
    records = []
    if store is not None:
        latest = store.provenance()
        records = ([latest] if latest else []) + list(reversed(store.history()))
    known: dict[str, tuple[str, ...]] = {}
    for record in records:
        for entry in record.get("plan", []):
            key = json.dumps(entry["config"], sort_keys=True) + f"|{entry.get('figures', False)}"
            known.setdefault(key, tuple(entry["files"]))
    studies = [s for s in expand(config) if not only or (s.variant or "base") in only]
    found = []
    for study in studies:
        key = json.dumps(study.config.to_dict(), sort_keys=True) + f"|{study.figures}"
        if key not in known:
            break
        found.append(PlannedStudy(study, known[key], ()))
    else:
        return found
    from . import models as iscam_models
    from .paths import optional_data_root

    preprocess = iscam_models.preprocess_for(config.model.name, config.model.resize,
                                             config.model.input_size)
    return plan(config, open_images(config, optional_data_root(data_root), preprocess), only=only)


# --------------------------------------------------------------------------------------------------
# Methods and metrics on a batch
# --------------------------------------------------------------------------------------------------

class MethodRunner:
    """One configured method, callable on a batch: ``maps(x, target, files) -> (raw maps, forwards)``.

    Deterministic methods keep one object (hooks placed once) for the whole run. A stochastic method gets
    a fresh object per image constructed with ``seed=image_seed(config seed, method, file)``: its map then
    depends on nothing but that image, whatever else was computed before or beside it. ``iscam explain``
    builds its maps through this class too, so its ``--seed`` gives the runner's rows.
    """

    def __init__(self, spec: MethodSpec, model: torch.nn.Module, layer: str, config: ExperimentConfig,
                 forward_batch: int | None = None) -> None:
        self.spec = spec
        self.model = model
        self.layer = layer
        self.config = config
        self.cls = method_class(spec.name)
        self.kwargs = method_kwargs(config, spec.name, spec.params, forward_batch=forward_batch)
        self.finish_params = dict(spec.params)
        self.cam: Any = None

    def _make(self, **extra: Any) -> Any:
        from . import methods as iscam_methods

        return iscam_methods.get(self.spec.name, self.model, target_layer=self.layer, **self.kwargs, **extra)

    def seed(self, file: str) -> int | None:
        """The seed of ``file``'s map (None for deterministic methods)."""
        return image_seed(self.config.seed, self.spec.name, file) if self.cls.stochastic else None

    def __enter__(self) -> MethodRunner:
        if not self.cls.stochastic:
            self.cam = self._make()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cam is not None:
            self.cam.close()
            self.cam = None

    def halve_batch(self) -> None:
        size = self.kwargs.get("batch_size")
        if isinstance(size, int) and size > 1:
            self.kwargs["batch_size"] = size // 2
            if self.cam is not None:
                self.cam.batch_size = size // 2

    def maps(self, x: torch.Tensor, target: torch.Tensor, files: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Raw maps ``[B, h, w]`` (:meth:`iscam.methods.CAM.raw_maps`) and each image's forward passes."""
        if not self.cls.stochastic:
            before = self.cam.forward_count
            raw = self.cam.raw_maps(x, target)
            share = (self.cam.forward_count - before) / max(1, len(files))
            return raw, [round(share)] * len(files)
        maps, forwards = [], []
        for i, file in enumerate(files):
            with self._make(seed=self.seed(file)) as cam:
                maps.append(cam.raw_maps(x[i:i + 1], target[i:i + 1]))
                forwards.append(cam.forward_count)
        return torch.cat(maps), forwards

    def finish(self, raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The full-size maps from :meth:`maps`' raw maps (float32, in [0, 1])."""
        return self.cls.finish(raw, size, **self.finish_params).to(torch.float32)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The config's precision for the forwards the runner makes itself (targets, metrics)."""
    from .methods.base import amp_autocast

    return amp_autocast(device, None if precision == "fp32" else precision)


def _inside_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clipped to the frame, without those that fall outside it (e.g. after a centre crop)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    clipped = boxes.clone().float()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep]


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class _MetricModel(torch.nn.Module):
    """The model as the metrics see it: it counts the images it forwards, and feeds a channels-last model
    channels-last inputs (2x faster convolutions on CPUs, same values up to rounding)."""

    def __init__(self, model: torch.nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += x.shape[0]
        return self.model(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)


class _BatchRunner:
    """Computes one method's maps and every metric on one batch of images."""

    def __init__(self, config: ExperimentConfig, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        self.model = _MetricModel(model, config.channels_last)
        self.device = device
        self.metric_batch = config.metrics.batch_size
        self.has_boxes = True

    def metrics(self, x: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                boxes: Sequence[torch.Tensor | None]) -> dict[str, Any]:
        from . import metrics as M

        spec = self.config.metrics
        count = x.shape[0]
        nan = [math.nan] * count
        out: dict[str, Any] = {}
        with torch.no_grad(), _autocast(self.device, self.config.precision):
            if spec.confidence is not None:
                y, o = M.confidence(self.model, x, saliency, target, batch_size=self.metric_batch)
                y, o = y.float(), o.float()
                out["y"], out["o"] = y.tolist(), o.tolist()
                out["drop"] = M.average_drop(y, o).float().tolist()
                out["increase"] = M.increase_in_confidence(y, o).float().tolist()
                out["change"] = (y - o).tolist()
            else:
                out.update(y=nan, o=nan, drop=nan, increase=nan, change=nan)
            for name, function in (("insertion", M.insertion_curve), ("deletion", M.deletion_curve)):
                params = getattr(spec, name)
                if params is None:
                    out[f"{name}_auc"] = nan
                    out[f"{name}_curve"] = [[] for _ in range(count)]
                    continue
                curve = function(self.model, x, saliency, target, batch_size=self.metric_batch, **params).float()
                out[f"{name}_auc"] = M.auc(curve).float().tolist()
                out[f"{name}_curve"] = [row.tolist() for row in curve.cpu()]
        pointing: list[float | None] = [None] * count
        skip = ["metric not requested"] * count
        if spec.pointing is not None:
            height, width = saliency.shape[-2:]
            rows, valid = [], []
            for i, image_boxes in enumerate(boxes):
                if not self.has_boxes:
                    skip[i] = "the images come without boxes"
                    continue
                if image_boxes.numel() == 0:
                    skip[i] = "no boxes in the manifest"
                    continue
                inside = _inside_boxes(image_boxes, height, width)
                if inside.shape[0] == 0:
                    skip[i] = "every box outside the crop"
                    continue
                rows.append(i)
                valid.append(inside)
            if rows:
                values = M.energy_pointing_game(saliency[rows].float(), valid)
                for i, value in zip(rows, values.float().tolist()):
                    pointing[i], skip[i] = value, ""
        out["pointing"], out["pointing_skip"] = pointing, skip
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process_batch(runner: _BatchRunner, method: MethodRunner, batch: Any, fixed: Mapping[str, Any],
                   rank: int) -> list[dict[str, Any]]:
    """Maps + metrics for one batch, as store rows; on CUDA out-of-memory, halves the batch and retries."""
    try:
        return _process_batch_once(runner, method, batch, fixed, rank)
    except RuntimeError as error:
        if runner.device.type != "cuda" or not _is_oom(error):
            raise
        if len(batch.files) <= 1 and runner.metric_batch <= 1 and method.kwargs.get("batch_size", 1) <= 1:
            raise
        torch.cuda.empty_cache()
        runner.metric_batch = max(1, runner.metric_batch // 2)
        method.halve_batch()
        log.warning("CUDA out of memory on %d images: halving the batches (now %d frames per metric pass)",
                    len(batch.files), runner.metric_batch)
        if len(batch.files) == 1:
            return _process_batch(runner, method, batch, fixed, rank)
        half = len(batch.files) // 2
        return (_process_batch(runner, method, _split_batch(batch, 0, half), fixed, rank)
                + _process_batch(runner, method, _split_batch(batch, half, len(batch.files)), fixed, rank))


def _split_batch(batch: Any, start: int, stop: int) -> Any:
    return type(batch)(**{name: getattr(batch, name)[start:stop] for name in batch._fields})


def _process_batch_once(runner: _BatchRunner, method: MethodRunner, batch: Any, fixed: Mapping[str, Any],
                        rank: int) -> list[dict[str, Any]]:
    device = runner.device
    x = batch.x.to(device)
    files = list(batch.files)
    with torch.no_grad(), _autocast(device, runner.config.precision):
        target = runner.model.model(x).argmax(dim=1)
    _sync(device)
    start = time.perf_counter()
    raw, forwards = method.maps(x, target, files)
    raw = raw.detach().float()
    saliency = method.finish(raw, (x.shape[-2], x.shape[-1]))
    _sync(device)
    method_seconds = time.perf_counter() - start
    before = runner.model.forwards
    start = time.perf_counter()
    values = runner.metrics(x, saliency, target, list(batch.boxes))
    _sync(device)
    metric_seconds = time.perf_counter() - start
    metric_forwards = runner.model.forwards - before
    labels = [int(v) for v in batch.labels.tolist()]
    indices = [int(v) for v in batch.indices.tolist()]
    targets = target.tolist()
    raw = raw.cpu()
    count = len(files)
    rows = []
    for i, file in enumerate(files):
        row: dict[str, Any] = {"file": file, **fixed}
        row.update(index=indices[i], label=labels[i], target=int(targets[i]),
                   correct=None if labels[i] == UNKNOWN_LABEL else labels[i] == targets[i])
        for name in ("y", "o", "drop", "increase", "change", "insertion_auc", "deletion_auc", "pointing",
                     "pointing_skip", "insertion_curve", "deletion_curve"):
            row[name] = values[name][i]
        stored = method.cls.name != "random"  # the random baseline is rebuilt from its seed
        # float32 arrays, so a part of random-baseline rows (no map) still stores a list<float> column
        row["map"] = raw[i].flatten().numpy().astype(np.float32) if stored else np.zeros(0, np.float32)
        row["map_shape"] = list(raw.shape[-2:]) if stored else list(saliency.shape[-2:])
        row.update(method_seconds=method_seconds / count, metric_seconds=metric_seconds / count,
                   forward_count=int(forwards[i]), metric_forward_count=round(metric_forwards / count),
                   rank=rank)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Figures' artifacts: the IS-CAM trace (Fig. 1) and the inputs shown
# --------------------------------------------------------------------------------------------------

def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _trace_key(config: ExperimentConfig, planned: PlannedStudy, fixed: Mapping[str, Any]) -> dict[str, Any] | None:
    """The traces-table key of Fig. 1's trace (IS-CAM with the config's parameters on the first figure image)."""
    spec = next((m for m in config.methods if m.name == "iscam"), None)
    if spec is None or not planned.files:
        return None
    key = {"file": planned.files[0], **{k: fixed[k] for k in TABLE_KEYS["traces"] if k in fixed}}
    key["method"], key["params_key"] = "iscam", config.method_key(spec)
    return key


def _missing_artifacts(config: ExperimentConfig, planned: PlannedStudy, store: ResultsStore,
                       fixed: Mapping[str, Any]) -> tuple[list[tuple[int, str]], dict[str, Any] | None]:
    """The figures' input images the store lacks, and the key of Fig. 1's trace if it lacks it."""
    present = set(store.keys("images").itertuples(index=False, name=None))
    images = [(i, f) for i, f in zip(planned.indices, planned.files)
              if (f, config.model.name, config.model.preprocessing) not in present]
    key = _trace_key(config, planned, fixed)
    if key is not None:
        traces = store.keys("traces")
        if len(traces) and (traces[list(key)] == pd.Series(key)).all(axis=1).any():
            key = None
    return images, key


def _figure_artifacts(config: ExperimentConfig, planned: PlannedStudy, dataset: Any, model: torch.nn.Module,
                      layer: str, device: torch.device, store: ResultsStore,
                      images: Sequence[tuple[int, str]], trace_key: Mapping[str, Any] | None) -> None:
    """Write the figures' missing input images and Fig. 1's IS-CAM trace (of the first figure image)."""
    from .methods import ISCAM

    assert config.figures is not None
    rows = []
    for index, file in images:
        sample = dataset[index]
        rows.append({"file": file, "model": config.model.name, "resize": config.model.preprocessing,
                     "png": _png(dataset.preprocess.denormalize(sample.image)), "label": sample.label,
                     "boxes": sample.boxes.flatten().tolist()})
    if rows:
        store.write_part(rows, table="images")
    if trace_key is None:
        return
    spec = next(m for m in config.methods if m.name == "iscam")
    sample = dataset[planned.indices[0]]
    with ISCAM(model, layer, **method_kwargs(config, "iscam", spec.params)) as cam:
        trace = cam.trace(sample.image[None].to(device), channels=config.figures.pipeline_channels)
    store.write_part([{
        **trace_key, "target": trace.target, "probability": trace.probability, "N": trace.N,
        "schedule": trace.schedule, "coefficients": list(trace.coefficients),
        "channel_weights": trace.weights.tolist(), "channels": list(trace.channels),
        "activation": trace.activation.flatten().tolist(), "activation_shape": list(trace.activation.shape),
        "step_scores": trace.step_scores.flatten().tolist(), "raw": trace.raw.flatten().tolist(),
        "raw_shape": list(trace.raw.shape), "forwards": trace.forwards,
    }], table="traces")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def _default_command(config: ExperimentConfig, out: Path) -> str:
    return f"iscam run {shlex.quote(config.name)} --out {shlex.quote(str(out))}"


def _stale(existing: Any, key_tail: Mapping[str, Any], stamp: Mapping[str, Any], files: set[str]) -> set[str]:
    """Files of ``files`` whose stored row (same key) has other stamps than ``stamp``."""
    if existing.empty:
        return set()
    rows = existing
    for column, value in key_tail.items():
        rows = rows[rows[column] == value]
    rows = rows[rows["file"].isin(files)]
    if rows.empty:
        return set()
    same = None
    for column in STAMP_COLUMNS:
        if column == "iscam_version":  # recorded, never a reason to recompute (the algorithm versions are)
            continue
        match = rows[column].astype(str) == str(stamp[column]) if column in rows else False
        same = match if same is None else (same & match)
    return set(rows.loc[~same, "file"]) if same is not None else set()


def run(config: ExperimentConfig, *, out: str | os.PathLike[str] | None = None,
        data_root: str | os.PathLike[str] | None = None, device: str | None = None,
        progress: bool = True, only: Sequence[str] | None = None, recompute_stale: bool = False,
        wait: bool = True, command: str | None = None) -> RunSummary:
    """Compute every row of ``config``'s studies that the store at ``out`` (default ``results/<name>``) lacks.

    ``device`` overrides ``config.device``; ``only`` restricts the run to some variants (``"base"`` = the
    base rows); ``recompute_stale`` recomputes stored rows of this config whose stamps are not the current
    code's or weights' (otherwise they raise :class:`StaleRowsError`); ``wait=False`` raises
    :class:`~iscam.store.StoreBusyError` instead of waiting for another run on the same store; ``command``
    is the command line recorded in ``run.json`` and offered to resume. Under ``torchrun`` each rank computes
    its share (see the module docstring).
    """
    from tqdm.auto import tqdm

    from . import data as iscam_data
    from . import models as iscam_models
    from .paths import optional_data_root

    started = provenance.now()
    check_methods(config)
    torch_device = resolve_device(device or config.device, int(os.environ.get("LOCAL_RANK", "0")))
    folder = Path(out) if out is not None else default_output(config)
    command = command or _default_command(config, folder)
    dist = _init_distributed(torch_device)
    try:
        root = optional_data_root(data_root)
        preprocess = iscam_models.preprocess_for(config.model.name, config.model.resize,
                                                 config.model.input_size)
        dataset = open_images(config, root, preprocess)
        manifest = dataset.source
        studies = plan(config, dataset, only=only)
        layer = config.model.target_layer or iscam_models.default_target_layer(config.model.name)
        store = ResultsStore(folder, rank=dist.rank)
        store.check_writable()
        lock = store.lock(wait=wait, owner=command, on_wait=lambda holder: log.warning(
            "waiting for %s to finish with %s", holder, folder)) if dist.rank == 0 else contextlib.nullcontext()
        with lock:
            _barrier(dist)
            summary = _run_locked(config, studies, store, dataset, manifest, root, layer, torch_device, dist,
                                  started=started, command=command, progress=progress,
                                  recompute_stale=recompute_stale, tqdm=tqdm, data_module=iscam_data)
            _barrier(dist)
        return summary
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run_locked(config: ExperimentConfig, studies: list[PlannedStudy], store: ResultsStore, dataset: Any,
                manifest: Path, root: Path | None, layer: str, device: torch.device, dist: _Dist, *,
                started: str, command: str, progress: bool, recompute_stale: bool, tqdm: Any,
                data_module: Any) -> RunSummary:
    weights = "none" if config.model.weights is None else str(config.model.weights)
    existing = store.keys(with_columns=STAMP_COLUMNS)
    present = set(existing[list(KEY_COLUMNS)].itertuples(index=False, name=None))

    # what is missing, what is stale: decided from the keys alone, before the model is loaded
    work: list[tuple[PlannedStudy, MethodSpec, dict[str, Any], dict[str, Any], list[list[int]]]] = []
    stale_total: dict[str, int] = {}
    scheduled: set[tuple[Any, ...]] = set()
    wanted: set[tuple[Any, ...]] = set()
    for planned in studies:
        sconfig = planned.study.config
        chunks = [list(planned.indices[i:i + sconfig.batch_size])
                  for i in range(0, len(planned.indices), sconfig.batch_size)]
        for spec in sconfig.methods:
            fixed = {"model": sconfig.model.name, "weights": weights, "resize": sconfig.model.preprocessing,
                     "layer": layer, "precision": sconfig.precision, "method": spec.name,
                     "params_key": sconfig.method_key(spec), "metrics_key": sconfig.metrics.key}
            stamp = provenance.row_stamp(spec.name, model=sconfig.model.name, weights=sconfig.model.weights,
                                         seed=sconfig.seed, data_root=root)
            stale = _stale(existing, fixed, stamp, set(planned.files))
            if stale:
                stale_total[spec.label()] = stale_total.get(spec.label(), 0) + len(stale)
            tail = tuple(fixed[c] for c in KEY_COLUMNS[1:])
            wanted.update((f,) + tail for f in planned.files)
            todo = [[i for i in chunk if ((dataset.files[i],) + tail not in present or dataset.files[i] in stale)
                     and (dataset.files[i],) + tail not in scheduled] for chunk in chunks]
            for chunk in todo:
                scheduled.update((dataset.files[i],) + tail for i in chunk)
            work.append((planned, spec, fixed, stamp, [c for c in todo if c]))
    if stale_total and not recompute_stale:
        listing = ", ".join(f"{label}: {count}" for label, count in stale_total.items())
        raise StaleRowsError(f"{store.folder} holds rows of this run computed by other code or weights "
                             f"({listing} rows; their stamps {', '.join(STAMP_COLUMNS[1:])} differ): rerun with "
                             "--recompute-stale to recompute them, or use another --out")
    missing = sum(len(c) for *_, todo in work for c in todo)
    setup = {"model": config.model.name, "weights": weights, "resize": config.model.preprocessing, "layer": layer,
             "precision": config.precision}
    artifacts = [(p, *_missing_artifacts(config, p, store, setup)) for p in studies if p.study.figures]
    artifacts = [(p, images, key) for p, images, key in artifacts if images or key is not None]
    needs_figures = bool(artifacts) and dist.rank == 0
    record = {"status": "running", "command": command, "config": config.to_dict(),
              "plan": [p.record() for p in studies], "started": started, "pid": os.getpid(),
              "manifest": str(manifest), "data_root": None if root is None else str(root),
              "skipped_manifest_rows": len(getattr(dataset, "skipped_rows", []))}
    if dist.rank == 0:
        store.write_provenance(record, history=False)
    store._repair_hint = lambda path: (f"move it away (mv '{path}' '{path}.corrupt') and recompute its rows "
                                       f"with: {command}")

    written = 0
    costs: dict[str, Cost] = {}
    bad_files: set[str] = set()
    if missing or needs_figures:
        loaded = _load_model(config, root, device)
        model = loaded.model
        dataset.preprocess = loaded.preprocess  # the planning used the architecture's default preprocessing
        from .layers import resolve_layer

        resolve_layer(model, layer)  # a wrong target layer fails here, before any image is computed
        runner = _BatchRunner(config, model, device)
        runner.has_boxes = dataset.has_boxes
        for planned, spec, fixed, stamp, todo in work:
            mine = todo[dist.rank::dist.world]
            count = sum(len(c) for c in mine)
            if not count:
                continue
            sconfig = planned.study.config
            runner.config = sconfig
            label = spec.label()
            cost = costs.setdefault(label, Cost())
            desc = f"{config.model.name} {label}" + (f" [{planned.study.title}]" if planned.study.variant else "")
            bar = tqdm(total=count, desc=desc, unit="img", disable=not progress, dynamic_ncols=True,
                       position=dist.rank if dist.active else None, leave=True)
            try:
                with MethodRunner(spec, model, layer, sconfig, sconfig.forward_batch_size) as method:
                    for chunk in mine:
                        produced: set[str] = set()
                        for batch in data_module.iter_batches(dataset, len(chunk), indices=chunk):
                            rows = _process_batch(runner, method, batch, {**fixed, **stamp}, dist.rank)
                            store.write_part(rows)
                            for row in rows:
                                cost.add(row)
                            produced.update(row["file"] for row in rows)
                            written += len(rows)
                        bad_files.update(dataset.files[i] for i in chunk if dataset.files[i] not in produced)
                        bar.update(len(chunk))
            finally:
                bar.close()
        if needs_figures:
            for planned, images, key in artifacts:
                _figure_artifacts(config, planned, dataset, model, layer, device, store, images, key)
    else:
        log.info("%s: every row is already in the store", config.name)
    planned_files = {f for p in studies for f in p.files}
    if planned_files and bad_files >= planned_files:
        raise ConfigError(f"no image of {manifest} could be read (from {getattr(dataset, 'image_dir', '?')}); "
                          "see the warnings above")

    gathered = _gather(dist, {"cost": {k: v.__dict__ for k, v in costs.items()}, "written": written,
                              "bad": sorted(bad_files)})
    total_costs: dict[str, Cost] = {}
    for part in gathered:
        for label, values in part["cost"].items():
            total_costs.setdefault(label, Cost()).merge(Cost(**values))
    cost = {label: value.per_image() for label, value in total_costs.items()}
    final = None
    if dist.rank == 0:
        unreadable = sorted({f for part in gathered for f in part["bad"]})
        final = {**record, **provenance.run_record(
            config.to_dict(), metrics_key=config.metrics.key, started=started, finished=provenance.now(),
            device=device, world_size=dist.world, root=root, manifest=manifest,
            num_images=len(studies[0].files) if studies else 0,
            per_image={label: c["seconds"] for label, c in cost.items()},
            images={label: int(c["images"]) for label, c in cost.items()},
            written=sum(p["written"] for p in gathered)),
            "status": "complete", "cost": cost, "unreadable": unreadable,
            "stale_recomputed": sum(stale_total.values())}
        store.write_provenance(final)
    return RunSummary(out=store.folder, rows_written=written,
                      rows_skipped=len(wanted) - missing,
                      images_skipped=sorted(bad_files), cost=cost, provenance=final,
                      stale_recomputed=sum(stale_total.values()),
                      skipped_manifest_rows=len(getattr(dataset, "skipped_rows", [])))


def _load_model(config: ExperimentConfig, root: Path | None, device: torch.device) -> Any:
    """The config's model; random weights (``weights: null``) are drawn under the config seed, so a run
    with random weights is as repeatable as one with trained weights."""
    from . import models as iscam_models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        loaded = iscam_models.load(config.model.name, config.model.weights, data_root=root, device=str(device),
                                   resize=config.model.resize, input_size=config.model.input_size)
    model = loaded.model.eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return loaded._replace(model=model)


def describe(summary: RunSummary) -> list[str]:
    """The lines the CLI prints after a run: rows, then each method's cost per image."""
    lines = [f"{summary.rows_written} rows computed, {summary.rows_skipped} already present -> {summary.out}"]
    for label, cost in summary.cost.items():
        lines.append(f"  {label}: {cost['seconds']:.3f} s/image (map {cost['map_seconds']:.3f} s + metrics "
                     f"{cost['metric_seconds']:.3f} s), {cost['forwards']:.0f} + {cost['metric_forwards']:.0f} "
                     f"forward passes (map + metrics) on {int(cost['images'])} images")
    if summary.stale_recomputed:
        lines.append(f"  recomputed {summary.stale_recomputed} stale row(s)")
    if summary.skipped_manifest_rows:
        lines.append(f"  skipped {summary.skipped_manifest_rows} bad manifest row(s) (data.on_bad_rows: skip)")
    if summary.images_skipped:
        shown = ", ".join(summary.images_skipped[:10])
        lines.append(f"  skipped {len(summary.images_skipped)} unreadable image(s): {shown}")
    return lines

