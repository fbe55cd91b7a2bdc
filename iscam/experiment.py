"""Experiment configs and the resumable, sharded runner that fills a :class:`~iscam.store.ResultsStore`.

A run is described by a small YAML config (``configs/<name>.yaml``; see ``configs/paper-vgg16.yaml`` for
every field with comments). :func:`load_config` reads one by name or path and applies ``--set``-style
overrides; :func:`run` computes every (image, method, parameters) row the store does not hold yet::

    config = load_config("smoke", ["data.num_images=2", "methods.iscam.N=3"])
    summary = run(config, out="results/smoke")

How the runner keeps its promises:

* **Resumable.** Images are cut into fixed batches of ``batch_size`` consecutive selected images; each
  (method, batch) is computed and written as one atomic part. A kill loses at most the batch in flight; a
  rerun reads the keys already stored and computes only the missing rows, so a new ``N`` adds rows.
* **Deterministic.** Batches are fixed by position, not by what is left to do, so a resumed run sends the
  same images together as an uninterrupted one. Stochastic methods (SS-CAM, Smooth Grad-CAM++, the random
  baseline) are run one image at a time under a seed derived from (config seed, method, file)
  (:func:`image_seed`), so a row never depends on which other images were computed with it.
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
import copy
import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import inspect
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .store import KEY_COLUMNS, ResultsStore, params_key

__all__ = [
    "ConfigError",
    "ModelSpec",
    "DataSpec",
    "MethodSpec",
    "MetricsSpec",
    "ExperimentConfig",
    "CONFIG_DIR",
    "STOCHASTIC_METHODS",
    "config_names",
    "find_config",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "image_seed",
    "method_key",
    "method_kwargs",
    "resolved_params",
    "select_indices",
    "default_output",
    "RunSummary",
    "run",
]

log = logging.getLogger("iscam.experiment")

#: configs shipped with the repository (``<repo>/configs``); a config may also be any YAML path.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: methods whose maps depend on random numbers: run one image at a time under :func:`image_seed`.
STOCHASTIC_METHODS = frozenset({"sscam", "smoothgradcampp", "random"})
#: method keyword arguments that change speed/memory, never the result: kept out of ``params_key``.
_EXECUTION_PARAMS = frozenset(
    {"batch_size", "amp", "device", "seed", "generator", "channels_last", "dedup", "compile"}
)
#: ... of which these are set by the runner itself (from batch_size, precision and seed in the config).
_RUNNER_PARAMS = frozenset({"batch_size", "amp", "device", "seed", "generator"})
_DEVICES = ("auto", "cpu", "cuda")
_PRECISIONS = ("fp32", "bf16", "fp16")
_RESIZES = ("crop", "stretch")
_METRIC_PARAMS: dict[str, frozenset[str]] = {
    "insertion": frozenset({"step", "substrate"}),
    "deletion": frozenset({"step", "substrate"}),
    "confidence": frozenset(),
    "pointing": frozenset(),
}


class ConfigError(ValueError):
    """A config that cannot be found, parsed or validated; the message names the field."""


# --------------------------------------------------------------------------------------------------
# Config schema
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """``name``: an :data:`iscam.models.MODEL_NAMES` entry; ``weights``: ``"default"`` (torchvision's
    ImageNet weights / the Coral file under the data root), ``None`` (random init) or a path;
    ``resize``: ``"crop"`` (Resize(224)+CenterCrop, the authors') or ``"stretch"``; ``target_layer``:
    ``None`` = the architecture's default (:data:`iscam.layers.DEFAULT_TARGET_LAYERS`)."""

    name: str
    weights: str | None = "default"
    resize: str = "crop"
    target_layer: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """``manifest``: a folder name under the data root holding ``manifest.csv`` (e.g.
    ``imagenet-val-sample``) or a path to a CSV (relative paths: the working directory, then the
    repository); ``image_dir``: where the manifest's files are (relative to the data root; ``None`` = beside
    the manifest); ``num_images``: ``None`` = all; ``seed``: ``None`` takes the first ``num_images`` in
    manifest order, an int draws them uniformly without replacement (then sorts them)."""

    manifest: str = "imagenet-val-sample"
    image_dir: str | None = None
    num_images: int | None = None
    seed: int | None = 0


@dataclass(frozen=True)
class MethodSpec:
    """One method to run: an :mod:`iscam.methods` name and its keyword parameters (N, schedule, ...)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return params_key(self.params)

    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({shown})" if shown else self.name


@dataclass(frozen=True)
class MetricsSpec:
    """Which metrics to compute and their parameters; a metric set to ``None`` is skipped (NaN columns).

    ``insertion``/``deletion``: ``step`` (pixels per frame, 224 in the paper) and ``substrate``
    (``zeros`` or ``blur``); ``confidence`` (Average Drop, Increase in Confidence, Win %) and
    ``pointing`` (energy-based pointing game) take no parameters. ``batch_size``: frames per forward pass
    (speed only)."""

    insertion: Mapping[str, Any] | None = field(default_factory=lambda: {"step": 224, "substrate": "blur"})
    deletion: Mapping[str, Any] | None = field(default_factory=lambda: {"step": 224, "substrate": "zeros"})
    confidence: Mapping[str, Any] | None = field(default_factory=dict)
    pointing: Mapping[str, Any] | None = field(default_factory=dict)
    batch_size: int = 256

    @property
    def key(self) -> str:
        """What the metric values depend on (not ``batch_size``)."""
        return params_key({name: getattr(self, name) for name in _METRIC_PARAMS})


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated run description (build it with :func:`load_config` / :func:`config_from_dict`)."""

    name: str
    model: ModelSpec
    data: DataSpec
    methods: tuple[MethodSpec, ...]
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    description: str = ""
    profile: str = ""
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    forward_batch_size: int = 128
    channels_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the YAML schema); ``config_from_dict(c.to_dict()) == c``."""
        raw = dataclasses.asdict(self)
        raw["methods"] = [{"name": m.name, "params": dict(m.params)} for m in self.methods]
        return raw

    def method_key(self, spec: MethodSpec) -> str:
        """The ``params_key`` of ``spec``'s rows: :func:`resolved_params` (the method's defaults filled
        in, so ``{}`` and ``{"N": 10}`` are the same rows) plus, for stochastic methods, the config seed."""
        return method_key(spec.name, spec.params, seed=self.seed)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some top-level fields changed and validated again (e.g. ``methods=[...]``)."""
        raw = self.to_dict()
        raw.update(changes)
        return config_from_dict(raw)


