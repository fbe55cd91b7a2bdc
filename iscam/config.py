"""The run schema: experiment configs, their validation, ``--set`` overrides and the keys of stored rows.

A run is described by a small YAML config (shipped in ``iscam/configs/<name>.yaml``, read with
:mod:`importlib.resources`; ``paper-vgg16.yaml`` comments every field) or any YAML path.
:func:`load_config` reads one by name or path and applies ``--set``-style overrides::

    config = load_config("smoke", ["data.num_images=2", "methods.iscam.N=3"])

Which method parameters change results (and so belong to a row's key) is read from the method classes
(:attr:`iscam.methods.CAM.execution_params`, :attr:`~iscam.methods.CAM.stochastic`), never listed here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .store import params_key

__all__ = [
    "DEVICES",
    "ConfigError",
    "ModelSpec",
    "DataSpec",
    "MethodSpec",
    "MetricsSpec",
    "ExperimentConfig",
    "FiguresSpec",
    "RoadSpec",
    "SanitySpec",
    "Study",
    "VariantSpec",
    "check_methods",
    "expand",
    "CONFIG_DIR",
    "config_names",
    "find_config",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "image_seed",
    "road_seed",
    "method_class",
    "method_key",
    "method_kwargs",
    "resolved_params",
    "select_indices",
    "default_output",
]

log = logging.getLogger("iscam.config")

#: the configs shipped inside the package; a config may also be any YAML path.
CONFIG_DIR: Traversable = resources.files("iscam") / "configs"
#: constructor parameters the runner sets itself (from batch_size, precision and seed in the config).
_RUNNER_PARAMS = frozenset({"batch_size", "amp", "device", "seed", "generator"})
DEVICES = ("auto", "cpu", "cuda")
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
    ``None`` = the architecture's default (:data:`iscam.layers.DEFAULT_TARGET_LAYERS`); ``input_size``:
    ``None`` = the model's (224; 128 for the tiny Coral model), or a square side in pixels (e.g. 227, the
    Deep Compression SqueezeNet's training size, or a small size for quick checks)."""

    name: str
    weights: str | None = "default"
    resize: str = "crop"
    target_layer: str | None = None
    input_size: int | None = None

    @property
    def preprocessing(self) -> str:
        """The ``resize`` key column of the rows: ``crop`` / ``stretch``, with ``@<size>`` when the input size
        is not the model's own (``crop@227``), since the input size changes every number."""
        return self.resize if self.input_size is None else f"{self.resize}@{self.input_size}"


@dataclass(frozen=True)
class DataSpec:
    """``manifest``: a manifest CSV, a folder holding ``manifest.csv``, a name under the data root (e.g.
    ``imagenet-val-sample``) or a folder of images without a manifest (labels unknown: the explained class
    is the prediction; boxes unknown: the pointing game is skipped), see :func:`iscam.data.find_data`;
    relative paths are looked up in the working directory, then under the data root. ``image_dir``: where
    the manifest's files are (``None`` = beside the manifest); ``num_images``: ``None`` = all; ``seed``:
    ``None`` takes the first ``num_images`` in manifest order, an int draws them uniformly without
    replacement (then sorts them); ``on_bad_rows``: ``error`` (default: a bad manifest row stops the run
    before any work, naming file and line) or ``skip`` (bad rows are left out and counted)."""

    manifest: str = "imagenet-val-sample"
    image_dir: str | None = None
    num_images: int | None = None
    seed: int | None = 0
    on_bad_rows: str = "error"


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
class VariantSpec:
    """Extra rows a chapter reads: the base config re-run under named override sets, in the same store.

    ``images``: the first ``images`` of the base selection (``None`` = all of it), so a variant's images are
    a subset of the base's; ``methods``: the base methods it re-runs (empty = all); ``sets``: label ->
    ``--set`` overrides (``{"methods.iscam.schedule": "paper"}``), beside a ``baseline`` set without
    overrides (its label; ``""`` = none); ``grid``: one key and its values (``{"methods.iscam.N": [1, 5]}``),
    one set per value, labelled ``N=1``, ..., the base config's own value always among them.
    """

    name: str
    images: int | None = None
    methods: tuple[str, ...] = ()
    sets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    baseline: str = "default"


