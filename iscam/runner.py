"""The resumable, sharded runner that fills a :class:`~iscam.store.ResultsStore` from a config.

:func:`run` computes every (image, method, parameters) row of a :class:`~iscam.config.ExperimentConfig` that
the store does not hold yet::

    summary = run(load_config("smoke"), out="results/smoke")

How the runner keeps its promises:

* **Resumable.** Images are cut into fixed batches of ``batch_size`` consecutive selected images; each
  (method, batch) is computed and written as one atomic part. A kill loses at most the batch in flight; a
  rerun reads the keys already stored and computes only the missing rows, so a new ``N`` adds rows.
* **Deterministic.** Batches are fixed by position, not by what is left to do, so a resumed run sends the
  same images together as an uninterrupted one. Stochastic methods (SS-CAM, Smooth Grad-CAM++, the random
  baseline) are run one image at a time under a seed derived from (config seed, method, file)
  (:func:`~iscam.config.image_seed`), so a row never depends on which other images were computed with it.
* **Multi-GPU.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on CUDA,
  Gloo on CPU, GPU = ``LOCAL_RANK``) and batch ``j`` goes to rank ``j % WORLD_SIZE``: every rank writes its
  own parts, and because a batch holds the same images whatever the world size, the merged store equals a
  one-process run. Rank 0 writes ``run.json`` after a barrier.
* **Robust.** Unreadable images are logged and skipped (``iscam.data``); a CUDA out-of-memory error halves
  the batch (and the forward batch inside methods and metrics) and retries; Ctrl-C propagates after the
  finished parts are on disk (the CLI turns it into exit status 130 with a resume hint).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import provenance
from .config import (
    DEVICES,
    ConfigError,
    DataSpec,
    ExperimentConfig,
    MethodSpec,
    default_output,
    image_seed,
    method_class,
    method_kwargs,
    select_indices,
)
from .store import KEY_COLUMNS, ResultsStore

__all__ = ["RunSummary", "MethodRunner", "run", "resolve_device", "resolve_manifest"]

log = logging.getLogger("iscam.runner")


@dataclass
class RunSummary:
    """What :func:`run` did (this rank's counts; ``seconds_per_image`` over every rank)."""

    out: Path
    rows_written: int
    rows_skipped: int
    images_skipped: list[str]
    seconds_per_image: dict[str, float]
    provenance: dict[str, Any] | None


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
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


def resolve_manifest(spec: DataSpec, root: Path | None) -> tuple[Path, Path | None]:
    """The manifest CSV and the image folder (None = beside the manifest)."""
    from . import data as iscam_data

    text = spec.manifest
    if text.endswith(".csv") or os.sep in text:
        candidates = [Path(text).expanduser()]
        if not candidates[0].is_absolute() and root is not None:
            candidates.append(root / text)
        manifest = next((p for p in candidates if p.is_file()), None)
        if manifest is None:
            raise ConfigError(f"data.manifest {text!r} not found (looked at {', '.join(map(str, candidates))})")
    else:
        manifest = Path(iscam_data.sample_manifest(root, text))
    image_dir = None
    if spec.image_dir is not None:
        image_dir = Path(spec.image_dir).expanduser()
        if not image_dir.is_absolute():
            if root is None:
                raise ConfigError("data.image_dir is relative to the data root, but no data root is set")
            image_dir = root / image_dir
        if not image_dir.is_dir():
            raise ConfigError(f"data.image_dir {str(image_dir)!r} is not an existing folder")
    return manifest, image_dir



class MethodRunner:
    """One configured method, callable on a batch: ``maps(x, target, files) -> (saliency, forwards)``.

    Deterministic methods keep one object (hooks placed once) for the whole run. A stochastic method gets
    a fresh object per image constructed with ``seed=image_seed(config seed, method, file)``: its map then
    depends on nothing but that image, whatever else was computed before or beside it.
    """

    def __init__(self, spec: MethodSpec, model: torch.nn.Module, layer: str, config: ExperimentConfig,
                 forward_batch: int) -> None:
        self.spec = spec
        self.model = model
        self.layer = layer
        self.config = config
        self.stochastic = method_class(spec.name).stochastic
        self.kwargs = method_kwargs(config, spec.name, spec.params, forward_batch=forward_batch)
        self.seed_param = "seed" in inspect.signature(method_class(spec.name)).parameters
        self.cam: Any = None

    def _make(self, **extra: Any) -> Any:
        from . import methods as iscam_methods

        return iscam_methods.get(self.spec.name, self.model, target_layer=self.layer, **self.kwargs, **extra)

    def __enter__(self) -> MethodRunner:
        if not self.stochastic:
            self.cam = self._make()
        return self

    def __exit__(self, *exc: Any) -> None:
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
        if not self.stochastic:
            before = self.cam.forward_count
            saliency = self.cam(x, target)
            share = (self.cam.forward_count - before) / max(1, len(files))
            return saliency, [int(round(share))] * len(files)
        maps, forwards = [], []
        for i, file in enumerate(files):
            seed = image_seed(self.config.seed, self.spec.name, file)
            if self.seed_param:
                with self._make(seed=seed) as cam:
                    maps.append(cam(x[i:i + 1], target[i:i + 1]))
                    forwards.append(cam.forward_count)
            else:  # a stochastic method without a seed argument draws from torch's global generator
                with _seeded(seed, x.device), self._make() as cam:
                    maps.append(cam(x[i:i + 1], target[i:i + 1]))
                    forwards.append(cam.forward_count)
        return torch.cat(maps), forwards


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for one map; the caller's RNG state is restored afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The config's precision for the forwards the runner makes itself (targets, metrics)."""
    from .methods.base import amp_autocast

    return amp_autocast(device, None if precision == "fp32" else precision)


def _valid_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clipped to the frame, without those that fall outside it (e.g. after a centre crop)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    clipped = boxes.clone().float()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep]


def _is_oom(error: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


class _ChannelsLast(torch.nn.Module):
    """Feeds a channels-last model channels-last inputs (2x faster convolutions on CPUs, same values up to
    rounding), so the metrics' many forward passes run as fast as the methods'."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


class _BatchRunner:
    """Computes one method's maps and every metric on one batch of images."""

    def __init__(self, config: ExperimentConfig, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        self.model: torch.nn.Module = _ChannelsLast(model) if config.channels_last else model
        self.device = device
        self.metric_batch = config.metrics.batch_size

    def metrics(self, x: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                boxes: Sequence[torch.Tensor]) -> dict[str, Any]:
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
        pointing = list(nan)
        if spec.pointing is not None:
            height, width = saliency.shape[-2:]
            valid = [(i, _valid_boxes(b, height, width)) for i, b in enumerate(boxes)]
            valid = [(i, b) for i, b in valid if b.shape[0] > 0]
            if valid:
                rows = [i for i, _ in valid]
                values = M.energy_pointing_game(saliency[rows].float(), [b for _, b in valid])
                for i, value in zip(rows, values.float().tolist()):
                    pointing[i] = value
        out["pointing"] = pointing
        return out


def run(config: ExperimentConfig, *, out: str | os.PathLike[str] | None = None,
        data_root: str | os.PathLike[str] | None = None, device: str | None = None,
        progress: bool = True) -> RunSummary:
    """Compute every row of ``config`` that the store at ``out`` (default ``results/<name>``) lacks.

    ``device`` overrides ``config.device``. Under ``torchrun`` each rank computes its share (see the
    module docstring). Returns a :class:`RunSummary`; ``run.json`` is (re)written by rank 0 at the end.
    """
    from tqdm.auto import tqdm

    from . import data as iscam_data
    from . import models as iscam_models
    from .paths import data_root as resolve_root

    started = provenance.now()
    requested = device or config.device
    if requested not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {requested!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(requested, local_rank)
    dist = _init_distributed(torch_device)
    try:
        root = resolve_root(data_root)
        loaded = iscam_models.load(config.model.name, config.model.weights, data_root=root,
                                   device=str(torch_device), resize=config.model.resize)
        model = loaded.model.eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        layer = config.model.target_layer or loaded.target_layer
        manifest, image_dir = resolve_manifest(config.data, root)
        dataset = iscam_data.ManifestDataset(manifest, loaded.preprocess, image_dir=image_dir)
        files = _manifest_files(dataset, manifest)
        indices = select_indices(len(files), config.data)
        chunks = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]
        mine = chunks[dist.rank::dist.world]

        store = ResultsStore(out if out is not None else default_output(config), rank=dist.rank)
        store.folder.mkdir(parents=True, exist_ok=True)
        done = store.keys()
        weights = "none" if config.model.weights is None else str(config.model.weights)
        metrics_key = config.metrics.key
        runner = _BatchRunner(config, model, torch_device)
        written = skipped = 0
        bad_files: set[str] = set()
        seconds: dict[str, float] = {}
        images_done: dict[str, int] = {}

        for spec in config.methods:
            pkey = config.method_key(spec)
            key_tail = (config.model.name, weights, config.model.resize, layer, config.precision,
                        spec.name, pkey, metrics_key)
            todo = [[i for i in chunk if (files[i],) + key_tail not in done] for chunk in mine]
            todo = [c for c in todo if c]
            missing = sum(len(c) for c in todo)
            skipped += sum(len(c) for c in mine) - missing
            label = spec.label()
            if not missing:
                log.info("%s: every row is already in the store", label)
                continue
            bar = tqdm(total=missing, desc=f"{config.model.name} {label}", unit="img", disable=not progress,
                       dynamic_ncols=True, position=dist.rank if dist.active else None, leave=True)
            method_seconds = 0.0
            try:
                with MethodRunner(spec, model, layer, config, config.forward_batch_size) as method:
                    for chunk in todo:
                        produced: set[str] = set()
                        for batch in iscam_data.iter_batches(dataset, len(chunk), indices=chunk):
                            rows, spent = _process_batch(runner, method, batch, key_tail, dist.rank)
                            store.write_part(rows)
                            produced.update(row["file"] for row in rows)
                            method_seconds += spent
                            written += len(rows)
                        bad_files.update(files[i] for i in chunk if files[i] not in produced)
                        bar.update(len(chunk))
            finally:
                bar.close()
            seconds[label] = seconds.get(label, 0.0) + method_seconds
            images_done[label] = images_done.get(label, 0) + missing
        finished = provenance.now()

        gathered = _gather(dist, {"seconds": seconds, "images": images_done, "written": written})
        record = None
        _barrier(dist)
        if dist.rank == 0:
            total_seconds: dict[str, float] = {}
            total_images: dict[str, int] = {}
            for part in gathered:
                for label, value in part["seconds"].items():
                    total_seconds[label] = total_seconds.get(label, 0.0) + value
                    total_images[label] = total_images.get(label, 0) + part["images"][label]
            per_image = {label: total_seconds[label] / max(1, total_images[label]) for label in total_seconds}
            record = provenance.run_record(
                config.to_dict(), metrics_key=config.metrics.key, started=started, finished=finished,
                device=torch_device, world_size=dist.world, root=root, manifest=manifest,
                num_images=len(indices), per_image=per_image, images=total_images,
                written=sum(p["written"] for p in gathered))
            store.write_provenance(record)
        _barrier(dist)
        per_image_mine = {label: seconds[label] / max(1, images_done[label]) for label in seconds}
        return RunSummary(out=store.folder, rows_written=written, rows_skipped=skipped,
                          images_skipped=sorted(bad_files), seconds_per_image=per_image_mine,
                          provenance=record)
    finally:
        if dist.owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _manifest_files(dataset: Any, manifest: Path) -> list[str]:
    """File names of the manifest rows, in order."""
    names = [str(f) for f in getattr(dataset, "files", [])]
    if len(names) != len(dataset):
        raise ConfigError(f"manifest {manifest}: the dataset lists {len(names)} files for {len(dataset)} rows")
    return names


def _process_batch(runner: _BatchRunner, method: MethodRunner, batch: Any, key_tail: tuple[Any, ...],
                   rank: int) -> tuple[list[dict[str, Any]], float]:
    """Maps + metrics for one batch, as store rows; on CUDA out-of-memory, halves the batch and retries."""
    try:
        return _process_batch_once(runner, method, batch, key_tail, rank)
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
            return _process_batch(runner, method, batch, key_tail, rank)
        half = len(batch.files) // 2
        rows_a, time_a = _process_batch(runner, method, _split_batch(batch, 0, half), key_tail, rank)
        rows_b, time_b = _process_batch(runner, method, _split_batch(batch, half, len(batch.files)), key_tail, rank)
        return rows_a + rows_b, time_a + time_b


def _split_batch(batch: Any, start: int, stop: int) -> Any:
    values = {}
    for name in batch._fields:
        value = getattr(batch, name)
        values[name] = value[start:stop]
    return type(batch)(**values)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _process_batch_once(runner: _BatchRunner, method: MethodRunner, batch: Any, key_tail: tuple[Any, ...],
                        rank: int) -> tuple[list[dict[str, Any]], float]:
    device = runner.device
    x = batch.x.to(device)
    files = list(batch.files)
    with torch.no_grad(), _autocast(device, runner.config.precision):
        target = runner.model(x).argmax(dim=1)
    _sync(device)
    start = time.perf_counter()
    saliency, forwards = method.maps(x, target, files)
    saliency = saliency.detach().float()
    _sync(device)
    method_seconds = time.perf_counter() - start
    start = time.perf_counter()
    values = runner.metrics(x, saliency, target, list(batch.boxes))
    _sync(device)
    metric_seconds = time.perf_counter() - start
    labels = [int(v) for v in (batch.labels.tolist() if hasattr(batch.labels, "tolist") else batch.labels)]
    indices = [int(v) for v in (batch.indices.tolist() if hasattr(batch.indices, "tolist") else batch.indices)]
    targets = target.tolist()
    rows = []
    count = len(files)
    for i, file in enumerate(files):
        row: dict[str, Any] = dict(zip(KEY_COLUMNS, (file,) + key_tail))
        row.update(index=indices[i], label=labels[i], target=int(targets[i]), correct=labels[i] == targets[i])
        for name in ("y", "o", "drop", "increase", "change", "insertion_auc", "deletion_auc", "pointing",
                     "insertion_curve", "deletion_curve"):
            row[name] = values[name][i]
        row.update(method_seconds=method_seconds / count, metric_seconds=metric_seconds / count,
                   forward_count=int(forwards[i]), rank=rank)
        rows.append(row)
    return rows, method_seconds
