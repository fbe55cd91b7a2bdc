"""Explain one image file: its top-5 classes and one method's map, computed exactly as the runner computes
a row (same preprocessing, target, method construction and per-image seed), as an overlay PNG.

``iscam explain IMAGE --model M --method X --seed S`` is :func:`explain`; for a file of the manifest its map
equals the map the runner stores for that image with config seed ``S`` (the seed of a stochastic map is
:func:`iscam.config.image_seed` of ``(S, method, file name)``), so a figure and a table never disagree.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .store import atomic_write_bytes

__all__ = ["ExplainError", "Explanation", "explain"]


class ExplainError(ValueError):
    """A user's mistake: an image that cannot be read, a parameter the method does not take, ..."""


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` computed: ``top5`` (class, name, probability), the explained ``target``, the map
    ``saliency`` ``[H, W]`` (CPU, the model's input frame), the denormalised ``input`` ``[3, H, W]``, the
    written PNG ``out`` and the ``seed`` of a stochastic map (None for a deterministic one)."""

    top5: list[tuple[int, str, float]]
    target: int
    saliency: torch.Tensor
    input: torch.Tensor
    out: Path
    seed: int | None

    def __getitem__(self, key: str) -> Any:  # the dict interface of earlier versions
        return getattr(self, key)


def _read_image(path: Path) -> Any:
    from .data import UnreadableImageError, load_image

    if path.is_dir():
        raise ExplainError(f"image {str(path)!r} is a folder, not an image file")
    if not path.exists():
        raise ExplainError(f"image {str(path)!r} does not exist")
    try:
        return load_image(path)
    except UnreadableImageError as error:
        raise ExplainError(str(error)) from None


def _check_out(out: Path, option: str, what: str) -> None:
    """Fail, naming the user's path, if ``out`` cannot be written -- before the model is loaded."""
    if out.is_dir():
        raise ExplainError(f"{option} {str(out)!r} is a folder: give the {what} file to write")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ExplainError(f"{option} {str(out)!r}: the folder {str(parent)!r} does not exist")
    if out.exists() and not out.is_file():
        raise ExplainError(f"{option} {str(out)!r} exists and is not a file")
    try:  # the file is written atomically beside its name: probe that folder (os.access says yes to root)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise ExplainError(f"{option} {str(out)!r} cannot be written: {error.strerror or error}") from None


def explain(image: str | os.PathLike[str], *, model: str, method: str, out: str | os.PathLike[str],
            N: int | None = None, params: dict[str, Any] | None = None, target: int | None = None,
            weights: str | None = "default", data_root: str | os.PathLike[str] | None = None,
            device: str = "auto", alpha: float = 0.5, seed: int = 0, target_layer: str | None = None,
            resize: str = "crop", saliency_out: str | os.PathLike[str] | None = None) -> Explanation:
    """Explain one image file with ``method`` on ``model`` and write the overlay PNG to ``out``.

    ``params`` (and ``N``) are the method's parameters, checked before the model is loaded; ``seed`` is the
    config seed of a stochastic method (SS-CAM, Smooth Grad-CAM++, random), ``target`` the class to explain
    (default: the top-1 prediction, as the runner does), ``target_layer`` the layer (default: the model's),
    ``saliency_out`` a ``.npy`` file that also receives the map. Both files are checked to be writable
    before the model is loaded, and written atomically with the umask's mode.
    """
    from . import models as iscam_models
    from .config import ConfigError, check_methods, config_from_dict
    from .plots import overlay, save_png
    from .runner import MethodRunner, resolve_device

    path, out_path = Path(image), Path(out)
    if not 0.0 <= alpha <= 1.0:
        raise ExplainError(f"--alpha must be in [0, 1], got {alpha}")
    kwargs = dict(params or {})
    if N is not None:
        kwargs["N"] = N
    try:
        config = config_from_dict({
            "name": "explain", "model": {"name": model, "weights": weights, "resize": resize,
                                         "target_layer": target_layer},
            "methods": [{"name": method, "params": kwargs}], "seed": seed, "device": device})
        check_methods(config)
    except ConfigError as error:
        raise ExplainError(str(error)) from None
    if model not in iscam_models.MODEL_NAMES:
        raise ExplainError(f"unknown model {model!r}; choose one of {', '.join(iscam_models.MODEL_NAMES)}")
    picture = _read_image(path)
    _check_out(out_path, "--out", "PNG")
    if saliency_out is not None:
        _check_out(Path(saliency_out), "--save-saliency", ".npy")
    torch_device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random weights (weights=None) are drawn as the runner draws them
        loaded = iscam_models.load(model, weights, data_root=data_root, device=str(torch_device), resize=resize)
    x = loaded.preprocess(picture)[None].to(torch_device)
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(x).float(), dim=1)[0]
    top = torch.topk(probabilities, 5)
    top5 = [(int(c), loaded.categories[int(c)], float(p)) for p, c in zip(top.values, top.indices)]
    chosen = int(top.indices[0]) if target is None else int(target)
    if not 0 <= chosen < probabilities.numel():
        raise ExplainError(f"--target must be a class index in [0, {probabilities.numel() - 1}], got {chosen}")
    layer = target_layer or loaded.target_layer
    spec = config.methods[0]
    with MethodRunner(spec, loaded.model, layer, config) as runner:
        raw, _ = runner.maps(x, torch.tensor([chosen], device=torch_device), [path.name])
        saliency = runner.finish(raw, (x.shape[-2], x.shape[-1]))[0].detach().cpu()
        image_seed = runner.seed(path.name)
    shown = loaded.preprocess.denormalize(x[0].cpu()).clamp(0, 1)
    written = save_png(overlay(shown, saliency, alpha=alpha), out_path)
    if saliency_out is not None:
        buffer = io.BytesIO()
        np.save(buffer, saliency.numpy())
        atomic_write_bytes(saliency_out, buffer.getvalue())
    return Explanation(top5, chosen, saliency, shown, Path(written), image_seed)
