"""The book's figures and displayed tables, and the glue between the notebooks and the results store.

The notebooks in ``notebooks/`` hold no logic: each calls a few functions from here and from
:mod:`iscam.tables`. Computing stays where it belongs -- the runner (:mod:`iscam.experiment`) fills the
results store, the tables (:mod:`iscam.tables`) summarise it -- and this module

- resolves a notebook's parameters into runs (:func:`book_runs`: profile(s), number of images, ``N``,
  ``sigma``, seed, device, data root and results folder) and resumes the runner for rows the store lacks
  (:meth:`BookRun.ensure`), so a chapter rerun with a new ``N`` computes only the new rows;
- states which profile, model, weights and images produced a page (:func:`banner`);
- puts each table beside the paper's values with the difference and the bootstrap interval
  (:func:`paper_comparison`);
- draws the paper's figures: the IS-CAM pipeline from real tensors (:func:`pipeline_trace`,
  :func:`pipeline_figure`), the visual comparison (:func:`explain_images`, :func:`method_grid`), the mean
  insertion/deletion curves (:func:`curves_figure`), and the book's additions (:func:`n_sweep`,
  :func:`map_similarity`, :func:`sensitivity_table`, :func:`cost_table`, :func:`bar_figure`).
"""

from __future__ import annotations

import html
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import experiment, tables
from . import provenance as provenance_module
from .store import ResultsStore

__all__ = [
    "REPO",
    "PAPER_PROFILES",
    "MODEL_LABELS",
    "BookRun",
    "book_runs",
    "banner",
    "paper_comparison",
    "curves_figure",
    "choose_images",
    "explain_images",
    "method_grid",
    "PipelineTrace",
    "pipeline_trace",
    "pipeline_figure",
    "n_sweep",
    "map_similarity",
    "sensitivity_table",
    "cost_table",
    "bar_figure",
    "weights_text",
    "model_label",
    "provenance_table",
    "notebook_times",
]

REPO = Path(__file__).resolve().parents[1]
#: Profiles that measure what the paper measured (its CNNs, torchvision weights, 2000 images).
PAPER_PROFILES: tuple[str, ...] = ("paper-vgg16", "paper-resnet18", "paper-squeezenet")
MODEL_LABELS: dict[str, str] = {
    "vgg16": "VGG-16",
    "resnet18": "ResNet-18",
    "squeezenet1_0": "SqueezeNet1.0",
    "mobilenet_v2_coral": "Coral MobileNetV2 (int8)",
    "mobilenet_v1_coral_tiny": "Coral MobileNetV1 0.25 (int8, 128 px)",
}
_WEIGHT_LABELS: dict[str, str] = {
    "vgg16": "torchvision IMAGENET1K_V1",
    "resnet18": "torchvision IMAGENET1K_V1",
    "squeezenet1_0": "torchvision IMAGENET1K_V1",
    "mobilenet_v2_coral": "Coral mobilenet_v2_1.0_224_quant.tflite, converted to PyTorch",
    "mobilenet_v1_coral_tiny": "Coral mobilenet_v1_0.25_128_quant.tflite, converted to PyTorch",
}
_STAT_LABELS = ("ours", "95 % CI", "paper", "Δ")
_METRIC_LABELS = {"insertion": "Insertion AUC % ↑", "deletion": "Deletion AUC % ↓",
                  "average_drop": "Average Drop % ↓", "increase": "Increase in Confidence % ↑",
                  "win": "Win % ↑", "pointing": "Pointing game % ↑"}


def _method_names() -> dict[str, str]:
    from .methods import PAPER_NAMES

    return dict(PAPER_NAMES)


def model_label(name: str) -> str:
    return MODEL_LABELS.get(name, name)


# --------------------------------------------------------------------------------------------------
# Runs: notebook parameters -> configs -> results store
# --------------------------------------------------------------------------------------------------

