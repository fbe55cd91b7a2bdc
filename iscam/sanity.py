"""Saliency sanity checks (Adebayo et al., NeurIPS 2018, https://arxiv.org/abs/1810.03292): how much of a
method's map survives when the model's weights are re-initialised.

```python
from iscam import sanity
rows = sanity.sanity_rows(model, x, {"gradcam": {}, "iscam": {"N": 10}, "random": {}})
table = sanity.summarise(rows)                 # mean and 95 % bootstrap interval per stage and metric
flags = sanity.insensitive_methods(rows)       # maps that barely change under full randomisation
```

**Stages.** :func:`parameterised_layers` lists the model's layers that own parameters in the order a real
forward pass executes them (forward pre-hooks, not the definition order). *Cascading* stage ``k``
re-initialises the top ``k`` of them, from the logits down to the first layer; *independent* stage ``k``
re-initialises only the ``k``-th from the top (:func:`randomisation_stages`). Every stage works on a deep
copy: the caller's model is never touched.

**Re-initialisation.** Each module that owns parameters gets its own ``reset_parameters()`` on a CPU copy,
with torch's CPU generator seeded by :func:`layer_seed` of (seed, the module's dotted name), and the result
is copied back: the random weights of a layer are the same in every stage, in both modes, on every device,
and the caller's global RNG state is left alone. What ``reset_parameters`` does is torch's default
initialisation: Kaiming-uniform weights and uniform biases for ``Conv2d``/``Linear``; for BatchNorm it sets
``weight = 1``, ``bias = 0`` *and* resets the running statistics (mean 0, variance 1), so a re-initialised
BatchNorm in eval mode is the identity up to ``1/sqrt(1 + eps)`` -- not random. (Adebayo et al.'s
TensorFlow code re-ran the initialisers of the trainable variables only, so their moving statistics stayed
trained.) A module that owns parameters but has no ``reset_parameters`` is an error; modules without
parameters (ReLU, pooling, an affine-free BatchNorm, whose running statistics stay trained) are never touched.

**Maps.** For every stage, each method (``iscam.methods.get(name, model, layer, **params)``) explains the
trained model's class (the argmax of the trained logits unless ``target`` is given) on the randomised copy,
with the same parameters -- seeds included, so SS-CAM's and Smooth Grad-CAM++'s noise is the same and only
the weights differ. The random baseline does not read the model, so re-using its seed would give similarity
1 for free: its stage map is an independent draw with :func:`stage_seed`, and its rows are the similarity
of two independent random maps (the chance level every curve is read against).

**Similarity** (:func:`similarity`), per image, of the randomised model's map to the trained model's map, at
input resolution, following Adebayo et al.:

- ``spearman``: Spearman rank correlation of the maps; ``spearman_abs``: the same on ``|map|``. The paper
  reports both because gradients are signed. Every map here is ``>= 0`` (ReLU, then min-max), so
  ``|map| = map`` and the two columns are identical; both are kept so the rows line up with the paper's
  panels and a signed method would be compared both ways.
- ``ssim``: structural similarity (Wang et al., IEEE TIP 2004) of the min-max normalised maps (Adebayo et al.
  normalise to [0, 1] before SSIM and HOG), with ``data_range = 1`` (the maps' range), a Gaussian window of
  ``sigma = 1.5`` (11 x 11), ``K1 = 0.01``, ``K2 = 0.03`` and population covariances -- Wang et al.'s
  settings. Adebayo et al.'s evaluation also used scikit-image's Gaussian window but gave no ``data_range``,
  which old scikit-image versions took from the float dtype's nominal range [-1, 1], i.e. 2: their SSIM
  constants were 4x ours, which raises SSIM where the maps are flat.
- ``hog``: Pearson correlation, as the paper says, of the two maps' histogram-of-oriented-gradients
  descriptors (Dalal & Triggs 2005; scikit-image ``feature.hog``) with ``16 x 16``-pixel cells (the
  ``pixels_per_cell`` of the authors' evaluation code), 9 orientations and ``3 x 3``-cell blocks with L2-Hys
  normalisation (scikit-image's defaults).

A correlation is undefined (NaN) when a map (or its HOG descriptor) is constant, e.g. when the randomised
model's map is all zero; :func:`summarise` counts such rows and leaves them out of the mean.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from skimage.feature import hog as skimage_hog
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from iscam import methods as iscam_methods
from iscam.layers import resolve_layer
from iscam.methods.base import CAM, Target, _eval_mode
from iscam.stats import bootstrap_ci

__all__ = [
    "check_map_size",
    "GRANULARITIES",
    "HOG_BLOCK",
    "HOG_CELL",
    "HOG_ORIENTATIONS",
    "INSENSITIVE_THRESHOLD",
    "MODES",
    "SANITY_COLUMNS",
    "SANITY_VERSION",
    "SIMILARITY_METRICS",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "Stage",
    "insensitive_methods",
    "layer_seed",
    "parameterised_layers",
    "randomisation_stages",
    "randomised_copy",
    "sanity_rows",
    "similarity",
    "spread_positions",
    "spread_stages",
    "stage_seed",
    "summarise",
]

#: Bumped whenever a change to this module changes the values of a sanity row; the runner stores it with
#: every row of the store's ``sanity`` table, so rows of older code are recomputed, never mixed.
SANITY_VERSION = 1
#: ``granularity=`` choices of :func:`parameterised_layers`.
GRANULARITIES: tuple[str, ...] = ("block", "module")
#: Randomisation modes: from the logits down, one more layer per stage; or one layer at a time.
MODES: tuple[str, ...] = ("cascading", "independent")
#: The similarity columns of every row, in the paper's order.
SIMILARITY_METRICS: tuple[str, ...] = ("spearman", "spearman_abs", "ssim", "hog")
#: Columns of a row of :func:`sanity_rows` (one per image x method x stage).
SANITY_COLUMNS: tuple[str, ...] = (
    "image",  # position of the image in the batch
    "method",  # iscam.methods name
    "mode",  # "cascading" or "independent"
    "stage",  # 1-based position of the stage in its mode (1 = the logits layer)
    "randomised",  # the layer this stage adds (cascading) or re-initialises alone (independent)
    "n_randomised",  # how many layers are re-initialised at this stage
    "target",  # the explained class: the trained model's, the same at every stage
) + SIMILARITY_METRICS

#: Gaussian window of SSIM (Wang et al. 2004); scikit-image truncates it at 3.5 sigma: an 11 x 11 window.
SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
#: HOG cell size in pixels (Adebayo et al.'s ``pixels_per_cell=(16, 16)``), orientations and block size.
HOG_CELL = 16
HOG_ORIENTATIONS = 9
HOG_BLOCK = 3
#: :func:`insensitive_methods` flags a method whose mean Spearman correlation at the fully randomised
#: cascading stage is above this: more than half of the rank agreement of two equal maps survives random
#: weights.
INSENSITIVE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Stage:
    """One randomisation stage: the layers re-initialised together (logits side first)."""

    mode: str  #: "cascading" or "independent"
    index: int  #: 1-based position in its mode; cascading stage k re-initialises the top k layers
    layer: str  #: the layer this stage adds (cascading) or re-initialises alone (independent)
    layers: tuple[str, ...]  #: every layer re-initialised at this stage


# ----------------------------------------------------------------------------------------------------- stages
def parameterised_layers(model: nn.Module, x: Tensor,
                         granularity: str | Sequence[str] = "block") -> list[str]:
    """Names of the model's parameterised layers in the order one forward pass of ``x`` executes them.

    ``granularity``:

    - ``"block"`` (default): the outermost modules that are not a plain ``nn.Sequential`` -- the containers
      are descended, so torchvision's VGG gives ``features.0 ... classifier.6`` (16 layers), SqueezeNet its
      Fire modules ``features.N`` and ``classifier.1`` (10), ResNet-18 ``conv1, bn1, layer1.0 ... layer4.1,
      fc`` (11) and the Coral MobileNetV1 ``features.0 ... features.13, classifier`` (15);
    - ``"module"``: every module that owns parameters (VGG-16: 16, ResNet-18: 41, SqueezeNet 1.0: 26);
    - a sequence of module names, e.g. ResNet's stages ``["conv1", "bn1", "layer1", ..., "layer4", "fc"]``
      (Adebayo et al. randomised Inception v3 by its named blocks); only these are randomised.

    Layers without parameters are left out, and so are layers the forward pass never calls (they cannot change
    the output). The order is that of the first call of each layer (forward pre-hooks on a real forward of
    ``x[:1]`` in eval mode, without gradients; the hooks are removed and the training flags restored).
    Raises ``ValueError`` for a layer that owns parameters without a ``reset_parameters`` method, and for
    parameters that no layer covers.
    """
    _check_model(model)
    batch = _check_batch(x)
    units = _units(model, granularity)
    order: dict[str, int] = {}
    handles = []

    def recorder(name: str) -> Any:
        def record(_module: nn.Module, _inputs: Any) -> None:
            order.setdefault(name, len(order))

        return record

    try:
        for name, module in units.items():
            handles.append(module.register_forward_pre_hook(recorder(name)))
        with torch.no_grad(), _eval_mode(model):
            model(batch[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError("the forward pass called none of the model's parameterised layers")
    return sorted(order, key=order.__getitem__)


def randomisation_stages(layers: Sequence[str], modes: Sequence[str] = MODES) -> list[Stage]:
    """The stages of ``modes`` over ``layers`` (forward order, as :func:`parameterised_layers` returns them).

    Cascading stage ``k`` re-initialises ``layers[-k:]`` (listed logits first), so the last cascading stage is
    the fully randomised model; independent stage ``k`` re-initialises ``layers[-k]`` alone. For layers
    ``[a, b, c]``: cascading ``(c,), (c, b), (c, b, a)``, independent ``(c,), (b,), (a,)``.
    """
    names = list(layers)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"layers must be a non-empty sequence of module names, got {layers!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a module twice: {names}")
    _check_modes(modes)
    top_down = names[::-1]
    stages: list[Stage] = []
    for mode in modes:
        for k, layer in enumerate(top_down, start=1):
            chosen = tuple(top_down[:k]) if mode == "cascading" else (layer,)
            stages.append(Stage(mode, k, layer, chosen))
    return stages


def spread_positions(total: int, count: int | None) -> list[int]:
    """``count`` of the stage positions ``1 ... total`` spread evenly, the first and the last included:
    ``spread_positions(15, 4) == [1, 6, 10, 15]``. ``count=1`` keeps the last alone (cascading's fully
    randomised model); ``None`` or ``count >= total`` keeps them all."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int (the stages of a mode), got {total!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive int or None (every stage), got {count!r}")
    if count is None or count >= total:
        return list(range(1, total + 1))
    if count == 1:
        return [total]
    # floor(v + 0.5), not round(): banker's rounding could give two steps the same position
    return [1 + math.floor((total - 1) * i / (count - 1) + 0.5) for i in range(count)]


