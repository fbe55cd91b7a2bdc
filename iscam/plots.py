"""Low-level image helpers: a saliency map blended over its image, saved as PNG.

Figures (grids, curves, tables) live in :mod:`iscam.figures`; this module only turns tensors into pixels.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .store import atomic_write_bytes

__all__ = ["to_rgb_uint8", "heatmap", "overlay", "save_png"]


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
