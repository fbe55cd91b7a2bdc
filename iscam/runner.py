"""The resumable, sharded runner that fills a :class:`~iscam.store.ResultsStore` from a config.

:func:`run` computes every row of a config's studies (:func:`iscam.config.expand`: the base rows, each
variant's sets, the figures' images) that the store does not hold yet, and the artifacts the book shows
(Fig. 1's IS-CAM trace, the figures' input images), then the tables beside the rows: ROAD from the stored
maps of the base rows (the store's ``road`` table, config ``road:``) and the saliency sanity checks (its
``sanity`` table, config ``sanity:``)::

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
* **No map computed twice.** A study that changes only the metrics (a variant set such as "insertion onto
  zeros") takes each row's map, target and map cost from the earlier study's stored row of the same file,
  method and settings (:func:`_map_identity`) and computes only its metrics: the stored raw map finishes
  into the saliency bit for bit. ``run.json``'s cost counts those rows as ``maps_reused``.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import provenance
from .allocator import tune_allocator
from .config import (
    DEVICES,
    ConfigError,
    ExperimentConfig,
    MethodSpec,
    SanitySpec,
    Study,
    check_methods,
    default_output,
    expand,
    image_seed,
    method_class,
    method_kwargs,
    road_seed,
    select_indices,
)
from .data import UNKNOWN_LABEL
from .store import KEY_COLUMNS, STAMP_COLUMNS, TABLE_KEYS, ResultsStore

__all__ = [
    "Cost",
    "MethodRunner",
    "ROAD_STAMPS",
    "SANITY_STAMPS",
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
    #: rows whose map was not recomputed but taken from the row of the same map under other metric parameters
    #: (they carry that row's map seconds and forwards, so the means stay the cost of one row)
    maps_reused: int = 0

    def add(self, row: Mapping[str, Any], *, map_reused: bool = False) -> None:
        self.images += 1
        self.maps_reused += int(map_reused)
        self.map_seconds += float(row["method_seconds"])
        self.metric_seconds += float(row["metric_seconds"])
        self.forwards += int(row["forward_count"])
        self.metric_forwards += int(row["metric_forward_count"])

    def per_image(self) -> dict[str, float]:
        """Means per image: ``map_seconds``, ``metric_seconds``, ``seconds`` (their sum), ``forwards``,
        ``metric_forwards``, ``total_forwards``, and ``images`` (of which ``maps_reused``)."""
        n = max(1, self.images)
        return {"images": self.images, "maps_reused": self.maps_reused, "map_seconds": self.map_seconds / n,
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
        self.maps_reused += other.maps_reused


@dataclass
class RunSummary:
    """What :func:`run` did (this rank's counts; ``cost`` over every rank when run on rank 0).

    ``rows_written`` / ``rows_skipped`` count the rows table; ``tables`` the ROAD and sanity tables:
    ``{"road": {"rows": ..., "seconds": ...}, "sanity": {...}}`` (rows written and seconds spent, every rank).
    """

    out: Path
    rows_written: int
    rows_skipped: int
    images_skipped: list[str]
    cost: dict[str, dict[str, float]]  # method label -> Cost.per_image()
    provenance: dict[str, Any] | None
    stale_recomputed: int = 0
    skipped_manifest_rows: int = 0
    tables: dict[str, dict[str, float]] = field(default_factory=dict)

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


def _table_studies(config: ExperimentConfig) -> list[str]:
    """The ``--only`` names of the tables ``config`` fills beside the rows: ``road``, ``sanity``."""
    return (["road"] if config.road is not None else []) + (["sanity"] if config.sanity else [])


def plan(config: ExperimentConfig, dataset: Any, *, only: Sequence[str] | None = None) -> list[PlannedStudy]:
    """The studies of ``config`` with their images (``only``: keep those variants; ``"base"`` = the base;
    ``"road"`` and ``"sanity"``, which are not studies of the rows table, are accepted and planned by
    :func:`run`)."""
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
        known = {s.variant or "base" for s in expand(config)} | set(_table_studies(config))
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

    def _make(self, file: str | None = None) -> Any:
        from . import methods as iscam_methods

        kwargs = self.kwargs if file is None else self.kwargs_for(file)
        return iscam_methods.get(self.spec.name, self.model, target_layer=self.layer, **kwargs)

    def seed(self, file: str) -> int | None:
        """The seed of ``file``'s map (None for deterministic methods)."""
        return image_seed(self.config.seed, self.spec.name, file) if self.cls.stochastic else None

    def kwargs_for(self, file: str) -> dict[str, Any]:
        """The constructor keywords of ``file``'s map: :func:`~iscam.config.method_kwargs`, plus ``seed=``
        :meth:`seed` for a stochastic method (the sanity checks build their methods with these too)."""
        return {**self.kwargs, "seed": self.seed(file)} if self.cls.stochastic else dict(self.kwargs)

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
            with self._make(file) as cam:
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
        #: per dataset row, whether its manifest lists a box: a sample whose boxes all fall outside the crop
        #: has none left after mapping, and must not be reported as an image without boxes
        self.listed_boxes: Sequence[bool] = ()

    def metrics(self, x: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                boxes: Sequence[torch.Tensor | None], indices: Sequence[int] = ()) -> dict[str, Any]:
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
                    listed = bool(self.listed_boxes) and self.listed_boxes[indices[i]]
                    skip[i] = "every box outside the crop" if listed else "no boxes in the manifest"
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
                   rank: int, reused: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Maps + metrics for one batch, as store rows; on CUDA out-of-memory, halves the batch and retries.

    ``reused``: for each image of the batch, the stored row whose map (and target) its row takes instead of
    computing them (:func:`_reusable_maps`)."""
    try:
        return _process_batch_once(runner, method, batch, fixed, rank, reused)
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
            return _process_batch(runner, method, batch, fixed, rank, reused)
        half, count = len(batch.files) // 2, len(batch.files)
        return (_process_batch(runner, method, _split_batch(batch, 0, half), fixed, rank,
                               None if reused is None else reused[:half])
                + _process_batch(runner, method, _split_batch(batch, half, count), fixed, rank,
                                 None if reused is None else reused[half:]))


def _split_batch(batch: Any, start: int, stop: int) -> Any:
    return type(batch)(**{name: getattr(batch, name)[start:stop] for name in batch._fields})


def _process_batch_once(runner: _BatchRunner, method: MethodRunner, batch: Any, fixed: Mapping[str, Any],
                        rank: int, reused: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    device = runner.device
    x = batch.x.to(device)
    files = list(batch.files)
    size = (x.shape[-2], x.shape[-1])
    if reused is None:
        with torch.no_grad(), _autocast(device, runner.config.precision):
            target = runner.model.model(x).argmax(dim=1)
        _sync(device)
        start = time.perf_counter()
        raw, forwards = method.maps(x, target, files)
        raw = raw.detach().float()
        saliency = method.finish(raw, size)
        _sync(device)
        map_seconds = [(time.perf_counter() - start) / len(files)] * len(files)
    else:
        # the stored raw map is the computed one bit for bit (float32 both ways), so finishing it again gives
        # the saliency the metrics would have seen; the row keeps the cost of computing that map
        target = torch.tensor([int(row["target"]) for row in reused], device=device)
        raw = torch.stack([torch.from_numpy(np.array(row["map"], dtype=np.float32)).view(
            *(int(v) for v in row["map_shape"])) for row in reused]).to(device)
        saliency = method.finish(raw, size)
        forwards = [int(row["forward_count"]) for row in reused]
        map_seconds = [float(row["method_seconds"]) for row in reused]
    before = runner.model.forwards
    start = time.perf_counter()
    values = runner.metrics(x, saliency, target, list(batch.boxes), batch.indices.tolist())
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
        stored = _stores_map(method.cls.name)
        # float32 arrays, so a part of random-baseline rows (no map) still stores a list<float> column
        row["map"] = raw[i].flatten().numpy().astype(np.float32) if stored else np.zeros(0, np.float32)
        row["map_shape"] = list(raw.shape[-2:]) if stored else list(saliency.shape[-2:])
        row.update(method_seconds=map_seconds[i], metric_seconds=metric_seconds / count,
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
# Stored rows with other stamps (stale)
# --------------------------------------------------------------------------------------------------

def _current(rows: pd.DataFrame, stamp: Mapping[str, Any], columns: Sequence[str]) -> pd.Series:
    """Which of ``rows`` carry the stamps ``stamp`` in ``columns`` (``iscam_version`` is not compared)."""
    same = pd.Series(True, index=rows.index)
    for column in columns:
        if column == "iscam_version":  # recorded, never a reason to recompute (the algorithm versions are)
            continue
        same &= (rows[column].astype(str) == str(stamp[column])) if column in rows else False
    return same


def _matching(existing: pd.DataFrame, key_tail: Mapping[str, Any], files: set[str]) -> pd.DataFrame:
    rows = existing
    for column, value in key_tail.items():
        rows = rows[rows[column] == value]
    return rows[rows["file"].isin(files)]


def _stale(existing: Any, key_tail: Mapping[str, Any], stamp: Mapping[str, Any], files: set[str],
           columns: Sequence[str] = STAMP_COLUMNS) -> set[str]:
    """Files of ``files`` whose stored row (same key) has other stamps than ``stamp`` (in ``columns``)."""
    if existing.empty:
        return set()
    rows = _matching(existing, key_tail, files)
    if rows.empty:
        return set()
    return set(rows.loc[~_current(rows, stamp, columns), "file"])


# --------------------------------------------------------------------------------------------------
# The ROAD and sanity tables: planned from the store's keys, computed after the rows
# --------------------------------------------------------------------------------------------------

#: Stamps of the ROAD and sanity rows: the rows' (the map's method, the weights, torch, the metrics) and the
#: version of the module that computes them (:data:`iscam.road.ROAD_VERSION`,
#: :data:`iscam.sanity.SANITY_VERSION`).
ROAD_STAMPS: tuple[str, ...] = STAMP_COLUMNS + ("road_version",)
SANITY_STAMPS: tuple[str, ...] = STAMP_COLUMNS + ("sanity_version",)


@dataclass
class _RoadUnit:
    """The ROAD rows one base method lacks on one fixed batch of the first ``road.images`` base images."""

    spec: MethodSpec
    key: dict[str, Any]  # the road table's key columns but file
    source: tuple[Any, ...]  # the key columns but file of the base rows whose maps it reads
    stamp: dict[str, Any]
    indices: list[int]


@dataclass
class _SanityUnit:
    """The sanity rows one method of a subset lacks on one fixed batch of the first ``images`` base images.

    ``kept[file][mode]``: the stage positions stored with the current stamps (not recomputed); ``redo``: those
    stored with other stamps (recomputed with ``--recompute-stale``, so no stale row outlives the run)."""

    subset: SanitySpec
    spec: MethodSpec
    key: dict[str, Any]  # the sanity table's key columns but file, randomisation and stage
    stamp: dict[str, Any]
    indices: list[int]
    kept: dict[str, dict[str, set[int]]]
    redo: dict[str, dict[str, set[int]]]


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


def _method_setup(config: ExperimentConfig, spec: MethodSpec, setup: Mapping[str, Any]) -> dict[str, Any]:
    return {**setup, "method": spec.name, "params_key": config.method_key(spec)}


def _plan_road(config: ExperimentConfig, base: Sequence[int], dataset: Any, store: ResultsStore,
               setup: Mapping[str, Any], root: Path | None, rows: pd.DataFrame,
               rows_present: set[tuple[Any, ...]],
               rows_scheduled: set[tuple[Any, ...]]) -> tuple[list[_RoadUnit], dict[str, int]]:
    """The ROAD rows the store lacks (or holds with other stamps), from the keys alone, and the stale counts.

    A ROAD row reads the map of its base row: that row must be stored with the current stamps or computed by
    this run first; otherwise (``--only road`` on a store without those base rows) a :class:`ConfigError` or
    :class:`StaleRowsError` says so before the model is loaded."""
    from .road import ROAD_VERSION

    assert config.road is not None
    chosen = list(base if config.road.images is None else base[:config.road.images])
    files = {dataset.files[i] for i in chosen}
    key_columns = TABLE_KEYS["road"]
    existing = store.keys("road", with_columns=ROAD_STAMPS)
    present = set(existing[list(key_columns)].itertuples(index=False, name=None))
    units: list[_RoadUnit] = []
    stale: dict[str, int] = {}
    unsourced: dict[str, int] = {}
    stale_sources: dict[str, int] = {}
    for spec in config.methods:
        method = _method_setup(config, spec, setup)
        key = {**method, "road_key": config.road.key(config.seed)}
        source = {**method, "metrics_key": config.metrics.key}
        row_stamp = provenance.row_stamp(spec.name, model=config.model.name, weights=config.model.weights,
                                         seed=config.seed, data_root=root)
        stamp = {**row_stamp, "road_version": ROAD_VERSION}
        source_tail = tuple(source[c] for c in KEY_COLUMNS[1:])
        tail = tuple(key[c] for c in key_columns[1:])
        computed_now = {f for f in files if (f,) + source_tail in rows_scheduled}
        old_maps = _stale(rows, source, row_stamp, files) - computed_now
        lacking = {f for f in files if (f,) + source_tail not in rows_present and f not in computed_now}
        if old_maps:
            stale_sources[spec.label()] = len(old_maps)
        if lacking:
            unsourced[spec.label()] = len(lacking)
        redo = _stale(existing, key, stamp, files, ROAD_STAMPS)
        if redo:
            stale[f"road {spec.label()}"] = len(redo)
        for chunk in _chunks(chosen, config.batch_size):
            todo = [i for i in chunk if (dataset.files[i],) + tail not in present or dataset.files[i] in redo]
            if todo:
                units.append(_RoadUnit(spec, key, source_tail, stamp, todo))
    if unsourced:
        listing = ", ".join(f"{label}: {count}" for label, count in unsourced.items())
        raise ConfigError(f"ROAD reads the stored maps of the base rows, which {store.folder} lacks for some "
                          f"of the first {len(chosen)} base images ({listing}) and this run does not "
                          "compute: run with --only base,road (or without --only)")
    if stale_sources:
        listing = ", ".join(f"{label}: {count}" for label, count in stale_sources.items())
        raise StaleRowsError(f"ROAD would read base rows of {store.folder} computed by other code or weights "
                             f"({listing}): recompute them with --only base,road --recompute-stale")
    return units, stale


def _stage_rows(existing: pd.DataFrame, key: Mapping[str, Any], files: set[str], stamp: Mapping[str, Any]
                ) -> dict[str, tuple[set[int], set[int], int]]:
    """file -> (stage positions stored with ``stamp``, positions stored with other stamps, the mode's stages)
    of the stored sanity rows with the key columns ``key``."""
    rows = _matching(existing, key, files)
    if rows.empty:
        return {}
    rows = rows.assign(current=_current(rows, stamp, SANITY_STAMPS))
    found = {}
    for file, group in rows.groupby("file"):
        stages = group["stage"].astype(int)
        found[str(file)] = (set(stages[group["current"]]), set(stages[~group["current"]]),
                            int(group["n_stages"].max()))
    return found


def _plan_sanity(config: ExperimentConfig, base: Sequence[int], dataset: Any, store: ResultsStore,
                 setup: Mapping[str, Any], root: Path | None) -> tuple[list[_SanityUnit], dict[str, int]]:
    """The sanity rows the store lacks (or holds with other stamps), from the keys alone.

    The stages of a mode are known from the stored rows (their ``n_stages``), so a store that holds every row
    is recognised without the model; an image with no row of a mode yet is computed whole."""
    from .sanity import SANITY_VERSION, spread_positions

    existing = store.keys("sanity", with_columns=[*SANITY_STAMPS, "n_stages"])
    units: list[_SanityUnit] = []
    stale: dict[str, int] = {}
    for subset in config.sanity:
        chosen = list(base if subset.images is None else base[:subset.images])
        files = {dataset.files[i] for i in chosen}
        for spec in _sanity_methods(config, subset):
            key = _method_setup(config, spec, setup)
            row_stamp = provenance.row_stamp(spec.name, model=config.model.name, weights=config.model.weights,
                                             seed=config.seed, data_root=root)
            stamp = {**row_stamp, "sanity_version": SANITY_VERSION}
            kept: dict[str, dict[str, set[int]]] = {f: {} for f in files}
            redo: dict[str, dict[str, set[int]]] = {f: {} for f in files}
            complete: set[tuple[str, str]] = set()
            for mode in subset.modes:
                randomisation = {"randomisation": subset.randomisation(mode, config.seed)}
                stored = _stage_rows(existing, {**key, **randomisation}, files, stamp)
                for file, (current, old, total) in stored.items():
                    kept[file][mode], redo[file][mode] = current, old
                    if old:
                        label = f"sanity {spec.label()}"
                        stale[label] = stale.get(label, 0) + len(old)
                    if not old and set(spread_positions(total, subset.stages)) <= current:
                        complete.add((file, mode))
            for chunk in _chunks(chosen, config.batch_size):
                todo = [dataset.files[i] for i in chunk]
                todo = [f for f in todo if any((f, mode) not in complete for mode in subset.modes)]
                if todo:
                    indices = [i for i in chunk if dataset.files[i] in todo]
                    units.append(_SanityUnit(subset, spec, key, stamp, indices, {f: kept[f] for f in todo},
                                             {f: redo[f] for f in todo}))
    return units, stale


def _sanity_methods(config: ExperimentConfig, subset: SanitySpec) -> list[MethodSpec]:
    """The config's methods a sanity subset checks (all of them when it names none)."""
    return [spec for spec in config.methods if not subset.methods or spec.name in subset.methods]


def _sanity_stages(config: ExperimentConfig, model: torch.nn.Module,
                   probe: torch.Tensor) -> dict[str, list[Any]]:
    """Every stage of each sanity subset (:func:`iscam.sanity.randomisation_stages`), found once the model is
    loaded and before any row is computed, so a bad ``granularity`` stops the run before any work."""
    from .sanity import parameterised_layers, randomisation_stages

    stages = {}
    for subset in config.sanity:
        granularity = subset.granularity if isinstance(subset.granularity, str) else list(subset.granularity)
        try:
            layers = parameterised_layers(model, probe, granularity)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise ConfigError(f"sanity.{subset.name}.granularity: {error}") from None
        stages[subset.name] = randomisation_stages(layers, subset.modes)
    return stages


def _stored_rows(store: ResultsStore, tails: set[tuple[Any, ...]], columns: Sequence[str]
                 ) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The stored rows whose key tail (the key without ``file``) is one of ``tails``, by their full key, with
    the key columns and ``columns``."""
    frame = store.read(columns=list(columns))
    keep = [tail in tails for tail in frame[list(KEY_COLUMNS[1:])].itertuples(index=False, name=None)]
    return {(row["file"],) + tuple(row[c] for c in KEY_COLUMNS[1:]): row for row in frame[keep].to_dict("records")}


def _road_sources(store: ResultsStore, units: Sequence[_RoadUnit]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The stored base rows the ROAD units read (map, map_shape, target, index), by their full key."""
    return _stored_rows(store, {unit.source for unit in units}, ["index", "target", "map", "map_shape"])


def _road_rows(unit: _RoadUnit, config: ExperimentConfig, runner: _BatchRunner, layer: str, batch: Any,
               sources: Mapping[tuple[Any, ...], Mapping[str, Any]], std: Sequence[float],
               rank: int) -> list[dict[str, Any]]:
    """ROAD rows of one unit's images: their stored maps rebuilt (:func:`iscam.methods.reconstruct`; the
    random baseline's from its seed), MoRF and LeRF curves at the config's fractions with ROAD's noise seeded
    by :func:`~iscam.config.road_seed`, explaining the stored row's target. Images without a stored base row
    (unreadable when the rows were computed) have no ROAD row."""
    from . import methods as iscam_methods
    from .road import road_curve, road_noise, road_scores

    assert config.road is not None
    keep = [i for i, file in enumerate(batch.files) if (file,) + unit.source in sources]
    if not keep:
        return []
    files = [batch.files[i] for i in keep]
    device = runner.device
    x = batch.x[keep].to(device)
    size = (x.shape[-2], x.shape[-1])
    method = MethodRunner(unit.spec, runner.model.model, layer, config)
    stored = [sources[(file,) + unit.source] for file in files]
    maps = []
    for file, row in zip(files, stored):
        values = np.asarray(row["map"], dtype=np.float32)
        raw = None if values.size == 0 else torch.tensor(values).view(1, *(int(v) for v in row["map_shape"]))
        maps.append(iscam_methods.reconstruct(unit.spec.name, raw, size, unit.spec.params,
                                              seed=method.seed(file)))
    saliency = torch.cat(maps).to(device)
    targets = [int(row["target"]) for row in stored]
    target = torch.tensor(targets, device=device)
    seeds = [road_seed(config.seed, file) for file in files]
    before = runner.model.forwards
    start = time.perf_counter()
    with torch.no_grad(), _autocast(device, config.precision):
        curves = {order: road_curve(runner.model, x, saliency, target, order=order,
                                    fractions=config.road.fractions, noise=road_noise(std), seed=seeds,
                                    batch_size=runner.metric_batch).float().cpu()
                  for order in ("morf", "lerf")}
    _sync(device)
    seconds = time.perf_counter() - start
    forwards = runner.model.forwards - before
    scores = road_scores(curves["morf"], curves["lerf"])
    count = len(files)
    return [{
        "file": file, **unit.key, "index": int(stored[i]["index"]), "label": int(batch.labels[keep[i]]),
        "target": targets[i], "road_fractions": list(config.road.fractions), "road_seed": seeds[i],
        "road_morf_curve": curves["morf"][i].tolist(), "road_lerf_curve": curves["lerf"][i].tolist(),
        "road_morf": float(scores.morf[i]), "road_lerf": float(scores.lerf[i]),
        "road_gap": float(scores.gap[i]), **unit.stamp, "road_seconds": seconds / count,
        "road_forward_count": round(forwards / count), "rank": rank,
    } for i, file in enumerate(files)]


def _sanity_rows(unit: _SanityUnit, config: ExperimentConfig, model: torch.nn.Module, layer: str, batch: Any,
                 stages: Sequence[Any], computed: set[tuple[Any, ...]], device: torch.device,
                 rank: int) -> list[dict[str, Any]]:
    """Sanity rows of one unit's images (:func:`iscam.sanity.sanity_rows`) at the stage positions they lack.

    The method is built as the base rows build it (:meth:`MethodRunner.kwargs_for`): a stochastic method gets
    each image's seed, so it runs one image at a time; a deterministic one runs on the images that lack the
    same stages together. ``computed`` holds the rows this run wrote (subsets may overlap)."""
    from .sanity import SIMILARITY_METRICS, sanity_rows, spread_positions

    method = MethodRunner(unit.spec, model, layer, config, config.forward_batch_size)
    totals = {mode: sum(stage.mode == mode for stage in stages) for mode in unit.subset.modes}
    keys = {mode: unit.subset.randomisation(mode, config.seed) for mode in unit.subset.modes}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, file in enumerate(batch.files):
        needed = []
        for mode in unit.subset.modes:
            wanted = set(spread_positions(totals[mode], unit.subset.stages))
            wanted |= unit.redo[file].get(mode, set())
            wanted -= unit.kept[file].get(mode, set())
            wanted -= {k for k in wanted if _sanity_id(file, unit, keys[mode], k) in computed}
            needed.append((mode, tuple(sorted(wanted))))
        if any(positions for _, positions in needed):
            groups.setdefault((tuple(needed), file if method.cls.stochastic else None), []).append(i)
    rows: list[dict[str, Any]] = []
    for (needed, _), members in groups.items():
        wanted = dict(needed)
        chosen = [stage for stage in stages if stage.index in wanted[stage.mode]]
        files = [batch.files[i] for i in members]
        start = time.perf_counter()
        found = sanity_rows(model, batch.x[members].to(device), {unit.spec.name: method.kwargs_for(files[0])},
                            layer=layer, stages=chosen, seed=config.seed)
        _sync(device)
        seconds = (time.perf_counter() - start) / max(1, len(found))
        for row in found:
            position = members[row["image"]]
            file = batch.files[position]
            rows.append({
                "file": file, **unit.key, "randomisation": keys[row["mode"]], "stage": int(row["stage"]),
                "mode": row["mode"], "randomised": row["randomised"],
                "n_randomised": int(row["n_randomised"]), "n_stages": totals[row["mode"]],
                "index": int(batch.indices[position]), "label": int(batch.labels[position]),
                "target": int(row["target"]), **{metric: float(row[metric]) for metric in SIMILARITY_METRICS},
                **unit.stamp, "sanity_seconds": seconds, "rank": rank})
            computed.add(_sanity_id(file, unit, keys[row["mode"]], int(row["stage"])))
    return rows


def _sanity_id(file: str, unit: _SanityUnit, randomisation: str, stage: int) -> tuple[Any, ...]:
    """A sanity row's key within one run (the setup is the run's)."""
    return (file, unit.spec.name, unit.key["params_key"], randomisation, stage)


def _fill_tables(config: ExperimentConfig, store: ResultsStore, dataset: Any, runner: _BatchRunner,
                 layer: str, stages: Mapping[str, Sequence[Any]], road_units: Sequence[_RoadUnit],
                 sanity_units: Sequence[_SanityUnit], dist: _Dist, counts: dict[str, dict[str, Any]], *,
                 tqdm: Any, progress: bool, data_module: Any) -> None:
    """This rank's share of the ROAD and sanity units (unit ``j`` goes to rank ``j % WORLD_SIZE``), each
    written as one atomic part of its table, so a kill loses at most the unit in flight."""
    work: list[tuple[str, Any]] = [("road", unit) for unit in road_units[dist.rank::dist.world]]
    work += [("sanity", unit) for unit in sanity_units[dist.rank::dist.world]]
    sources = _road_sources(store, road_units) if road_units else {}
    computed: set[tuple[Any, ...]] = set()
    bar = tqdm(total=sum(len(unit.indices) for _, unit in work), desc=f"{config.model.name} ROAD + sanity",
               unit="img", disable=not progress, dynamic_ncols=True,
               position=dist.rank if dist.active else None, leave=True)
    try:
        for table, unit in work:
            for batch in data_module.iter_batches(dataset, len(unit.indices), indices=unit.indices):
                if table == "road":
                    rows = _road_rows(unit, config, runner, layer, batch, sources, dataset.preprocess.std,
                                      dist.rank)
                    seconds = sum(row["road_seconds"] for row in rows)
                else:
                    rows = _sanity_rows(unit, config, runner.model.model, layer, batch,
                                        stages[unit.subset.name], computed, runner.device, dist.rank)
                    seconds = sum(row["sanity_seconds"] for row in rows)
                store.write_part(rows, table=table)
                counts[table]["rows"] += len(rows)
                counts[table]["seconds"] += seconds
            bar.update(len(unit.indices))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def _stores_map(method: str) -> bool:
    """Whether ``method``'s rows store their raw map (the random baseline's is rebuilt from its seed)."""
    return method != "random"


def _map_identity(sconfig: ExperimentConfig, fixed: Mapping[str, Any], stamp: Mapping[str, Any]) -> str:
    """What a row's map depends on: its key and stamps but the metrics', and its study's settings but the
    metrics and the list of methods (model, data, seed, device, precision, batch sizes, memory layout).

    Two studies whose rows have the same identity differ only in the metrics (a variant set like
    "insertion onto zeros"): the later one reuses the earlier one's maps (:func:`_reusable_maps`)."""
    setup = {k: v for k, v in sconfig.to_dict().items() if k not in ("metrics", "methods")}
    return json.dumps([setup, {k: v for k, v in fixed.items() if k != "metrics_key"},
                       {k: v for k, v in stamp.items() if k != "metrics_version"}], sort_keys=True, default=str)


def _reusable_maps(store: ResultsStore, origin: tuple[Any, ...], stamp: Mapping[str, Any]
                   ) -> dict[str, dict[str, Any]]:
    """The stored rows with key tail ``origin`` (the same map under other metrics) and the map's ``stamp``, by
    file: their raw map, target and map cost. Rows another rank has not written yet are absent: those maps
    are computed."""
    stamps = [c for c in STAMP_COLUMNS if c != "metrics_version"]
    rows = _stored_rows(store, {origin}, ["target", "map", "map_shape", "method_seconds", "forward_count", *stamps])
    return {key[0]: row for key, row in rows.items() if all(row[c] == stamp[c] for c in stamps)}


def _default_command(config: ExperimentConfig, out: Path) -> str:
    return f"iscam run {shlex.quote(config.name)} --out {shlex.quote(str(out))}"


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
    # glibc would map, zero-fill and unmap every large forward batch: the kernel then takes more time than
    # torch (issue 12); keeping freed memory in the heap removes that, and changes no number
    allocator = tune_allocator()
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
                                  recompute_stale=recompute_stale, tqdm=tqdm, data_module=iscam_data,
                                  tables=[t for t in _table_studies(config) if not only or t in only],
                                  allocator=allocator)
            _barrier(dist)
        return summary
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _run_locked(config: ExperimentConfig, studies: list[PlannedStudy], store: ResultsStore, dataset: Any,
                manifest: Path, root: Path | None, layer: str, device: torch.device, dist: _Dist, *,
                started: str, command: str, progress: bool, recompute_stale: bool, tqdm: Any,
                data_module: Any, tables: Sequence[str] = (), allocator: Mapping[str, int] | None = None
                ) -> RunSummary:
    weights = "none" if config.model.weights is None else str(config.model.weights)
    existing = store.keys(with_columns=STAMP_COLUMNS)
    present = set(existing[list(KEY_COLUMNS)].itertuples(index=False, name=None))

    # what is missing, what is stale: decided from the keys alone, before the model is loaded
    work: list[tuple[PlannedStudy, MethodSpec, dict[str, Any], dict[str, Any], list[list[int]],
                     tuple[Any, ...] | None]] = []
    stale_total: dict[str, int] = {}
    scheduled: set[tuple[Any, ...]] = set()
    wanted: set[tuple[Any, ...]] = set()
    map_origin: dict[str, tuple[Any, ...]] = {}  # _map_identity -> the key tail of the first rows with it
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
            origin = map_origin.setdefault(_map_identity(sconfig, fixed, stamp), tail)
            reuse = origin if origin != tail and _stores_map(spec.name) else None
            work.append((planned, spec, fixed, stamp, [c for c in todo if c], reuse))
    setup = {"model": config.model.name, "weights": weights, "resize": config.model.preprocessing, "layer": layer,
             "precision": config.precision}
    base = select_indices(len(dataset.files), config.data)
    road_units: list[_RoadUnit] = []
    sanity_units: list[_SanityUnit] = []
    if "road" in tables:
        road_units, stale = _plan_road(config, base, dataset, store, setup, root, existing, present,
                                       scheduled)
        stale_total.update(stale)
    if "sanity" in tables:
        sanity_units, stale = _plan_sanity(config, base, dataset, store, setup, root)
        stale_total.update(stale)
    if stale_total and not recompute_stale:
        listing = ", ".join(f"{label}: {count}" for label, count in stale_total.items())
        raise StaleRowsError(f"{store.folder} holds rows of this run computed by other code or weights "
                             f"({listing} rows; their stamps {', '.join(STAMP_COLUMNS[1:])} differ): rerun with "
                             "--recompute-stale to recompute them, or use another --out")
    missing = sum(len(c) for *_, todo, _reuse in work for c in todo)
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

    with _failure_recorded(store, record, rank=dist.rank):
        written = 0
        costs: dict[str, Cost] = {}
        bad_files: set[str] = set()
        table_counts = {name: {"rows": 0, "seconds": 0.0} for name in tables}
        if missing or needs_figures or road_units or sanity_units:
            loaded = _load_model(config, root, device)
            model = loaded.model
            dataset.preprocess = loaded.preprocess  # the planning used the architecture's default preprocessing
            from .layers import resolve_layer

            resolve_layer(model, layer)  # a wrong target layer fails here, before any image is computed
            size = dataset.preprocess.size  # the layers' forward order does not depend on the pixels
            probe = torch.zeros(1, 3, size, size, device=device)
            stages = _sanity_stages(config, model, probe) if sanity_units else {}
            runner = _BatchRunner(config, model, device)
            runner.has_boxes = dataset.has_boxes
            runner.listed_boxes = [len(b) > 0 for b in dataset.boxes] if dataset.has_boxes else ()
            for planned, spec, fixed, stamp, todo, reuse in work:
                mine = todo[dist.rank::dist.world]
                count = sum(len(c) for c in mine)
                if not count:
                    continue
                sources = {} if reuse is None else _reusable_maps(store, reuse, stamp)
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
                                reused = [sources.get(file) for file in batch.files]
                                reused_all = all(r is not None for r in reused)
                                rows = _process_batch(runner, method, batch, {**fixed, **stamp}, dist.rank,
                                                      reused if reused_all else None)
                                store.write_part(rows)
                                for row in rows:
                                    cost.add(row, map_reused=reused_all)
                                produced.update(row["file"] for row in rows)
                                written += len(rows)
                            bad_files.update(dataset.files[i] for i in chunk if dataset.files[i] not in produced)
                            bar.update(len(chunk))
                finally:
                    bar.close()
            if needs_figures:
                for planned, images, key in artifacts:
                    _figure_artifacts(config, planned, dataset, model, layer, device, store, images, key)
            if road_units or sanity_units:  # the same on every rank: planned from the same keys
                runner.config = config
                _barrier(dist)  # ROAD reads the maps every rank has written
                _fill_tables(config, store, dataset, runner, layer, stages, road_units, sanity_units, dist,
                             table_counts, tqdm=tqdm, progress=progress, data_module=data_module)
        else:
            log.info("%s: every row is already in the store", config.name)
        planned_files = {f for p in studies for f in p.files}
        if planned_files and bad_files >= planned_files:
            raise ConfigError(f"no image of {manifest} could be read (from {getattr(dataset, 'image_dir', '?')}); "
                              "see the warnings above")

        gathered = _gather(dist, {"cost": {k: v.__dict__ for k, v in costs.items()}, "written": written,
                                  "bad": sorted(bad_files), "tables": table_counts})
        total_costs: dict[str, Cost] = {}
        for part in gathered:
            for label, values in part["cost"].items():
                total_costs.setdefault(label, Cost()).merge(Cost(**values))
        table_summary = {name: {measure: sum(part["tables"][name][measure] for part in gathered)
                                for measure in ("rows", "seconds")} for name in tables}
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
                "status": "complete", "cost": cost, "unreadable": unreadable, "allocator": dict(allocator or {}),
                "stale_recomputed": sum(stale_total.values()), "tables": table_summary}
            store.write_provenance(final)
    return RunSummary(out=store.folder, rows_written=written,
                      rows_skipped=len(wanted) - missing,
                      images_skipped=sorted(bad_files), cost=cost, provenance=final,
                      stale_recomputed=sum(stale_total.values()),
                      skipped_manifest_rows=len(getattr(dataset, "skipped_rows", [])), tables=table_summary)