@dataclass
class BookRun:
    """One profile as a notebook uses it: the config (with the notebook's overrides) and its store.

    Every variant of the config (another ``N``, another schedule) shares the store: its rows are keyed by
    the method and metric parameters, so variants add rows and never overwrite each other.
    """

    profile: str
    config: experiment.ExperimentConfig
    store: ResultsStore
    data_root: str | None = None
    device: str | None = None
    summaries: list[experiment.RunSummary] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.config.model.name

    def variant(self, overrides: Mapping[str, Any] | Sequence[str] = (), *,
                methods: Iterable[tuple[str, Mapping[str, Any]]] | None = None) -> experiment.ExperimentConfig:
        """The config with ``overrides`` (``{"metrics.insertion.substrate": "zeros"}``) and/or another
        method list (``methods=[("iscam", {"N": 5, "schedule": "authors"})]``)."""
        raw = experiment.apply_overrides(self.config.to_dict(), overrides)
        if methods is not None:
            raw["methods"] = [{"name": name, "params": dict(params)} for name, params in methods]
        return experiment.config_from_dict(raw)

    def subset(self, n_images: int | None) -> BookRun:
        """The same run on ``n_images`` images (``None``: unchanged), sharing the store: used by the
        chapters that rerun a method many times (the N sweep, the protocol variants)."""
        if n_images is None or n_images == self.config.data.num_images:
            return self
        config = self.variant({"data.num_images": int(n_images)})
        return BookRun(self.profile, config, self.store, self.data_root, self.device)

    def method_params(self, name: str) -> dict[str, Any]:
        """The parameters of method ``name`` in this run's config."""
        for spec in self.config.methods:
            if spec.name == name:
                return dict(spec.params)
        raise KeyError(f"profile {self.profile!r} runs no method {name!r} "
                       f"(it runs {', '.join(m.name for m in self.config.methods)})")

    def ensure(self, config: experiment.ExperimentConfig | None = None, *,
               progress: bool = True) -> experiment.RunSummary:
        """Run or resume the runner for ``config`` (default: this run's): only missing rows are computed."""
        summary = experiment.run(config or self.config, out=self.store.folder, data_root=self.data_root,
                                 device=self.device, progress=progress)
        self.summaries.append(summary)
        return summary

    def frame(self, config: experiment.ExperimentConfig | None = None, *, curves: bool = False) -> pd.DataFrame:
        """The store's rows of ``config`` (default: this run's), one parameter set per method."""
        frame = tables.select(self.store.read(curves=curves), config or self.config)
        if frame.empty:
            raise tables.TableError(f"the store {self.store.folder} has no rows for config {(config or self.config).name!r}: "
                                    "call ensure() first")
        return frame

    def rows_computed(self) -> int:
        """Rows the runner computed for this notebook so far (0 when everything was already stored)."""
        return sum(s.rows_written for s in self.summaries)


def book_runs(profile: str = "quick", *, n_images: int | None = None, N: int | None = None,
              sigma: float | None = None, seed: int | None = None, data_root: str | None = None,
              device: str | None = None, results: str | None = None,
              overrides: Sequence[str] = ()) -> list[BookRun]:
    """The runs a notebook reads: one per profile in ``profile`` (comma-separated, e.g. the three paper
    profiles), with the notebook's parameters applied (``None`` keeps the profile's value):

    ``n_images`` -> ``data.num_images``; ``N`` -> IS-CAM's ``N``; ``sigma`` -> SS-CAM's ``sigma``; ``seed`` ->
    the config seed (stochastic methods); ``device`` -> the device; ``results`` -> the folder holding one
    store per config (``<results>/<config name>``; default ``<repository>/results``), so every notebook of
    a book build shares the runner's work. ``overrides`` are further ``key=value`` strings.
    """
    names = [p.strip() for p in str(profile).split(",") if p.strip()]
    if not names:
        raise ValueError("profile is empty: name a config in configs/ (e.g. 'quick')")
    folder = Path(results) if results else REPO / "results"
    runs = []
    for name in names:
        raw_config = experiment.load_config(name)
        changes: list[str] = list(overrides)
        if n_images is not None:
            changes.append(f"data.num_images={int(n_images)}")
        present = {m.name for m in raw_config.methods}
        if N is not None and "iscam" in present:
            changes.append(f"methods.iscam.N={int(N)}")
        if sigma is not None and "sscam" in present:
            changes.append(f"methods.sscam.sigma={float(sigma)}")
        if seed is not None:
            changes.append(f"seed={int(seed)}")
        config = experiment.load_config(name, changes)
        runs.append(BookRun(name, config, ResultsStore(folder / config.name), data_root, device))
    return runs


def _methods_text(config: experiment.ExperimentConfig) -> str:
    names = _method_names()
    parts = []
    for spec in config.methods:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(spec.params.items()))
        parts.append(f"{names.get(spec.name, spec.name)}" + (f" ({shown})" if shown else ""))
    return "; ".join(parts)