_SCHEMA: dict[str, Any] = {
    "name": str,
    "description": str,
    "profile": str,
    "model": {f.name: None for f in dataclasses.fields(ModelSpec)},
    "data": {f.name: None for f in dataclasses.fields(DataSpec)},
    "methods": list,
    "metrics": {**{name: None for name in _METRIC_PARAMS}, "batch_size": None},
    "seed": int,
    "device": str,
    "precision": str,
    "batch_size": int,
    "forward_batch_size": int,
    "channels_last": bool,
}


def config_names() -> list[str]:
    """Names of the configs shipped in ``configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name_or_path: str | os.PathLike[str]) -> Path:
    """``configs/<name>.yaml`` for a shipped name, else the path itself; clear error if neither exists."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        return path
    shipped = CONFIG_DIR / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"unknown config {text!r}: give a YAML path or one of the shipped configs: {', '.join(config_names())}"
    )


def _int(value: Any, where: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value}")
    return int(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _choice(value: Any, where: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _known_keys(section: Mapping[str, Any], allowed: Mapping[str, Any] | frozenset[str], where: str) -> None:
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"in {where}; known keys: {', '.join(sorted(allowed))}")


def _method_spec(entry: Any, index: int) -> MethodSpec:
    where = f"methods[{index}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a method name or {{name: ..., params: {{...}}}}, got {entry!r}")
    _known_keys(entry, {"name": None, "params": None}, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name must be a method name, got {name!r}")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping, got {params!r}")
    for key in params:
        if key in _RUNNER_PARAMS or key in ("model", "target_layer"):
            raise ConfigError(f"{where}.params.{key} is set by the runner (see batch_size, precision, "
                              "model.target_layer and seed at the top level of the config)")
    try:
        params_key(params)
    except Exception as error:  # noqa: BLE001 - a StoreError naming the value
        raise ConfigError(f"{where}.params: {error}") from None
    return MethodSpec(name=name, params=dict(params))


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate plain data (a parsed YAML file) into an :class:`ExperimentConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    _known_keys(raw, _SCHEMA, "the config")
    for required in ("name", "model", "methods"):
        if raw.get(required) in (None, "", []):
            raise ConfigError(f"the config needs {required!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name must be letters, digits, '-' or '_' (it names the results folder), got {name!r}")

    model_raw = raw["model"]
    if isinstance(model_raw, str):
        model_raw = {"name": model_raw}
    if not isinstance(model_raw, Mapping):
        raise ConfigError(f"model must be a mapping, got {model_raw!r}")
    _known_keys(model_raw, _SCHEMA["model"], "model")
    if not isinstance(model_raw.get("name"), str):
        raise ConfigError(f"model.name must be a model name, got {model_raw.get('name')!r}")
    weights = model_raw.get("weights", "default")
    if weights is not None and not isinstance(weights, str):
        raise ConfigError(f"model.weights must be 'default', null or a path, got {weights!r}")
    layer = model_raw.get("target_layer")
    if layer is not None and not isinstance(layer, str):
        raise ConfigError(f"model.target_layer must be a layer name or null, got {layer!r}")
    model = ModelSpec(name=model_raw["name"], weights=weights,
                      resize=_choice(model_raw.get("resize", "crop"), "model.resize", _RESIZES),
                      target_layer=layer)

    data_raw = raw.get("data") or {}
    if not isinstance(data_raw, Mapping):
        raise ConfigError(f"data must be a mapping, got {data_raw!r}")
    _known_keys(data_raw, _SCHEMA["data"], "data")
    manifest = data_raw.get("manifest", DataSpec.manifest)
    if not isinstance(manifest, str) or not manifest:
        raise ConfigError(f"data.manifest must be a folder name under the data root or a CSV path, got {manifest!r}")
    image_dir = data_raw.get("image_dir")
    if image_dir is not None and not isinstance(image_dir, str):
        raise ConfigError(f"data.image_dir must be a folder or null, got {image_dir!r}")
    data = DataSpec(manifest=manifest, image_dir=image_dir,
                    num_images=_int(data_raw.get("num_images"), "data.num_images", minimum=1, allow_none=True),
                    seed=_int(data_raw.get("seed", 0), "data.seed", minimum=0, allow_none=True))

    methods_raw = raw["methods"]
    if not isinstance(methods_raw, Sequence) or isinstance(methods_raw, str):
        raise ConfigError(f"methods must be a list of {{name, params}}, got {methods_raw!r}")
    methods = tuple(_method_spec(entry, i) for i, entry in enumerate(methods_raw))
    seen: set[tuple[str, str]] = set()
    for spec in methods:
        if (spec.name, spec.key) in seen:
            raise ConfigError(f"method {spec.label()} is listed twice")
        seen.add((spec.name, spec.key))

    metrics_raw = raw.get("metrics")
    if metrics_raw is None:
        metrics = MetricsSpec()
    else:
        if not isinstance(metrics_raw, Mapping):
            raise ConfigError(f"metrics must be a mapping, got {metrics_raw!r}")
        _known_keys(metrics_raw, _SCHEMA["metrics"], "metrics")
        defaults = MetricsSpec()
        chosen: dict[str, Any] = {}
        for metric, allowed in _METRIC_PARAMS.items():
            value = metrics_raw.get(metric, getattr(defaults, metric))
            if value is None:
                chosen[metric] = None
                continue
            if value is True or value == {}:
                value = getattr(defaults, metric) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"metrics.{metric} must be a mapping of parameters or null, got {value!r}")
            _known_keys(value, allowed, f"metrics.{metric}")
            merged = {**(getattr(defaults, metric) or {}), **value}
            if "step" in merged:
                merged["step"] = _int(merged["step"], f"metrics.{metric}.step", minimum=1)
            if "substrate" in merged:
                merged["substrate"] = _choice(merged["substrate"], f"metrics.{metric}.substrate", ("zeros", "blur"))
            chosen[metric] = merged
        metrics = MetricsSpec(**chosen, batch_size=_int(metrics_raw.get("batch_size", defaults.batch_size),
                                                        "metrics.batch_size", minimum=1))

    return ExperimentConfig(
        name=name,
        description=str(raw.get("description") or ""),
        profile=str(raw.get("profile") or ""),
        model=model,
        data=data,
        methods=methods,
        metrics=metrics,
        seed=_int(raw.get("seed", 0), "seed", minimum=0),
        device=_choice(raw.get("device", "auto"), "device", _DEVICES),
        precision=_choice(raw.get("precision", "fp32"), "precision", _PRECISIONS),
        batch_size=_int(raw.get("batch_size", 32), "batch_size", minimum=1),
        forward_batch_size=_int(raw.get("forward_batch_size", 128), "forward_batch_size", minimum=1),
        channels_last=_bool(raw.get("channels_last", False), "channels_last"),
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"methods.iscam.N=15"`` -> (``["methods", "iscam", "N"]``, ``15``); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. data.num_images=20)")
    key, value_text = text.split("=", 1)
    path = key.strip().split(".")
    if not key.strip() or any(not part for part in path):
        raise ConfigError(f"--set {text!r}: the key must be dotted names like methods.iscam.N")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return path, value


def _method_entry(methods: list[Any], selector: str, text: str) -> dict[str, Any]:
    if selector.isdigit():
        index = int(selector)
        if index >= len(methods):
            raise ConfigError(f"--set {text!r}: there are only {len(methods)} methods")
        found = [index]
    else:
        names = [(e if isinstance(e, str) else (e or {}).get("name")) for e in methods]
        found = [i for i, name in enumerate(names) if name == selector]
        if not found:
            raise ConfigError(f"--set {text!r}: no method {selector!r} in this config (it has "
                              f"{', '.join(map(str, names))}); set methods=[...] to change the list")
        if len(found) > 1:
            raise ConfigError(f"--set {text!r}: {len(found)} methods are named {selector!r}; "
                              f"select one by position, e.g. methods.{found[0]}.<param>")
    entry = methods[found[0]]
    if isinstance(entry, str):
        entry = methods[found[0]] = {"name": entry, "params": {}}
    entry.setdefault("params", {})
    if entry["params"] is None:
        entry["params"] = {}
    return entry


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to plain config data (a copy is returned).

    Keys are dotted paths: ``data.num_images=20``, ``metrics.insertion.substrate=zeros``,
    ``methods.iscam.N=15`` (a method by name, or by position ``methods.0.N``; a key other than ``name`` /
    ``params`` under a method is one of its parameters), ``methods=[gradcam, random]`` (the whole list).
    A mapping ``{"data.num_images": 20}`` is accepted too. Unknown keys raise :class:`ConfigError`.
    """
    result = copy.deepcopy(dict(raw))
    items = (list(overrides.items()) if isinstance(overrides, Mapping)
             else [parse_override(text) for text in overrides])
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else list(key)
        text = f"{'.'.join(path)}={value!r}"
        head = path[0]
        if head not in _SCHEMA:
            raise ConfigError(f"--set {text}: unknown key {head!r}; known keys: {', '.join(sorted(_SCHEMA))}")
        if head == "methods" and len(path) > 1:
            methods = result.setdefault("methods", [])
            entry = _method_entry(methods, path[1], text)
            rest = path[2:]
            if not rest:
                raise ConfigError(f"--set {text}: name a parameter, e.g. methods.{path[1]}.N=15")
            if rest[0] == "name" and len(rest) == 1:
                entry["name"] = value
                continue
            target = entry["params"] if rest[0] != "params" else entry.setdefault("params", {})
            rest = rest if rest[0] != "params" else rest[1:]
            if not rest:
                entry["params"] = value
                continue
            for part in rest[:-1]:
                target = target.setdefault(part, {})
            target[rest[-1]] = value
            continue
        node: Any = result
        schema: Any = _SCHEMA
        for depth, part in enumerate(path[:-1]):
            if isinstance(schema, Mapping):
                if part not in schema:
                    raise ConfigError(f"--set {text}: unknown key {'.'.join(path[:depth + 1])!r}; known keys "
                                      f"under {'.'.join(path[:depth]) or 'the config'}: {', '.join(sorted(schema))}")
                schema = schema[part]
            elif depth >= 2 or path[0] != "metrics":
                raise ConfigError(f"--set {text}: {'.'.join(path[:depth + 1])!r} is not a section")
            else:
                schema = None
            child = node.get(part) if isinstance(node, Mapping) else None
            if not isinstance(child, dict):
                child = node[part] = {} if child is None or isinstance(child, Mapping) else child
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {text}: {'.'.join(path[:depth + 1])!r} is not a section")
            node = child
        leaf = path[-1]
        if isinstance(schema, Mapping) and leaf not in schema:
            where = ".".join(path[:-1]) or "the config"
            raise ConfigError(f"--set {text}: unknown key {'.'.join(path)!r}; known keys under {where}: "
                              f"{', '.join(sorted(schema))}")
        node[leaf] = value
    return result


def load_config(name_or_path: str | os.PathLike[str],
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> ExperimentConfig:
    """Read a config (shipped name or YAML path), apply ``overrides`` and validate it."""
    path = find_config(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {str(path)!r} must be a YAML mapping")
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"{path.name}: {error}") from None


def image_seed(seed: int, method: str, file: str) -> int:
    """The seed of one stochastic map: a hash of (config seed, method, image file), in [0, 2**63)."""
    digest = hashlib.sha256(f"{seed}\x00{method}\x00{file}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def default_output(config: ExperimentConfig) -> Path:
    """``results/<config name>`` (relative to the working directory)."""
    return Path("results") / config.name


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------

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


def _resolve_device(requested: str, local_rank: int) -> torch.device:
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


def _resolve_manifest(spec: DataSpec, root: Path | None) -> tuple[Path, Path | None]:
    """The manifest CSV and the image folder (None = beside the manifest)."""
    from . import data as iscam_data

    text = spec.manifest
    if text.endswith(".csv") or os.sep in text:
        candidates = [Path(text).expanduser()]
        if not candidates[0].is_absolute():
            candidates.append(CONFIG_DIR.parent / text)
            if root is not None:
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


def select_indices(total: int, spec: DataSpec) -> list[int]:
    """The manifest rows a run uses (see :class:`DataSpec`)."""
    count = total if spec.num_images is None else min(spec.num_images, total)
    if spec.num_images is not None and spec.num_images > total:
        log.warning("data.num_images=%d but the manifest has %d images: using all", spec.num_images, total)
    if spec.seed is None or count == total:
        return list(range(count))
    chosen = np.random.default_rng(spec.seed).choice(total, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def _method_class(name: str) -> Any:
    from . import methods as iscam_methods

    registry = getattr(iscam_methods, "METHODS", {})
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(registry))}")
    return registry[name]


def _signature_params(cls: Any) -> dict[str, inspect.Parameter]:
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - classes always have a signature
        return {}
    return {name: p for name, p in parameters.items() if name not in ("self", "model", "target_layer")}


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the method's defaults for every result-affecting parameter it does not set.

    Execution settings (``batch_size``, ``amp``, ``channels_last``, ``dedup``, ``seed``) are left out: they
    change speed, or are set per image by the runner. Unknown parameter names raise :class:`ConfigError`.
    """
    accepted = _signature_params(_method_class(name))
    unknown = [k for k in params if k not in accepted]
    if unknown:
        known = [k for k in accepted if k not in _EXECUTION_PARAMS]
        raise ConfigError(f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                          f"its parameters: {', '.join(known) or 'none'}")
    resolved = {k: p.default for k, p in accepted.items()
                if k not in _EXECUTION_PARAMS and p.default is not inspect.Parameter.empty}
    resolved.update((k, v) for k, v in params.items() if k not in _EXECUTION_PARAMS)
    return resolved


def method_key(name: str, params: Mapping[str, Any], *, seed: int = 0) -> str:
    """The ``params_key`` column of the rows of method ``name`` run with ``params`` (and, for the stochastic
    methods, the config ``seed``): :func:`resolved_params` as canonical JSON."""
    resolved = resolved_params(name, params)
    if name in STOCHASTIC_METHODS:
        resolved["seed"] = seed
    return params_key(resolved)


def method_kwargs(config: ExperimentConfig, name: str, params: Mapping[str, Any], *,
                  forward_batch: int | None = None) -> dict[str, Any]:
    """Constructor keywords of method ``name``: its ``params`` plus the config's execution settings
    (forward batch size, channels-last layout, ``amp`` from the precision) where the method accepts them."""
    accepted = _signature_params(_method_class(name))
    kwargs: dict[str, Any] = dict(params)
    if "batch_size" in accepted:
        kwargs["batch_size"] = config.forward_batch_size if forward_batch is None else forward_batch
    if config.channels_last and "channels_last" in accepted:
        kwargs["channels_last"] = True
    if config.precision != "fp32":
        if "amp" not in accepted:
            raise ConfigError(f"method {name!r} has no {config.precision} support (no 'amp' parameter)")
        kwargs["amp"] = config.precision
    return kwargs


class _Method:
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
        self.stochastic = spec.name in STOCHASTIC_METHODS
        self.kwargs = method_kwargs(config, spec.name, spec.params, forward_batch=forward_batch)
        self.seed_param = "seed" in _signature_params(_method_class(spec.name))
        self.cam: Any = None

    def _make(self, **extra: Any) -> Any:
        from . import methods as iscam_methods

        return iscam_methods.get(self.spec.name, self.model, target_layer=self.layer, **self.kwargs, **extra)

    def __enter__(self) -> _Method:
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


def _git_commit(repo: Path) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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

    started = _now()
    requested = device or config.device
    if requested not in _DEVICES:
        raise ConfigError(f"device must be one of {', '.join(_DEVICES)}; got {requested!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _resolve_device(requested, local_rank)
    dist = _init_distributed(torch_device)
    try:
        root = resolve_root(data_root)
        loaded = iscam_models.load(config.model.name, config.model.weights, data_root=root,
                                   device=str(torch_device), resize=config.model.resize)
        model = loaded.model.eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        layer = config.model.target_layer or loaded.target_layer
        manifest, image_dir = _resolve_manifest(config.data, root)
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
                with _Method(spec, model, layer, config, config.forward_batch_size) as method:
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
        finished = _now()

        gathered = _gather(dist, {"seconds": seconds, "images": images_done, "written": written})
        provenance = None
        _barrier(dist)
        if dist.rank == 0:
            total_seconds: dict[str, float] = {}
            total_images: dict[str, int] = {}
            for part in gathered:
                for label, value in part["seconds"].items():
                    total_seconds[label] = total_seconds.get(label, 0.0) + value
                    total_images[label] = total_images.get(label, 0) + part["images"][label]
            per_image = {label: total_seconds[label] / max(1, total_images[label]) for label in total_seconds}
            provenance = _provenance(config, started, finished, torch_device, dist, root, manifest,
                                     len(indices), per_image, total_images,
                                     sum(p["written"] for p in gathered))
            store.write_provenance(provenance)
        _barrier(dist)
        per_image_mine = {label: seconds[label] / max(1, images_done[label]) for label in seconds}
        return RunSummary(out=store.folder, rows_written=written, rows_skipped=skipped,
                          images_skipped=sorted(bad_files), seconds_per_image=per_image_mine,
                          provenance=provenance)
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


def _process_batch(runner: _BatchRunner, method: _Method, batch: Any, key_tail: tuple[Any, ...],
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


def _process_batch_once(runner: _BatchRunner, method: _Method, batch: Any, key_tail: tuple[Any, ...],
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


def _provenance(config: ExperimentConfig, started: str, finished: str, device: torch.device, dist: _Dist,
                root: Path, manifest: Path, num_images: int, per_image: Mapping[str, float],
                images: Mapping[str, int], written: int) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "metrics_key": config.metrics.key,
        "versions": {
            "iscam": _version("iscam"),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "git_commit": _git_commit(CONFIG_DIR.parent),
        "device": _device_name(device),
        "device_type": device.type,
        "world_size": dist.world,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "data_root": str(root),
        "manifest": str(manifest),
        "num_images": num_images,
        "started": started,
        "finished": finished,
        "rows_written": written,
        "images_computed": dict(images),
        "seconds_per_image": dict(per_image),
    }