def spread_stages(stages: Sequence[Stage], count: int | None) -> list[Stage]:
    """The stages of each mode of ``stages`` (as :func:`randomisation_stages` returns them) at the
    :func:`spread_positions` of ``count``, in their order: fewer points of the same curves (a cascading stage
    k re-initialises the top k layers whichever other stages are computed, so the rows are those of the full
    run)."""
    chosen: list[Stage] = []
    for mode in dict.fromkeys(stage.mode for stage in stages):
        of_mode = [stage for stage in stages if stage.mode == mode]
        wanted = set(spread_positions(len(of_mode), count))
        chosen.extend(stage for position, stage in enumerate(of_mode, start=1) if position in wanted)
    return chosen


def layer_seed(seed: int, name: str) -> int:
    """Seed of the re-initialisation of the module ``name``: a hash of (seed, name) in ``[0, 2**63)``."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def stage_seed(seed: int, stage: Stage) -> int:
    """Seed of the random baseline's independent draw at ``stage`` (a hash of seed, mode and index)."""
    digest = hashlib.sha256(f"{seed}\x00{stage.mode}\x00{stage.index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def randomised_copy(model: nn.Module, layers: Iterable[str], *, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with the modules named in ``layers`` re-initialised (module docstring)."""
    _check_model(model)
    _check_seed(seed)
    names = list(layers)
    for name in names:
        _check_resettable(name, resolve_layer(model, name))
    randomised = copy.deepcopy(model)
    for name in names:
        _reinitialise(randomised, name, seed)
    return randomised


# ------------------------------------------------------------------------------------------------- similarity
def similarity(reference: Tensor | np.ndarray, maps: Tensor | np.ndarray, *,
               hog_cell: int = HOG_CELL) -> dict[str, np.ndarray]:
    """Similarity of ``maps`` to ``reference`` (both ``[B, H, W]``): one float64 array ``[B]`` per metric.

    Keys are :data:`SIMILARITY_METRICS` (see the module docstring for the conventions). Correlations are
    computed with exact (rank) or exactly rounded (HOG) sums, so two equal maps give exactly 1; a constant map
    gives NaN. ``hog_cell`` is the HOG cell size; the maps must be at least ``3 * hog_cell`` and 11 pixels
    wide.
    """
    first, second = _as_maps(reference, "reference"), _as_maps(maps, "maps")
    if first.shape != second.shape:
        raise ValueError(f"reference and maps must have the same shape [B, H, W], got {first.shape} and "
                         f"{second.shape}")
    _check_map_size(first.shape[1], first.shape[2], hog_cell)
    result = {name: np.empty(first.shape[0]) for name in SIMILARITY_METRICS}
    for i, (a, b) in enumerate(zip(first, second)):
        result["spearman"][i] = _rank_correlation(a, b)
        non_negative = a.min() >= 0 and b.min() >= 0  # every CAM map: |m| = m, the same ranks
        result["spearman_abs"][i] = (result["spearman"][i] if non_negative
                                     else _rank_correlation(np.abs(a), np.abs(b)))
        a01, b01 = _minmax(a), _minmax(b)
        result["ssim"][i] = structural_similarity(
            a01, b01, data_range=1.0, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False
        )
        result["hog"][i] = _pearson(_hog(a01, hog_cell), _hog(b01, hog_cell))
    return result


# -------------------------------------------------------------------------------------------------- the check
def sanity_rows(
    model: nn.Module,
    x: Tensor,
    methods: Mapping[str, Mapping[str, Any]],
    *,
    target: Target = None,
    layer: str | None = None,
    granularity: str | Sequence[str] = "block",
    modes: Sequence[str] = MODES,
    stages: Sequence[Stage] | None = None,
    seed: int = 0,
    hog_cell: int = HOG_CELL,
) -> list[dict[str, Any]]:
    """Run the sanity checks of ``methods`` on the batch ``x``: one row (:data:`SANITY_COLUMNS`) per image x
    method x stage. The trained model is not a row (its similarity to itself is 1 by definition, or NaN for a
    constant map); curves start from it as stage 0.

    Args:
        model: the trained classifier (never modified: every stage is computed on one deep copy whose layers
            are re-initialised and restored as the stages require).
        x: normalised input batch ``[B, 3, H, W]`` on the model's device.
        methods: registry name -> keyword arguments for ``iscam.methods.get`` (``{"iscam": {"N": 10}}``); the
            same arguments serve the trained and every randomised model.
        target: the classes to explain; ``None`` = argmax of the trained model's logits. Every stage explains
            these classes (not the randomised model's argmax).
        layer: target layer of the CAM methods (``None``: the model's default).
        granularity, modes: the stages, from :func:`parameterised_layers` and :func:`randomisation_stages`;
            ignored when ``stages`` is given (e.g. a subset of them).
        seed: seed of the re-initialisation (:func:`layer_seed`).
        hog_cell: HOG cell size of :func:`similarity`.
    """
    _check_model(model)
    batch = _check_batch(x)
    _check_seed(seed)
    specs = _check_methods(methods)
    if layer is not None and not isinstance(layer, str):  # a module object would belong to the caller's model
        raise TypeError(f"layer must be a module name (str) or None, got {type(layer).__name__}")
    _check_map_size(batch.shape[2], batch.shape[3], hog_cell)
    _check_modes(modes)
    if stages is not None:
        stages = _check_stages(model, stages)
    working = copy.deepcopy(model)
    # constructing every method checks its parameters and layer before the first forward
    cams = {name: iscam_methods.get(name, working, layer, **params) for name, params in specs.items()}
    trained: dict[str, Tensor] = {}
    random_seeds: dict[str, int] = {}  # the random baseline's seed, from which its stage draws are derived
    try:
        if stages is None:
            layers = parameterised_layers(working, batch, granularity)
            stages = _check_stages(working, randomisation_stages(layers, modes))
        with torch.no_grad(), _eval_mode(working):
            logits = working(batch)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = getattr(logits, "shape", logits)
            raise TypeError(f"the model must return logits [B, classes], got {shape}")
        labels = CAM._resolve_target(target, logits)
        for name, cam in cams.items():
            trained[name] = cam(batch, labels).detach()
            if isinstance(cam, iscam_methods.RandomCAM):
                random_seeds[name] = cam.seed
    finally:
        for cam in cams.values():
            cam.close()
    rows: list[dict[str, Any]] = []
    for stage, randomised in _randomised_stages(working, stages, seed):
        for name, params in specs.items():
            if name in random_seeds:
                params = {**params, "seed": stage_seed(random_seeds[name], stage)}
            with iscam_methods.get(name, randomised, layer, **params) as cam:
                maps = cam(batch, labels).detach()
            values = similarity(trained[name], maps, hog_cell=hog_cell)
            for i in range(batch.shape[0]):
                rows.append({
                    "image": i, "method": name, "mode": stage.mode, "stage": stage.index,
                    "randomised": stage.layer, "n_randomised": len(stage.layers), "target": int(labels[i]),
                    **{metric: float(values[metric][i]) for metric in SIMILARITY_METRICS},
                })
    return rows


# -------------------------------------------------------------------------------------------------- summaries
def summarise(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, *,
              metrics: Sequence[str] = SIMILARITY_METRICS, n_boot: int = 10000, seed: int = 0,
              level: float = 0.95) -> pd.DataFrame:
    """Mean and percentile-bootstrap interval (:func:`iscam.stats.bootstrap_ci`) of each metric per method and
    stage, one row per (method, mode, stage, metric). ``rows``: those of :func:`sanity_rows`, or a store's
    ``sanity`` table (``ResultsStore.read(table="sanity")``, narrowed to one setup and parameter set).

    Columns: ``method, mode, stage, randomised, n_randomised, metric, mean, low, high, n, n_undefined`` --
    ``n`` images with a defined value, ``n_undefined`` with NaN (constant maps), left out of the mean; with no
    defined value ``mean``/``low``/``high`` are NaN.
    """
    frame = _rows_frame(rows)
    unknown = [m for m in metrics if m not in SIMILARITY_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {SIMILARITY_METRICS}, got {list(metrics)}")
    keys = ["method", "mode", "stage", "randomised", "n_randomised"]
    out = []
    for group, part in frame.groupby(keys, sort=False):
        for metric in metrics:
            values = part[metric].to_numpy(dtype=np.float64)
            defined = values[~np.isnan(values)]
            if defined.size:
                ci = bootstrap_ci(defined, n_boot=n_boot, seed=seed, level=level)
                mean, low, high = ci.estimate, ci.low, ci.high
            else:
                mean = low = high = math.nan
            out.append({**dict(zip(keys, group)), "metric": metric, "mean": mean, "low": low, "high": high,
                        "n": int(defined.size), "n_undefined": int(values.size - defined.size)})
    return pd.DataFrame(out, columns=[*keys, "metric", "mean", "low", "high", "n", "n_undefined"])


def insensitive_methods(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, *, metric: str = "spearman",
                        threshold: float = INSENSITIVE_THRESHOLD, n_boot: int = 10000,
                        seed: int = 0) -> pd.DataFrame:
    """Per method, ``metric`` at its fully randomised cascading stage, flagged when the mean exceeds
    ``threshold`` (default :data:`INSENSITIVE_THRESHOLD`): a map that barely depends on the weights.

    The fully randomised stage is the cascading stage with the most layers re-initialised among ``rows``.
    Columns: ``method, stage, randomised, n_randomised, mean, low, high, n, n_undefined, flagged``. Methods
    with no cascading rows are absent; a mean that is NaN (no defined value) is not flagged.
    """
    frame = _rows_frame(rows)
    if metric not in SIMILARITY_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(SIMILARITY_METRICS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    cascading = frame[frame["mode"] == "cascading"]
    deepest = cascading.groupby("method")["n_randomised"].transform("max")
    full = cascading[cascading["n_randomised"] == deepest]
    table = summarise(full, metrics=[metric], n_boot=n_boot, seed=seed)
    table = table.drop(columns=["mode", "metric"])
    table["flagged"] = table["mean"] > threshold
    return table.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------- helpers
def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_batch(x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, 3, H, W], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, 3, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point (normalised) tensor, got {x.dtype}")
    return x


def check_map_size(height: int, width: int, hog_cell: Any = HOG_CELL) -> None:
    """A ``ValueError`` when maps of ``height x width`` are too small for SSIM's window and a HOG block."""
    _check_map_size(height, width, hog_cell)


def _check_map_size(height: int, width: int, hog_cell: Any) -> None:
    if isinstance(hog_cell, bool) or not isinstance(hog_cell, int) or hog_cell <= 0:
        raise ValueError(f"hog_cell must be a positive int, got {hog_cell!r}")
    smallest = max(SSIM_WINDOW, HOG_BLOCK * hog_cell)
    if min(height, width) < smallest:
        raise ValueError(f"maps of {height}x{width} pixels are too small: SSIM's window and a HOG block of "
                         f"{HOG_BLOCK}x{HOG_BLOCK} cells of {hog_cell} px need at least {smallest} px a side "
                         "(pass a smaller hog_cell)")


def _check_modes(modes: Sequence[str]) -> None:
    if isinstance(modes, str) or not modes:
        raise ValueError(f"modes must be a non-empty sequence of {MODES}, got {modes!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _check_methods(methods: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(methods, Mapping) or not methods:
        raise TypeError(f"methods must be a non-empty mapping name -> parameters, got {methods!r}")
    specs = {}
    for name, params in methods.items():
        if name not in iscam_methods.METHODS:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(iscam_methods.METHODS)}")
        if not isinstance(params, Mapping):
            raise TypeError(f"the parameters of {name!r} must be a mapping, got {params!r}")
        reserved = {"model", "target_layer"} & set(params)
        if reserved:
            raise ValueError(f"the parameters of {name!r} may not set {sorted(reserved)}: pass layer= "
                             "instead")
        specs[str(name)] = dict(params)
    return specs


def _owners(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The submodules of ``module`` (itself included) that own parameters, with their dotted names."""
    return [
        (".".join(part for part in (prefix, name) if part), sub)
        for name, sub in module.named_modules()
        if next(sub.parameters(recurse=False), None) is not None
    ]


def _check_resettable(name: str, module: nn.Module) -> None:
    owners = _owners(module, name)
    if not owners:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no parameters to re-initialise")
    missing = [f"{owner} ({type(sub).__name__})" for owner, sub in owners if not callable(
        getattr(sub, "reset_parameters", None))]
    if missing:
        raise ValueError(f"cannot re-initialise {', '.join(missing)}: a module that owns parameters needs a "
                         "reset_parameters() method")


def _units(model: nn.Module, granularity: str | Sequence[str]) -> dict[str, nn.Module]:
    """The candidate layers of ``granularity`` that own parameters, by name (definition order)."""
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)} or a "
                             "sequence of module names")
        if granularity == "module":
            units = dict(_owners(model, ""))
            units.pop("", None)
        else:
            units = {name: module for name, module in _blocks(model, "")
                     if next(module.parameters(), None) is not None}
    else:
        names = list(granularity)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise ValueError("granularity must be 'block', 'module' or a non-empty sequence of module "
                             f"names, got {granularity!r}")
        units = {name: resolve_layer(model, name) for name in names}
        _check_disjoint(names)
    for name, module in units.items():
        _check_resettable(name, module)
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own and isinstance(granularity, str):
        raise ValueError(f"the model owns parameters directly ({', '.join(own)}), which no layer covers")
    return units


def _blocks(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """The outermost submodules that are not a plain ``nn.Sequential`` (containers are descended)."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            yield from _blocks(child, full + ".")
        else:
            yield full, child


def _check_disjoint(names: Sequence[str]) -> None:
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"layer {b!r} lies inside layer {a!r}: the layers of the stages must not "
                                 "overlap")


def _check_stages(model: nn.Module, stages: Sequence[Stage]) -> list[Stage]:
    stages = list(stages)
    if not stages or not all(isinstance(stage, Stage) for stage in stages):
        raise TypeError(f"stages must be a non-empty sequence of Stage, got {stages!r}")
    for stage in stages:
        if stage.mode not in MODES or not stage.layers or stage.layer not in stage.layers:
            raise ValueError(f"invalid stage {stage!r}: mode must be one of {MODES} and layer one of its "
                             "layers")
    names = sorted({name for stage in stages for name in stage.layers})
    for name in names:
        _check_resettable(name, resolve_layer(model, name))
    _check_disjoint(names)
    return stages


def _reinitialise(model: nn.Module, name: str, seed: int) -> None:
    """Re-initialise every parameter owner inside the module ``name`` of ``model`` in place (seeded, CPU)."""
    for owner, module in _owners(resolve_layer(model, name), name):
        fresh = copy.deepcopy(module).to("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(seed, owner))
            fresh.reset_parameters()  # type: ignore[operator]  # checked by _check_resettable
        with torch.no_grad():
            for live, new in zip(_own_tensors(module), _own_tensors(fresh), strict=True):
                live.copy_(new)


def _own_tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _randomised_stages(working: nn.Module, stages: Sequence[Stage],
                       seed: int) -> Iterator[tuple[Stage, nn.Module]]:
    """Bring ``working`` to each stage in turn: re-initialise the layers the stage adds, restore the trained
    weights of those it does not include (kept from before their first re-initialisation)."""
    trained: dict[str, list[tuple[Tensor, Tensor]]] = {}
    current: set[str] = set()
    try:
        for stage in stages:
            wanted = set(stage.layers)
            for name in sorted(current - wanted):
                _restore(trained[name])
            for name in stage.layers:
                if name not in current:
                    if name not in trained:
                        module = resolve_layer(working, name)
                        trained[name] = [(t, t.detach().clone()) for _, m in _owners(module, name)
                                         for t in _own_tensors(m)]
                    _reinitialise(working, name, seed)
            current = wanted
            yield stage, working
    finally:
        for name in current:
            _restore(trained[name])


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for live, kept in saved:
            live.copy_(kept)


def _as_maps(maps: Any, what: str) -> np.ndarray:
    if isinstance(maps, Tensor):
        array = maps.detach().to("cpu", torch.float64).numpy()
    elif isinstance(maps, np.ndarray):
        array = maps.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{what} must be a torch.Tensor or numpy array [B, H, W], got {type(maps).__name__}")
    if array.ndim != 3 or array.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty batch of maps [B, H, W], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return array


def _minmax(a: np.ndarray) -> np.ndarray:
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else np.zeros_like(a)


def _hog(image: np.ndarray, cell: int) -> np.ndarray:
    return np.asarray(skimage_hog(image, orientations=HOG_ORIENTATIONS, pixels_per_cell=(cell, cell),
                                  cells_per_block=(HOG_BLOCK, HOG_BLOCK), block_norm="L2-Hys",
                                  feature_vector=True), dtype=np.float64)


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (ties share their mean rank).

    Twice a centred average rank is an integer, so every product and partial sum below is an integer under
    2**53 (maps of up to ~300 000 pixels) and exact in float64 in any summation order: equal maps give
    exactly 1 without the cost of ``math.fsum``.
    """
    n = a.size
    du = 2 * rankdata(a.ravel(), method="average") - (n + 1)
    dv = 2 * rankdata(b.ravel(), method="average") - (n + 1)
    # elementwise product + sum, not ``du @ dv``: a multithreaded BLAS dot was ~1000x slower on shared cores
    suu, svv, suv = float((du * du).sum()), float((dv * dv).sum()), float((du * dv).sum())
    if suu == 0.0 or svv == 0.0:
        return math.nan
    return max(-1.0, min(1.0, suv / math.sqrt(suu * svv)))


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    """Pearson's r with exactly rounded sums (``math.fsum``: the result does not depend on how a BLAS
    orders them): equal inputs give exactly 1, as ``sqrt(s * s) == s`` in IEEE arithmetic; a constant input
    gives NaN."""
    u, v = u.ravel().astype(np.float64), v.ravel().astype(np.float64)
    du = u - math.fsum(u) / u.size
    dv = v - math.fsum(v) / v.size
    suu, svv, suv = math.fsum(du * du), math.fsum(dv * dv), math.fsum(du * dv)
    if suu == 0.0 or svv == 0.0:
        return math.nan
    return max(-1.0, min(1.0, suv / math.sqrt(suu * svv)))


# What the summaries read: the rows of sanity_rows or the store's sanity table (keyed by file, not "image").
_SUMMARY_COLUMNS = ("method", "mode", "stage", "randomised", "n_randomised") + SIMILARITY_METRICS


def _rows_frame(rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in _SUMMARY_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {', '.join(missing)}; expected the rows of sanity_rows "
                         f"({', '.join(SANITY_COLUMNS)}) or of a store's sanity table")
    return frame
