"""Pixels: a saliency map blended over its image, saved as PNG, and the book's figures (Fig. 1's pipeline,
Fig. 2's grid, Fig. 3's mean curves, bar charts), all drawn from stored results -- no model is run here."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .methods import PAPER_NAMES
from .models import model_label
from .store import atomic_write_bytes
from .tables import _method_rank, mean_curves

__all__ = [
    "Explained",
    "PipelineView",
    "bar_figure",
    "curves_figure",
    "heatmap",
    "method_grid",
    "overlay",
    "pipeline_figure",
    "pipeline_view",
    "sanity_figure",
    "save_png",
    "to_rgb_uint8",
]


def to_rgb_uint8(image: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    """An image as ``uint8 [H, W, 3]``.

    Accepts a PIL image, a uint8 array ``[H, W, 3]``, or a float tensor/array in [0, 1] shaped
    ``[3, H, W]`` (torch layout) or ``[H, W, 3]``. Normalised tensors must be denormalised first
    (:meth:`iscam.data.Preprocess.denormalize`).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image must be [3, H, W] or [H, W, 3], got shape {array.shape}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.shape[-1] != 3:
        raise ValueError(f"image must have 3 colour channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.copy()
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("image has NaN or inf values")
    if array.min() < -1e-6 or array.max() > 1 + 1e-6:
        raise ValueError(f"float image values must lie in [0, 1] (denormalise first), got "
                         f"[{array.min():.3f}, {array.max():.3f}]")
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _saliency_array(saliency: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    tensor = torch.as_tensor(saliency).detach().cpu().to(torch.float32)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"saliency must be one map [H, W], got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError("saliency has NaN or inf values")
    if tuple(tensor.shape) != (height, width):
        # Bilinear, align_corners=False: how the CAM methods upsample their maps.
        tensor = F.interpolate(tensor[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return tensor.clamp(0.0, 1.0).numpy()


def heatmap(saliency: torch.Tensor | np.ndarray, *, cmap: str = "jet") -> np.ndarray:
    """A map in [0, 1] ``[H, W]`` coloured with a matplotlib colormap, ``uint8 [H, W, 3]``."""
    from matplotlib import colormaps

    values = _saliency_array(saliency, *np.shape(saliency)[-2:])
    colours = colormaps[cmap](values)[..., :3]
    return np.round(colours * 255.0).astype(np.uint8)


def overlay(image: torch.Tensor | np.ndarray | Image.Image, saliency: torch.Tensor | np.ndarray, *,
            alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``(1 - alpha) * image + alpha * heatmap(saliency)`` as ``uint8 [H, W, 3]``.

    The map (values in [0, 1], clipped) is resized bilinearly to the image if needed; ``alpha`` in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = to_rgb_uint8(image)
    values = _saliency_array(saliency, rgb.shape[0], rgb.shape[1])
    colours = heatmap(values, cmap=cmap).astype(np.float64)
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    return np.round(blended).clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save ``uint8 [H, W, 3]`` (or ``[H, W]``) as a PNG, atomically; returns the path."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"save_png needs a uint8 [H, W], [H, W, 3] or [H, W, 4] array, got "
                         f"{array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# The book's figures
# --------------------------------------------------------------------------------------------------

@dataclass
class Explained:
    """Maps of several methods on a few images (Fig. 2): images ``[B, 3, H, W]`` in [0, 1], titles per image,
    maps per method ``[B, H, W]``."""

    images: torch.Tensor
    files: list[str]
    titles: list[str]
    maps: dict[str, torch.Tensor]


@dataclass
class PipelineView:
    """The tensors of Fig. 1, derived from a stored IS-CAM trace and the stored input image."""

    image: torch.Tensor  # [3, H, W] in [0, 1]
    category: str
    probability: float
    N: int
    schedule: str
    coefficients: list[float]  # a_1..a_N
    channels: list[int]  # the shown channels (largest weights)
    upsampled: torch.Tensor  # [C, H, W] normalised masks s(U_k) of the shown channels
    steps: list[int]  # the steps shown (1-based)
    masked: torch.Tensor  # [C, S, 3, H, W] a_i * X * s(U_k), denormalised for display
    step_scores: torch.Tensor  # [C, N] p_c(a_i * X * s(U_k)) for every step
    weights: torch.Tensor  # [K] alpha_k of every channel
    saliency: torch.Tensor  # [H, W] the IS-CAM map
    forwards: int


def pipeline_view(trace: Mapping[str, Any], image: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                  category: str, steps: Sequence[int] | None = None) -> PipelineView:
    """Fig. 1's panels from a stored trace (:meth:`iscam.book.ProfileRun.trace`) and the stored input image
    ``[3, H, W]`` in [0, 1]: the masks are ``minmax(up(A_k))`` of the stored activation maps, the masked
    inputs ``a_i X * M_k`` in the model's normalised space (denormalised to show), the map ``finish(raw)``."""
    from .methods import ISCAM, minmax_normalize, upsample

    size = (image.shape[-2], image.shape[-1])
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    masks = minmax_normalize(upsample(trace["activation"][None].float(), size))[0]  # [C, H, W]
    N = int(trace["N"])
    shown = list(steps) if steps is not None else sorted({1, max(1, (N + 1) // 2), N})
    coefficients = [float(a) for a in trace["coefficients"]]
    x = (image - mean_t) / std_t
    scales = torch.tensor([coefficients[s - 1] for s in shown]).view(1, -1, 1, 1, 1)
    masked = (x * masks[:, None])[:, None] * scales  # [C, S, 3, H, W]
    display = (masked * std_t + mean_t).clamp(0, 1)
    saliency = ISCAM.finish(trace["raw"][None].float(), size)[0]
    return PipelineView(image=image, category=category, probability=float(trace["probability"]), N=N,
                        schedule=str(trace["schedule"]), coefficients=coefficients,
                        channels=[int(c) for c in trace["channels"]], upsampled=masks, steps=shown,
                        masked=display, step_scores=trace["step_scores"].float(),
                        weights=trace["channel_weights"].float(), saliency=saliency,
                        forwards=int(trace["forwards"]))


def curves_figure(frame: pd.DataFrame, *, model: str | None = None) -> Any:
    """Fig. 3: the mean insertion and deletion curves of each method (legend: mean AUC %).

    ``frame`` is a store frame read with ``curves=True`` and narrowed to one parameter set per method.
    """
    import matplotlib.pyplot as plt

    if model is not None:
        frame = frame[frame["model"] == model]
    names = dict(PAPER_NAMES)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for axis, kind in zip(axes, ("insertion", "deletion")):
        curves = mean_curves(frame, kind)
        aucs = frame.groupby("method")[f"{kind}_auc"].mean()
        for method in sorted(curves["method"].unique(), key=_method_rank):
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




def method_grid(explained: Explained, *, alpha: float = 0.5) -> Any:
    """Fig. 2: one row per image, the input then each method's map over it."""
    import matplotlib.pyplot as plt

    names = dict(PAPER_NAMES)
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




def pipeline_figure(trace: PipelineView) -> Any:
    """Fig. 1 drawn from a :class:`PipelineTrace`: input; per channel its upsampled map, the masked inputs
    at the shown steps (with the class score) and the averaged weight; the weight distribution; the map."""
    import matplotlib.pyplot as plt

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


def sanity_figure(summary: pd.DataFrame, *, mode: str = "cascading", title: str = "") -> Any:
    """The sanity checks' curves (Adebayo et al. 2018, their Fig. 2): for each similarity metric, the mean
    similarity of every method's map to the trained model's map (stage 0 = trained, 1) against the number of
    layers re-initialised, from the logits down (``mode="cascading"``) or one layer at a time
    (``"independent"``); the random baseline, dashed, is the chance level. ``summary``:
    :func:`iscam.sanity.summarise`."""
    import matplotlib.pyplot as plt

    part = summary[summary["mode"] == mode]
    metrics = list(dict.fromkeys(part["metric"]))
    names = dict(PAPER_NAMES)
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False,
                                constrained_layout=True)
    for axis, metric in zip(axes[0], metrics):
        rows = part[part["metric"] == metric]
        for method in sorted(rows["method"].unique(), key=_method_rank):
            line = rows[rows["method"] == method].sort_values("n_randomised")
            x = [0, *line["n_randomised"].tolist()]
            y = [1.0, *line["mean"].tolist()]
            style = {"linestyle": "--", "color": "0.4"} if method == "random" else {"marker": "o", "markersize": 3}
            axis.plot(x, y, label=names.get(method, method), **style)
        axis.set_title(metric.replace("_", " "), fontsize=9)
        axis.set_xlabel("layers randomised" if mode == "cascading" else "stage (one layer randomised)", fontsize=8)
        axis.set_ylim(-1.05, 1.05)
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("similarity to the trained model's map", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(title or f"Sanity checks, {mode} randomisation", fontsize=10)
    plt.close(figure)
    return figure