def banner(runs: Sequence[BookRun], *, note: str | None = None) -> Any:
    """An HTML box stating the profile, model, weights, images and methods behind a page.

    Offline profiles are flagged as such, so their numbers are never mistaken for the paper's.
    """
    from IPython.display import HTML

    items = []
    for run in runs:
        config = run.config
        provenance = run.store.provenance() or {}
        # before the first run there is no provenance: name the device the run will use, not "auto"
        device = provenance.get("device") or provenance_module.device_name(_device(run))
        images = config.data.num_images if config.data.num_images is not None else "all"
        items.append(
            "<li>"
            f"<strong>profile</strong> <code>{html.escape(run.profile)}</code> · "
            f"<strong>model</strong> {html.escape(model_label(config.model.name))} "
            f"(<code>{html.escape(config.model.name)}</code>, layer <code>{html.escape(str(config.model.target_layer or 'default'))}</code>) · "
            f"<strong>weights</strong> {html.escape(weights_text(config))} · "
            f"<strong>images</strong> {images} from <code>{html.escape(config.data.manifest)}</code> · "
            f"<strong>device</strong> {html.escape(str(device))}<br>"
            f"<strong>methods</strong> {html.escape(_methods_text(config))}"
            "</li>"
        )
    paper = all(run.profile in PAPER_PROFILES for run in runs)
    verdict = ("The paper's protocol: its CNNs, torchvision's ImageNet weights and its number of images."
               if paper else
               "<strong>Offline profile, not the paper's run:</strong> a small pretrained model and a sample of "
               "validation images. Compare trends with the paper's values, not digits "
               "(<code>make reproduce</code> runs the paper's profiles).")
    extra = f"<p>{note}</p>" if note else ""
    return HTML(
        '<div class="iscam-banner admonition important">'
        '<p class="admonition-title">Produced by</p>'
        f'<ul>{"".join(items)}</ul><p>{verdict}</p>{extra}'
        "</div>"
    )


def weights_text(config: experiment.ExperimentConfig) -> str:
    weights = config.model.weights
    if weights is None:
        return "none (random initialisation)"
    if weights == "default":
        return _WEIGHT_LABELS.get(config.model.name, "default")
    return str(weights)


# --------------------------------------------------------------------------------------------------
# Tables beside the paper
# --------------------------------------------------------------------------------------------------

def paper_comparison(table: pd.DataFrame, *, digits: int = 2) -> pd.DataFrame:
    """A long table of :mod:`iscam.tables` as a wide display table: one row per (model, method), and per
    metric the columns *ours*, *95 % CI*, *paper* and *Δ* (ours - paper).

    When the paper did not use the model (offline profiles), the model label names the CNN whose published
    values are shown instead.
    """
    if table.empty:
        raise tables.TableError("the table is empty: the store has no rows for these methods")
    metrics = list(dict.fromkeys(table["metric"]))
    rows: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for record in table.itertuples(index=False):
        paper_model = str(record.paper_model)
        label = model_label(record.model)
        if paper_model != record.model:
            label += f" — paper: {model_label(paper_model)}"
        cells = rows.setdefault((label, str(record.name)), {})
        metric = _METRIC_LABELS.get(record.metric, record.metric)
        cells[(metric, "ours")] = _number(record.ours, digits)
        cells[(metric, "95 % CI")] = f"[{_number(record.low, digits)}, {_number(record.high, digits)}]"
        cells[(metric, "paper")] = _number(record.paper, digits)
        cells[(metric, "Δ")] = _number(record.diff, digits, signed=True)
    columns = pd.MultiIndex.from_tuples(
        [(_METRIC_LABELS.get(m, m), stat) for m in metrics for stat in _STAT_LABELS], names=["metric", ""]
    )
    index = pd.MultiIndex.from_tuples(list(rows), names=["model", "method"])
    return pd.DataFrame([[cells.get(c, "") for c in columns] for cells in rows.values()], index=index,
                        columns=columns)


def _number(value: float, digits: int, *, signed: bool = False) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


# --------------------------------------------------------------------------------------------------
# Fig. 3: mean insertion / deletion curves
# --------------------------------------------------------------------------------------------------