@dataclass(frozen=True)
class FiguresSpec:
    """The images the book's figures show, whose rows (maps included) the runner adds to the store.

    Fig. 2 shows the first manifest image of each of ``classes`` (class names as in the ImageNet categories;
    the paper's Basenji, Capuchin and Whippet), then the first selected images, ``images`` in all; Fig. 1
    traces IS-CAM on the first of them, showing its ``pipeline_channels`` highest-weighted channels.
    """

    classes: tuple[str, ...] = ("basenji", "capuchin", "whippet")
    images: int = 3
    pipeline_channels: int = 4


def _road_fractions() -> tuple[float, ...]:
    from .road import ROAD_FRACTIONS  # scipy: imported only when a config asks for ROAD

    return ROAD_FRACTIONS


def _sanity_modes() -> tuple[str, ...]:
    from .sanity import MODES  # scikit-image: imported only when a config asks for sanity checks

    return MODES


@dataclass(frozen=True)
class RoadSpec:
    """ROAD (Rong et al., ICML 2022; :func:`iscam.road.road_curve`) beside insertion/deletion: the MoRF and
    LeRF curves of every base method's *stored* map (rebuilt with :func:`iscam.methods.reconstruct`) on the
    first ``images`` base images (``None`` = all of them), at the removal ``fractions`` (default
    :data:`iscam.road.ROAD_FRACTIONS`: 10 %, ..., 90 %, strictly increasing in [0, 1)). ROAD's imputation
    noise (0.01 of the pixel range) is seeded per image with :func:`road_seed`, the same seed for every method
    of an image, so the methods' ROAD scores are paired."""

    images: int | None = None
    fractions: tuple[float, ...] = field(default_factory=_road_fractions)

    def key(self, seed: int) -> str:
        """The ``road_key`` of the rows (what a ROAD value depends on beside the map): fractions and seed."""
        return params_key({"fractions": list(self.fractions), "seed": seed})