@contextlib.contextmanager
def _failure_recorded(store: ResultsStore, record: dict[str, Any], *, rank: int) -> Iterator[None]:
    """On an exception, ``run.json`` says the run ``failed`` (or was ``interrupted``) and why, instead of
    ``running`` forever; the rows already written stay (a rerun computes only the rest). A SIGKILL leaves
    ``running``, which readers report as "in progress or killed"."""
    try:
        yield
    except BaseException as error:
        if rank == 0:
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            reason = (str(error).splitlines() or [""])[0][:500]
            try:
                store.write_provenance({**record, "status": status, "finished": provenance.now(),
                                        "error": f"{type(error).__name__}: {reason}".rstrip(": ")},
                                       history=False)
            except OSError:
                pass  # the original error matters more than the record of it
        raise


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
                     f"forward passes (map + metrics) on {int(cost['images'])} images"
                     + (f" ({int(cost['maps_reused'])} maps reused from the same rows under other metrics)"
                        if cost.get("maps_reused") else ""))
    for name, counts in summary.tables.items():
        lines.append(f"  {name}: {int(counts['rows'])} rows computed in {counts['seconds']:.1f} s")
    if summary.stale_recomputed:
        lines.append(f"  recomputed {summary.stale_recomputed} stale row(s)")
    if summary.skipped_manifest_rows:
        lines.append(f"  skipped {summary.skipped_manifest_rows} bad manifest row(s) (data.on_bad_rows: skip)")
    if summary.images_skipped:
        shown = ", ".join(summary.images_skipped[:10])
        lines.append(f"  skipped {len(summary.images_skipped)} unreadable image(s): {shown}")
    return lines