def curves_figure(frame: pd.DataFrame, *, model: str | None = None) -> Any:
    """Fig. 3: the mean insertion and deletion curves of each method (legend: mean AUC %).

    ``frame`` is a store frame read with ``curves=True`` and narrowed to one parameter set per method.
    """
    import matplotlib.pyplot as plt

    if model is not None:
        frame = frame[frame["model"] == model]
    names = _method_names()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for axis, kind in zip(axes, ("insertion", "deletion")):
        curves = tables.mean_curves(frame, kind)
        aucs = frame.groupby("method")[f"{kind}_auc"].mean()
        for method in sorted(curves["method"].unique(), key=_method_order):
            part = curves[curves["method"] == method]
            style = {"linestyle": ":", "color": "0.4"} if method == "random" else {}
            axis.plot(part["fraction"], part["score"], linewidth=1.8 if method == "iscam" else 1.2,
                      label=f"{names.get(method, method)} ({100 * aucs[method]:.2f})", **style)
        axis.set_title(f"{kind.capitalize()} (AUC %: {'higher' if kind == 'insertion' else 'lower'} is better)")
        axis.set_xlabel(f"fraction of pixels {'inserted' if kind == 'insertion' else 'deleted'}")
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("probability of the explained class")
    count = int(frame.groupby("method").size().max())
    figure.suptitle(f"{model_label(frame['model'].iloc[0])}: mean curves over {count} images")
    plt.close(figure)
    return figure


def _method_order(method: str) -> tuple[int, str]:
    order = tables.METHOD_ORDER
    return (order.index(method) if method in order else len(order), method)


# --------------------------------------------------------------------------------------------------
# Fig. 2: the six methods side by side
# --------------------------------------------------------------------------------------------------

def choose_images(run: BookRun, wanted: Sequence[str] = ("basenji", "capuchin", "whippet"),
                  count: int = 3) -> pd.DataFrame:
    """Manifest rows (``index, file, label, category``) to show: the first image of each wanted class
    the data has (the paper shows a Basenji, a Capuchin and a Whippet), then the first images of the
    run's selection until ``count`` rows."""
    from . import data as iscam_data
    from .paths import data_root as resolve_root
    from .models import imagenet_categories

    categories = imagenet_categories()
    manifest = Path(iscam_data.sample_manifest(resolve_root(run.data_root), run.config.data.manifest)) \
        if not run.config.data.manifest.endswith(".csv") else Path(run.config.data.manifest)
    rows = pd.read_csv(manifest)
    rows["index"] = np.arange(len(rows))
    rows["category"] = [categories[int(label)] for label in rows["label"]]
    chosen = []
    for name in wanted:
        match = rows[rows["category"].str.lower() == name.lower()]
        if len(match):
            chosen.append(int(match["index"].iloc[0]))
    for index in experiment.select_indices(len(rows), run.config.data):
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen.append(index)
    return rows.iloc[chosen[:count]][["index", "file", "label", "category"]].reset_index(drop=True)


def _loaded_model(run: BookRun) -> Any:
    from . import models
    from .paths import data_root as resolve_root

    device = _device(run)
    return models.load(run.config.model.name, run.config.model.weights, data_root=resolve_root(run.data_root),
                       device=str(device), resize=run.config.model.resize)


def _device(run: BookRun) -> torch.device:
    requested = run.device or run.config.device
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def _dataset(run: BookRun, preprocess: Any) -> Any:
    from . import data as iscam_data
    from .paths import data_root as resolve_root

    text = run.config.data.manifest
    manifest = Path(text) if text.endswith(".csv") else Path(iscam_data.sample_manifest(resolve_root(run.data_root), text))
    return iscam_data.ManifestDataset(manifest, preprocess)


def _cam(run: BookRun, spec_name: str, params: Mapping[str, Any], model: torch.nn.Module, layer: str,
         seed: int) -> Any:
    """The method as the runner builds it: same parameters, batch size, memory layout and precision."""
    from . import methods

    kwargs = experiment.method_kwargs(run.config, spec_name, params)
    if "seed" in inspect.signature(methods.METHODS[spec_name]).parameters:
        kwargs["seed"] = seed
    return methods.get(spec_name, model, target_layer=layer, **kwargs)


@dataclass
class Explained:
    """Maps of several methods on a few images (:func:`explain_images`)."""

    images: torch.Tensor  # [B, 3, H, W] in [0, 1] (denormalised)
    files: list[str]
    titles: list[str]  # per image: class name and probability
    maps: dict[str, torch.Tensor]  # method -> [B, H, W]
    probabilities: dict[str, torch.Tensor] = field(default_factory=dict)