@dataclass(frozen=True)
class SanitySpec:
    """One named subset of the saliency sanity checks (Adebayo et al., NeurIPS 2018;
    :func:`iscam.sanity.sanity_rows`): model randomisation in each of ``modes`` (``cascading``: from the
    logits down, one more layer per stage; ``independent``: one layer at a time), over the layers of
    ``granularity`` (``block``, ``module`` or a list of module names, see
    :func:`iscam.sanity.parameterised_layers`), for the config's ``methods`` of these names (empty = all of
    them) on the first ``images`` base images (``None`` = all). ``stages``: ``None`` = every stage of a mode,
    else that many spread evenly from the logits layer to the first layer, both included
    (:func:`iscam.sanity.spread_stages`; 1 = the fully randomised model alone). The layers are re-initialised
    with the config ``seed``; stochastic methods get their per-image seed (:func:`image_seed`), as in the base
    rows. Several subsets let cheap methods run on more images than the costly ones (Smooth Grad-CAM++'s noisy
    passes, the Score-CAM family's forward per channel, at every stage); a subset set to ``null`` is left
    out."""

    name: str
    images: int | None = None
    methods: tuple[str, ...] = ()
    modes: tuple[str, ...] = field(default_factory=_sanity_modes)
    granularity: str | tuple[str, ...] = "block"
    stages: int | None = None

    def randomisation(self, mode: str, seed: int) -> str:
        """The ``randomisation`` key column of the rows of ``mode``: canonical JSON of mode, granularity and
        seed (what the randomised weights depend on; ``stages`` and ``images`` only choose rows)."""
        granularity = self.granularity if isinstance(self.granularity, str) else list(self.granularity)
        return params_key({"granularity": granularity, "mode": mode, "seed": seed})


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
    variants: tuple[VariantSpec, ...] = ()
    figures: FiguresSpec | None = None
    road: RoadSpec | None = None
    sanity: tuple[SanitySpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the YAML schema); ``config_from_dict(c.to_dict()) == c``."""
        raw = dataclasses.asdict(self)
        raw["methods"] = [{"name": m.name, "params": dict(m.params)} for m in self.methods]
        raw["variants"] = {v.name: _variant_dict(v) for v in self.variants}
        raw["figures"] = None if self.figures is None else {**dataclasses.asdict(self.figures),
                                                            "classes": list(self.figures.classes)}
        raw["road"] = None if self.road is None else {"images": self.road.images,
                                                      "fractions": list(self.road.fractions)}
        raw["sanity"] = {s.name: _sanity_dict(s) for s in self.sanity}
        return raw

    def base(self) -> ExperimentConfig:
        """This config without its variants, figures, ROAD and sanity checks: the rows the paper's tables are
        made of."""
        return dataclasses.replace(self, variants=(), figures=None, road=None, sanity=())

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
    "variants": dict,
    "figures": {f.name: None for f in dataclasses.fields(FiguresSpec)},
    "road": {f.name: None for f in dataclasses.fields(RoadSpec)},
    "sanity": dict,
}
#: The sections that add rows beside the base rows (the base study's config has none of them).
_EXTRA_SECTIONS = ("variants", "figures", "road", "sanity")


def config_names() -> list[str]:
    """Names of the configs shipped in ``iscam/configs/``."""
    return sorted(p.name[: -len(".yaml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def find_config(name_or_path: str | os.PathLike[str]) -> Path | Traversable:
    """The shipped ``<name>.yaml`` for a shipped name, else the path itself; clear error if neither exists."""
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
                      target_layer=layer,
                      input_size=_int(model_raw.get("input_size"), "model.input_size", minimum=8, allow_none=True))

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
                    seed=_int(data_raw.get("seed", 0), "data.seed", minimum=0, allow_none=True),
                    on_bad_rows=_choice(data_raw.get("on_bad_rows", "error"), "data.on_bad_rows",
                                        ("error", "skip")))

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
        device=_choice(raw.get("device", "auto"), "device", DEVICES),
        precision=_choice(raw.get("precision", "fp32"), "precision", _PRECISIONS),
        batch_size=_int(raw.get("batch_size", 32), "batch_size", minimum=1),
        forward_batch_size=_int(raw.get("forward_batch_size", 128), "forward_batch_size", minimum=1),
        channels_last=_bool(raw.get("channels_last", False), "channels_last"),
        variants=_variants(raw.get("variants"), raw, methods),
        figures=_figures(raw.get("figures")),
        road=_road(raw.get("road")),
        sanity=_sanity(raw.get("sanity")),
    )


def _variant_dict(variant: VariantSpec) -> dict[str, Any]:
    raw: dict[str, Any] = {"images": variant.images, "methods": list(variant.methods),
                           "baseline": variant.baseline}
    if variant.sets:
        raw["sets"] = {label: dict(changes) for label, changes in variant.sets.items()}
    if variant.grid:
        raw["grid"] = {key: list(values) for key, values in variant.grid.items()}
    return raw


def _check_section_name(section: str, kind: str, name: Any) -> None:
    """Names of variants and sanity subsets key stored rows and ``--set`` paths: letters, digits, - and _."""
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{section}: a {kind} name must be letters, digits, '-' or '_', got {name!r}")


_VARIANT_KEYS = {"images": None, "methods": None, "sets": None, "grid": None, "baseline": None,
                 "description": None}


def _variants(section: Any, raw: Mapping[str, Any], methods: Sequence[MethodSpec]) -> tuple[VariantSpec, ...]:
    if section in (None, {}):
        return ()
    if not isinstance(section, Mapping):
        raise ConfigError(f"variants must be a mapping of variant name -> {{images, methods, sets | grid}}, "
                          f"got {section!r}")
    variants = []
    for name, entry in section.items():
        where = f"variants.{name}"
        _check_section_name("variants", "variant", name)
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping {{images, methods, sets | grid}}, got {entry!r}")
        _known_keys(entry, _VARIANT_KEYS, where)
        chosen = entry.get("methods") or []
        if isinstance(chosen, str) or not isinstance(chosen, Sequence):
            raise ConfigError(f"{where}.methods must be a list of the config's method names, got {chosen!r}")
        for method in chosen:  # a known method the config does not run is left out (e.g. --set methods=[...])
            method_class(method)
        sets, grid = entry.get("sets") or {}, entry.get("grid") or {}
        if not isinstance(sets, Mapping) or not all(isinstance(v, Mapping) for v in sets.values()):
            raise ConfigError(f"{where}.sets must map a label to overrides {{key: value}}, got {sets!r}")
        if not isinstance(grid, Mapping) or len(grid) > 1:
            raise ConfigError(f"{where}.grid must be one key and its list of values, got {grid!r}")
        if bool(sets) == bool(grid):
            raise ConfigError(f"{where} needs either sets or grid (not both)")
        for key, values in grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"{where}.grid.{key} must be a non-empty list of values, got {values!r}")
        baseline = entry.get("baseline", "default")
        if not isinstance(baseline, str):
            raise ConfigError(f"{where}.baseline must be a label (or '' for none), got {baseline!r}")
        variant = VariantSpec(
            name=name, images=_int(entry.get("images"), f"{where}.images", minimum=1, allow_none=True),
            methods=tuple(chosen), sets={str(k): dict(v) for k, v in sets.items()},
            grid={str(k): tuple(v) for k, v in grid.items()}, baseline=baseline)
        for label, changes in _variant_sets(variant, _base_raw(raw)):  # every set must make a valid config
            try:
                config_from_dict(changes)
            except ConfigError as error:
                raise ConfigError(f"{where} ({label}): {error}") from None
        variants.append(variant)
    return tuple(variants)


def _figures(section: Any) -> FiguresSpec | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"figures must be a mapping {{classes, images, pipeline_channels}} or null, "
                          f"got {section!r}")
    _known_keys(section, _SCHEMA["figures"], "figures")
    classes = section.get("classes", FiguresSpec.classes)
    if isinstance(classes, str) or not isinstance(classes, Sequence) \
            or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"figures.classes must be a list of class names, got {classes!r}")
    return FiguresSpec(classes=tuple(classes),
                       images=_int(section.get("images", FiguresSpec.images), "figures.images", minimum=1),
                       pipeline_channels=_int(section.get("pipeline_channels", FiguresSpec.pipeline_channels),
                                              "figures.pipeline_channels", minimum=1))


def _road(section: Any) -> RoadSpec | None:
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(f"road must be a mapping {{images, fractions}} or null (no ROAD), got {section!r}")
    _known_keys(section, _SCHEMA["road"], "road")
    images = _int(section.get("images"), "road.images", minimum=1, allow_none=True)
    fractions = section.get("fractions")
    if fractions is None:
        return RoadSpec(images=images)
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
        raise ConfigError(f"road.fractions must be a non-empty list of removal fractions, got {fractions!r}")
    for value in fractions:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"road.fractions must be numbers in [0, 1) (the share of pixels removed), "
                              f"got {value!r}")
    if any(b <= a for a, b in itertools.pairwise(fractions)):
        raise ConfigError(f"road.fractions must be strictly increasing, got {list(fractions)}")
    return RoadSpec(images=images, fractions=tuple(float(v) for v in fractions))


_SANITY_KEYS = {f.name: None for f in dataclasses.fields(SanitySpec) if f.name != "name"}


def _sanity_dict(spec: SanitySpec) -> dict[str, Any]:
    granularity = spec.granularity if isinstance(spec.granularity, str) else list(spec.granularity)
    return {"images": spec.images, "methods": list(spec.methods), "modes": list(spec.modes),
            "granularity": granularity, "stages": spec.stages}


def _sanity(section: Any) -> tuple[SanitySpec, ...]:
    if section in (None, {}):
        return ()
    if not isinstance(section, Mapping):
        raise ConfigError(f"sanity must be a mapping of subset name -> {{images, methods, modes, "
                          f"granularity, stages}}, or null (no sanity checks), got {section!r}")
    from .sanity import GRANULARITIES, MODES

    subsets = []
    for name, entry in section.items():
        where = f"sanity.{name}"
        _check_section_name("sanity", "subset", name)
        if entry is None:  # --set sanity.<name>=null turns one subset off
            continue
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping {{images, methods, modes, granularity, stages}}, "
                              f"got {entry!r}")
        _known_keys(entry, _SANITY_KEYS, where)
        chosen = entry.get("methods") or []
        if isinstance(chosen, str) or not isinstance(chosen, Sequence):
            raise ConfigError(f"{where}.methods must be a list of the config's method names, got {chosen!r}")
        for method in chosen:  # a known method the config does not run is left out, as in the variants
            method_class(method)
        modes = entry.get("modes", MODES)
        if isinstance(modes, str) or not isinstance(modes, Sequence) or not modes:
            raise ConfigError(f"{where}.modes must be a non-empty list of {', '.join(MODES)}, got {modes!r}")
        for mode in modes:
            _choice(mode, f"{where}.modes", MODES)
        if len(set(modes)) != len(modes):
            raise ConfigError(f"{where}.modes lists a mode twice: {list(modes)}")
        granularity = entry.get("granularity", "block")
        if isinstance(granularity, str):
            _choice(granularity, f"{where}.granularity", GRANULARITIES)
        elif (not isinstance(granularity, Sequence) or not granularity
              or not all(isinstance(layer, str) and layer for layer in granularity)):
            raise ConfigError(f"{where}.granularity must be one of {', '.join(GRANULARITIES)} or a list of "
                              f"module names, got {granularity!r}")
        subsets.append(SanitySpec(
            name=name, images=_int(entry.get("images"), f"{where}.images", minimum=1, allow_none=True),
            methods=tuple(chosen), modes=tuple(modes),
            granularity=granularity if isinstance(granularity, str) else tuple(granularity),
            stages=_int(entry.get("stages"), f"{where}.stages", minimum=1, allow_none=True)))
    return tuple(subsets)


def _base_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
    base = {k: copy.deepcopy(v) for k, v in raw.items() if k not in _EXTRA_SECTIONS}
    return base


def _variant_sets(variant: VariantSpec, base: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, plain config) of each set of ``variant`` applied to the plain ``base`` config."""
    restricted = copy.deepcopy(dict(base))
    if variant.methods:
        entries = [e if isinstance(e, Mapping) else {"name": e} for e in restricted["methods"]]
        restricted["methods"] = [e for e in entries if e.get("name") in variant.methods]
    if not restricted["methods"]:
        return []  # the config runs none of the variant's methods
    present = {e if isinstance(e, str) else e.get("name") for e in restricted["methods"]}
    sets: list[tuple[str, dict[str, Any]]] = []
    if variant.grid:
        ((key, values),) = variant.grid.items()
        path = key.split(".")
        if path[0] == "methods" and len(path) > 2 and path[1] not in present:
            return []
        current = _lookup(restricted, path)
        shown = list(dict.fromkeys([*values, *([] if current is None else [current])]))
        try:
            shown.sort()
        except TypeError:
            pass
        for value in shown:
            sets.append((f"{path[-1]}={value}", apply_overrides(restricted, {key: value})))
    else:
        if variant.baseline:
            sets.append((variant.baseline, restricted))
        for label, changes in variant.sets.items():
            kept = {k: v for k, v in changes.items()
                    if not (k.startswith("methods.") and len(k.split(".")) > 2 and k.split(".")[1] not in present)}
            if kept or not changes:
                sets.append((label, apply_overrides(restricted, kept)))
    return sets


def _lookup(raw: Mapping[str, Any], path: Sequence[str]) -> Any:
    """The value at a dotted override path (``methods.iscam.N``: the method's parameter), or None."""
    if path[0] == "methods" and len(path) >= 3:
        for entry in raw.get("methods", []):
            if isinstance(entry, Mapping) and entry.get("name") == path[1]:
                params = entry.get("params") or {}
                if path[2] in params:
                    return params[path[2]]
                defaults = resolved_params(path[1], params)
                return defaults.get(path[2])
        return None
    node: Any = raw
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Study:
    """One set of rows a config asks for: the base rows, one set of a variant, or the figures' images.

    ``config`` is complete (methods restricted, overrides applied, no variants); ``images`` is how many of the
    base selection it covers (a prefix; ``None`` = all); ``figures`` marks the rows of the figures' images.
    """

    variant: str  # "" for the base rows, else the variant's name (or "figures")
    label: str
    config: ExperimentConfig
    images: int | None = None
    figures: bool = False

    @property
    def title(self) -> str:
        return "base" if not self.variant else f"{self.variant}: {self.label}"


def expand(config: ExperimentConfig) -> list[Study]:
    """Every :class:`Study` of ``config``: the base rows first, then each variant's sets, then the figures."""
    base = config.base()
    studies = [Study("", "", base)]
    raw = base.to_dict()
    for variant in config.variants:
        for label, plain in _variant_sets(variant, raw):
            studies.append(Study(variant.name, label, config_from_dict(plain), images=variant.images))
    if config.figures is not None:
        studies.append(Study("figures", "Fig. 1 and Fig. 2", base, images=config.figures.images, figures=True))
    return studies