def explain_images(run: BookRun, indices: Sequence[int],
                   methods: Sequence[tuple[str, Mapping[str, Any]]] | None = None, *,
                   keys: str | None = None) -> Explained:
    """Maps of each method of the run (or of ``methods``) on the manifest rows ``indices``, as the runner
    computes them (the model's prediction is explained; stochastic methods seeded per image).

    ``maps`` is keyed by method name, or by ``"<keys>=<value>"`` of that parameter (e.g. ``keys="N"``)
    when the same method appears with several parameter sets."""
    loaded = _loaded_model(run)
    device = _device(run)
    dataset = _dataset(run, loaded.preprocess)
    samples = [dataset[int(i)] for i in indices]
    x = torch.stack([s.image for s in samples]).to(device)
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(x).float(), 1)
    target = probabilities.argmax(1)
    titles = [f"{loaded.categories[int(c)]} ({float(probabilities[b, c]):.2f})" for b, c in enumerate(target)]
    layer = run.config.model.target_layer or loaded.target_layer
    chosen = methods if methods is not None else [(m.name, m.params) for m in run.config.methods]
    maps: dict[str, torch.Tensor] = {}
    for name, params in chosen:
        per_image = []
        for b, sample in enumerate(samples):
            seed = experiment.image_seed(run.config.seed, name, sample.file)
            with torch.random.fork_rng(devices=[]), _cam(run, name, params, loaded.model, layer, seed) as cam:
                torch.manual_seed(seed)
                per_image.append(cam(x[b:b + 1], target[b:b + 1])[0].float().cpu())
        maps[name if keys is None else f"{keys}={params[keys]}"] = torch.stack(per_image)
    images = torch.stack([loaded.preprocess.denormalize(s.image).clamp(0, 1) for s in samples])
    return Explained(images, [s.file for s in samples], titles, maps)


def method_grid(explained: Explained, *, alpha: float = 0.5) -> Any:
    """Fig. 2: one row per image, the input then each method's map over it."""
    import matplotlib.pyplot as plt

    from .plots import overlay

    names = _method_names()
    methods = list(explained.maps)
    rows, columns = len(explained.files), len(methods) + 1
    figure, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.0 * rows + 0.3), squeeze=False,
                                constrained_layout=True)
    for r in range(rows):
        axes[r, 0].imshow(explained.images[r].permute(1, 2, 0).numpy())
        axes[r, 0].set_title(explained.titles[r], fontsize=8)
        for c, method in enumerate(methods, start=1):
            axes[r, c].imshow(overlay(explained.images[r], explained.maps[method][r], alpha=alpha))
            if r == 0:
                axes[r, c].set_title(names.get(method, method), fontsize=9)
        for axis in axes[r]:
            axis.set_xticks([])
            axis.set_yticks([])
    plt.close(figure)
    return figure


# --------------------------------------------------------------------------------------------------
# Fig. 1: the IS-CAM pipeline from real tensors
# --------------------------------------------------------------------------------------------------

@dataclass
class PipelineTrace:
    """The tensors of one IS-CAM explanation (:func:`pipeline_trace`)."""

    image: torch.Tensor  # [3, H, W] in [0, 1]
    category: str
    probability: float
    N: int
    schedule: str
    coefficients: list[float]  # a_1..a_N
    channels: list[int]  # the channels shown (largest weights)
    upsampled: torch.Tensor  # [C, H, W] normalised masks s(U_k) of the shown channels
    steps: list[int]  # the steps shown (1-based)
    masked: torch.Tensor  # [C, S, 3, H, W] a_i * X * s(U_k), denormalised for display
    step_scores: torch.Tensor  # [C, N] p_c(a_i * X * s(U_k)) for every step
    weights: torch.Tensor  # [K] alpha_k of every channel (ISCAM.channel_weights)
    saliency: torch.Tensor  # [H, W] the IS-CAM map
    forwards: int  # forward passes IS-CAM needed for this image


def pipeline_trace(run: BookRun, index: int, *, channels: int = 4, steps: Sequence[int] | None = None,
                   params: Mapping[str, Any] | None = None) -> PipelineTrace:
    """Trace IS-CAM on manifest row ``index``: the activation maps of the ``channels`` highest-weighted
    channels, their masked inputs at the integration ``steps`` and the class score at every step.

    The per-step scores are recomputed here from the same formula; their mean is checked against
    :meth:`iscam.methods.ISCAM.channel_weights` (the weights the map uses), so the figure shows what the
    method computes, not an illustration.
    """
    from .layers import resolve_layer
    from .methods import ISCAM, iscam_coefficients, minmax_normalize, upsample

    loaded = _loaded_model(run)
    device = _device(run)
    sample = _dataset(run, loaded.preprocess)[int(index)]
    x = sample.image[None].to(device)
    model = loaded.model
    layer = run.config.model.target_layer or loaded.target_layer
    settings = dict(params if params is not None else run.method_params("iscam"))
    N = int(settings.get("N", 10))
    schedule = str(settings.get("schedule", "authors"))
    captured: list[torch.Tensor] = []
    handle = resolve_layer(model, layer).register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            probabilities = torch.softmax(model(x).float(), 1)[0]
    finally:
        handle.remove()
    target = int(probabilities.argmax())
    with ISCAM(model, layer, **settings) as cam:
        weights = cam.channel_weights(x, target)[0].float().cpu()
        saliency = cam(x, target)[0].float().cpu()
        forwards = cam.forward_count
    order = torch.argsort(weights, descending=True)[:channels].tolist()
    activation = captured[-1][0, order].float()
    masks = minmax_normalize(upsample(activation[None], tuple(x.shape[-2:])))[0]  # [C, H, W]
    coefficients = iscam_coefficients(N, schedule)
    scale = torch.tensor(coefficients, device=device, dtype=x.dtype)
    with torch.no_grad():
        inputs = (x * masks[:, None])[:, None] * scale.view(1, -1, 1, 1, 1)  # [C, N, 3, H, W]
        logits = model(inputs.flatten(0, 1)).float()
        step_scores = torch.softmax(logits, 1)[:, target].view(len(order), N).cpu()
    expected = weights[order]
    if not torch.allclose(step_scores.mean(1), expected, rtol=1e-3, atol=1e-5):
        raise AssertionError(f"pipeline trace disagrees with ISCAM.channel_weights: {step_scores.mean(1)} vs {expected}")
    shown = list(steps) if steps is not None else sorted({1, max(1, (N + 1) // 2), N})
    masked = inputs[:, [s - 1 for s in shown]].cpu()
    display = loaded.preprocess.denormalize(masked)  # broadcasts over [C, S, 3, H, W]
    return PipelineTrace(
        image=loaded.preprocess.denormalize(sample.image).clamp(0, 1), category=loaded.categories[target],
        probability=float(probabilities[target]), N=N, schedule=schedule, coefficients=coefficients,
        channels=order, upsampled=masks.cpu(), steps=shown, masked=display, step_scores=step_scores,
        weights=weights, saliency=saliency, forwards=forwards,
    )


def pipeline_figure(trace: PipelineTrace) -> Any:
    """Fig. 1 drawn from a :class:`PipelineTrace`: input; per channel its upsampled map, the masked inputs
    at the shown steps (with the class score) and the averaged weight; the weight distribution; the map."""
    import matplotlib.pyplot as plt

    from .plots import overlay

    rows = len(trace.channels)
    columns = 2 + len(trace.steps) + 1
    figure = plt.figure(figsize=(2.0 * (columns + 1), 2.0 * rows + 0.6), constrained_layout=True)
    grid = figure.add_gridspec(rows, columns + 1)
    axis = figure.add_subplot(grid[: rows // 2 or 1, 0])
    axis.imshow(trace.image.permute(1, 2, 0).numpy())
    axis.set_title(f"input X\n{trace.category} ({trace.probability:.2f})", fontsize=9)
    axis.axis("off")
    for r, channel in enumerate(trace.channels):
        axis = figure.add_subplot(grid[r, 1])
        axis.imshow(trace.upsampled[r].numpy(), cmap="viridis", vmin=0, vmax=1)
        axis.set_title(f"$s(U_{{{channel}}})$", fontsize=9)
        axis.axis("off")
        for s, step in enumerate(trace.steps):
            axis = figure.add_subplot(grid[r, 2 + s])
            axis.imshow(trace.masked[r, s].permute(1, 2, 0).numpy())
            score = float(trace.step_scores[r, step - 1])
            axis.set_title(f"i={step}, a={trace.coefficients[step - 1]:.2f}\np_c={score:.3f}", fontsize=8)
            axis.axis("off")
        axis = figure.add_subplot(grid[r, 2 + len(trace.steps)])
        axis.plot(range(1, trace.N + 1), trace.step_scores[r].numpy(), marker="o", markersize=3)
        mean = float(trace.step_scores[r].mean())
        axis.axhline(mean, color="C3", linewidth=1)
        axis.set_title(f"$\\alpha_{{{channel}}}$ = mean = {mean:.3f}", fontsize=9)
        axis.set_xlabel("step i", fontsize=8)
        axis.tick_params(labelsize=7)
    axis = figure.add_subplot(grid[rows // 2:, columns] if rows > 1 else grid[0, columns])
    axis.imshow(overlay(trace.image, trace.saliency))
    axis.set_title("IS-CAM map\n" + r"minmax(ReLU($\sum_k \alpha_k U_k$))", fontsize=9)
    axis.axis("off")
    axis = figure.add_subplot(grid[: max(1, rows // 2), columns])
    axis.hist(trace.weights.numpy(), bins=30, color="0.5")
    axis.set_title(f"$\\alpha_k$ of all {trace.weights.numel()} channels", fontsize=9)
    axis.tick_params(labelsize=7)
    figure.suptitle(f"IS-CAM, N = {trace.N}, schedule '{trace.schedule}': {trace.forwards} forward passes",
                    fontsize=11)
    plt.close(figure)
    return figure


# --------------------------------------------------------------------------------------------------
# The effect of N, protocol sensitivity, cost
# --------------------------------------------------------------------------------------------------

def n_sweep(run: BookRun, values: Sequence[int], *, method: str = "iscam", progress: bool = True) -> pd.DataFrame:
    """Every metric of ``method`` for each ``N`` in ``values`` (runner resumed for missing rows): a long
    frame as :mod:`iscam.tables` returns, plus a column ``N``."""
    base = run.method_params(method)
    parts = []
    for value in values:
        config = run.variant(methods=[(method, {**base, "N": int(value)})])
        run.ensure(config, progress=progress)
        frame = run.frame(config, curves=False)
        for table in (tables.table_i(frame), tables.table_ii(frame), tables.table_iii(frame)):
            parts.append(table.assign(N=int(value)))
    return pd.concat(parts, ignore_index=True)


def map_similarity(run: BookRun, values: Sequence[int], *, reference: int, indices: Sequence[int],
                   method: str = "iscam") -> pd.DataFrame:
    """How much the maps of ``method`` change with ``N``: for each value, the mean over the images
    ``indices`` of the Pearson correlation with the map at ``N = reference`` and of the mean absolute
    difference (maps in [0, 1]). Columns: N, correlation, mean_abs_diff, images."""
    base = run.method_params(method)
    grid = sorted(set(int(v) for v in values) | {int(reference)})
    maps = explain_images(run, indices, [(method, {**base, "N": value}) for value in grid], keys="N").maps
    ref = maps[f"N={int(reference)}"].flatten(1).double()
    rows = []
    for value in grid:
        other = maps[f"N={value}"].flatten(1).double()
        a = ref - ref.mean(1, keepdim=True)
        b = other - other.mean(1, keepdim=True)
        denominator = a.norm(dim=1) * b.norm(dim=1)
        correlation = torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp_min(1e-300),
                                  torch.ones_like(denominator))
        rows.append({"N": value, "correlation": float(correlation.mean()),
                     "mean_abs_diff": float((other - ref).abs().mean()), "images": len(indices)})
    return pd.DataFrame(rows)


def sensitivity_table(run: BookRun, variants: Mapping[str, Mapping[str, Any]], *,
                      progress: bool = True) -> pd.DataFrame:
    """The tables under protocol variants: ``variants`` maps a label to ``--set`` overrides (``{}`` is the
    run's own protocol). Returns a long frame (model, method, metric, ours, low, high, n) with a ``variant``
    column and ``change`` = ours - the first variant's value."""
    parts = []
    for label, changes in variants.items():
        config = run.variant(dict(changes))
        run.ensure(config, progress=progress)
        frame = run.frame(config, curves=False)
        for table in (tables.table_i(frame), tables.table_ii(frame), tables.table_iii(frame)):
            parts.append(table.assign(variant=label))
    long = pd.concat(parts, ignore_index=True)
    first = next(iter(variants))
    base = long[long["variant"] == first].set_index(["model", "method", "metric"])["ours"]
    keys = list(zip(long["model"], long["method"], long["metric"]))
    long["change"] = [ours - base.get(key, float("nan")) for ours, key in zip(long["ours"], keys)]
    return long


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds per image and forward passes per image of each method (means over the stored rows), with
    the ratio to Score-CAM. Columns: model, method, seconds_per_image, forwards_per_image, images,
    relative_seconds, relative_forwards."""
    names = _method_names()
    rows = []
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        rows.append({"model": model, "method": method, "name": names.get(method, method),
                     "seconds_per_image": float(group["method_seconds"].mean()),
                     "forwards_per_image": float(group["forward_count"].mean()), "images": len(group)})
    table = pd.DataFrame(rows)
    table = table.iloc[sorted(range(len(table)), key=lambda i: (table["model"].iloc[i],
                                                                _method_order(table["method"].iloc[i])))]
    for column in ("seconds", "forwards"):
        reference = table[table["method"] == "scorecam"].set_index("model")[f"{column}_per_image"]
        table[f"relative_{column}"] = [value / reference.get(model, float("nan"))
                                       for value, model in zip(table[f"{column}_per_image"], table["model"])]
    return table.reset_index(drop=True)


def bar_figure(table: pd.DataFrame, value: str, *, by: str = "name", hue: str | None = None,
               title: str = "", log: bool = False, errors: tuple[str, str] | None = None) -> Any:
    """A horizontal bar chart of ``table[value]`` per ``by`` (optionally grouped by ``hue``), with error
    bars from the columns ``errors = (low, high)``."""
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(table[by]))
    groups = list(dict.fromkeys(table[hue])) if hue else [None]
    height = 0.8 / len(groups)
    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(labels) * max(1, len(groups) * 0.6) + 1.2),
                                constrained_layout=True)
    for g, group in enumerate(groups):
        part = table if group is None else table[table[hue] == group]
        part = part.set_index(by).reindex(labels)
        positions = np.arange(len(labels)) + g * height - 0.4 + height / 2
        xerr = None
        if errors:
            low, high = part[errors[0]].to_numpy(), part[errors[1]].to_numpy()
            xerr = np.vstack([part[value].to_numpy() - low, high - part[value].to_numpy()])
        axis.barh(positions, part[value].to_numpy(), height=height, xerr=xerr, capsize=2,
                  label=None if group is None else str(group))
    axis.set_yticks(np.arange(len(labels)), labels)
    axis.invert_yaxis()
    if log:
        axis.set_xscale("log")
    axis.set_xlabel(value.replace("_", " "))
    axis.set_title(title)
    axis.grid(axis="x", alpha=0.3)
    if hue:
        axis.legend(fontsize=8)
    plt.close(figure)
    return figure



# --------------------------------------------------------------------------------------------------
# Provenance appendix
# --------------------------------------------------------------------------------------------------

def provenance_table(runs: Sequence[BookRun]) -> pd.DataFrame:
    """One column per run: config, versions, commit, device and run times from the store's ``run.json``
    and ``runs.jsonl`` (every runner invocation that wrote to the store)."""
    columns = {}
    for run in runs:
        latest = run.store.provenance() or {}
        history_file = run.store.folder / "runs.jsonl"
        history = [line for line in history_file.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if history_file.is_file() else []
        versions = latest.get("versions", {})
        seconds = latest.get("seconds_per_image", {})
        columns[run.profile] = {
            "config": run.config.name,
            "description": run.config.description,
            "model / layer": f"{run.config.model.name} / {run.config.model.target_layer or 'default'}",
            "weights": weights_text(run.config),
            "images": str(latest.get("num_images", run.config.data.num_images)),
            "manifest": str(latest.get("manifest", run.config.data.manifest)),
            "methods": _methods_text(run.config),
            "metrics": str(latest.get("metrics_key", run.config.metrics.key)),
            "git commit": str(latest.get("git_commit")),
            "device": f"{latest.get('device')} (world size {latest.get('world_size', 1)})",
            "host / platform": f"{latest.get('host')} / {latest.get('platform')}",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "runner invocations": str(len(history)),
            "last run": f"{latest.get('started')} → {latest.get('finished')}",
            "rows in store": str(len(run.store.keys())),
            "seconds per image (last run)": "; ".join(f"{k}: {v:.3f}" for k, v in seconds.items()) or "–",
        }
    return pd.DataFrame(columns)


def notebook_times(executed: str | Path) -> pd.DataFrame:
    """Run time of each executed chapter notebook (papermill's metadata): columns notebook, profile,
    parameters, seconds, started."""
    import json

    rows = []
    for path in sorted(Path(executed).glob("[0-9][0-9]-*.ipynb")):
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
        parameters = meta.get("parameters", {})
        duration = meta.get("duration")
        if duration is None:  # the notebook being executed right now (this appendix)
            continue
        rows.append({"notebook": path.stem, "profile": parameters.get("profile", ""),
                     "parameters": ", ".join(f"{k}={v}" for k, v in parameters.items()
                                             if k not in ("profile", "results", "executed") and v is not None),
                     "seconds": float(duration), "started": meta.get("start_time", "")})
    return pd.DataFrame(rows, columns=["notebook", "profile", "parameters", "seconds", "started"])