def check_methods(config: ExperimentConfig) -> None:
    """Construct every method of ``config`` (and of its variants) on a one-layer probe model, so a bad
    parameter (``N=abc``, ``N=2.0``, ``N=0``, a misspelled name) is a :class:`ConfigError` naming the method
    before any model is loaded or image read. (Target layers are checked once the model is loaded.)"""
    import torch

    probe = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1))
    for study in expand(config):
        for spec in study.config.methods:
            cls = method_class(spec.name)
            resolved_params(spec.name, spec.params)
            try:
                cls(probe, "0" if cls.uses_layer else None, **method_kwargs(study.config, spec.name, spec.params))
            except (TypeError, ValueError) as error:
                where = "" if not study.variant else f" (variant {study.title})"
                raise ConfigError(f"method {spec.label()}{where}: {error}") from None
    if config.sanity:  # SSIM and HOG need maps of a minimum size: say so now, not after the base rows
        from . import sanity
        from .models import MODELS

        size = config.model.input_size or MODELS[config.model.name].input_size
        try:
            sanity.check_map_size(size, size)
        except ValueError as error:
            raise ConfigError(f"sanity: {error}; turn the checks off with --set sanity=null") from None


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
        if head in ("variants", "sanity") and len(path) > 1:  # sections of named entries
            if result.get(head) is None:
                result[head] = {}
            node = result[head]
            for part in path[1:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {text}: {part!r} is not a section")
            node[path[-1]] = value
            continue
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


def road_seed(seed: int, file: str) -> int:
    """The seed of one image's ROAD noise (:func:`image_seed` of the config seed, ``"road"`` and the file):
    the same for every method of the image, so its methods are compared on the same noise."""
    return image_seed(seed, "road", file)


def default_output(config: ExperimentConfig) -> Path:
    """``<results folder>/<config name>`` (:func:`iscam.paths.results_dir`: ``$ISCAM_RESULTS`` or ``./results``)."""
    from .paths import results_dir

    return results_dir() / config.name


def select_indices(total: int, spec: DataSpec) -> list[int]:
    """The manifest rows a run uses (see :class:`DataSpec`)."""
    count = total if spec.num_images is None else min(spec.num_images, total)
    if spec.num_images is not None and spec.num_images > total:
        log.warning("data.num_images=%d but the manifest has %d images: using all", spec.num_images, total)
    if spec.seed is None or count == total:
        return list(range(count))
    chosen = np.random.default_rng(spec.seed).choice(total, size=count, replace=False)
    return sorted(int(i) for i in chosen)


def method_class(name: str) -> Any:
    """The :mod:`iscam.methods` class registered as ``name`` (a :class:`ConfigError` naming the known ones)."""
    from .methods import METHODS

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _signature_params(cls: Any) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(cls).parameters
    return {name: p for name, p in parameters.items() if name not in ("self", "model", "target_layer")}


def _result_params(cls: Any) -> dict[str, inspect.Parameter]:
    """The constructor parameters of ``cls`` that change its maps (not speed settings, not the seed)."""
    skipped = cls.execution_params | _RUNNER_PARAMS
    return {k: p for k, p in _signature_params(cls).items() if k not in skipped}


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the method's defaults for every result-affecting parameter it does not set.

    Execution settings (the class's ``execution_params``: batch size, precision, memory layout, dedup, ...)
    and the seed are left out: they change speed, or are set per image by the runner. Unknown parameter
    names raise :class:`ConfigError`.
    """
    cls = method_class(name)
    accepted = _signature_params(cls)
    unknown = [k for k in params if k not in accepted]
    if unknown:
        known = list(_result_params(cls))
        raise ConfigError(f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                          f"its parameters: {', '.join(known) or 'none'}")
    result = _result_params(cls)
    resolved = {k: p.default for k, p in result.items() if p.default is not inspect.Parameter.empty}
    resolved.update((k, v) for k, v in params.items() if k in result)
    return resolved


def method_key(name: str, params: Mapping[str, Any], *, seed: int = 0) -> str:
    """The ``params_key`` column of the rows of method ``name`` run with ``params`` (and, for the stochastic
    methods, the config ``seed``): :func:`resolved_params` as canonical JSON."""
    resolved = resolved_params(name, params)
    if method_class(name).stochastic:
        resolved["seed"] = seed
    return params_key(resolved)


def method_kwargs(config: ExperimentConfig, name: str, params: Mapping[str, Any], *,
                  forward_batch: int | None = None) -> dict[str, Any]:
    """Constructor keywords of method ``name``: its ``params`` plus the config's execution settings
    (forward batch size, channels-last layout, ``amp`` from the precision) where the method accepts them."""
    accepted = _signature_params(method_class(name))
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

