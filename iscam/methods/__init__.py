"""The six CAM methods the IS-CAM paper compares, plus a random baseline, behind one interface.

```python
from iscam import methods
with methods.get("iscam", model, "layer4", N=10) as cam:
    saliency = cam(x)            # x: [B, 3, H, W] normalised -> [B, H, W] float32 in [0, 1]
```

- :mod:`iscam.methods.gradient` -- :class:`GradCAM`, :class:`GradCAMpp`, :class:`SmoothGradCAMpp`
- :mod:`iscam.methods.score` -- :class:`ScoreCAM`, :class:`SSCAM`, :class:`ISCAM` (batched, deduplicated)
- :mod:`iscam.methods.baseline` -- :class:`RandomCAM`
- :mod:`iscam.methods.base` -- the shared :class:`CAM` machinery
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from iscam.methods.base import CAM, default_target_layer, minmax_normalize, upsample
from iscam.methods.baseline import RandomCAM
from iscam.methods.gradient import GradCAM, GradCAMpp, SmoothGradCAMpp
from iscam.methods.score import ISCAM, SSCAM, ISCAMTrace, ScoreCAM, iscam_coefficients

__all__ = [
    "CAM",
    "ISCAM",
    "ISCAMTrace",
    "METHODS",
    "METHOD_NAMES",
    "PAPER_NAMES",
    "SSCAM",
    "GradCAM",
    "GradCAMpp",
    "RandomCAM",
    "ScoreCAM",
    "SmoothGradCAMpp",
    "default_target_layer",
    "get",
    "iscam_coefficients",
    "minmax_normalize",
    "reconstruct",
    "upsample",
]

#: Registry names of the six methods the paper compares, in the paper's table order.
METHOD_NAMES: tuple[str, ...] = ("gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam", "iscam")

#: Every method class by registry name.
METHODS: dict[str, type[CAM]] = {
    cls.name: cls for cls in (GradCAM, GradCAMpp, SmoothGradCAMpp, ScoreCAM, SSCAM, ISCAM, RandomCAM)
}

#: Display names (the paper's six, plus the random baseline row), from the classes.
PAPER_NAMES: dict[str, str] = {name: cls.display_name for name, cls in METHODS.items()}


def reconstruct(name: str, raw: Tensor | None, size: tuple[int, int], params: Mapping[str, Any] | None = None,
                *, seed: int | None = None) -> Tensor:
    """The full-size maps ``[B, H, W]`` of method ``name`` from its stored :meth:`CAM.raw_maps`.

    ``params`` are the method's parameters (e.g. a row's ``params_key`` decoded); the random baseline keeps no
    raw map and is rebuilt from the seed of its row instead (``raw=None``, ``seed=``).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    if raw is None:
        if name != RandomCAM.name or seed is None:
            raise ValueError(f"{name}: a map is rebuilt from its raw map (or, for 'random', from its seed)")
        return RandomCAM.regenerate(seed, size)[None]
    return METHODS[name].finish(raw, size, **dict(params or {})).to(torch.float32)


def get(name: str, model: nn.Module, target_layer: str | nn.Module | None = None, **kwargs: Any) -> CAM:
    """Create the method registered as ``name`` (``METHODS``) on ``model`` at ``target_layer``.

    ``target_layer=None`` uses the paper's layer for VGG-16, ResNet-18, SqueezeNet 1.0 and MobileNetV2 (an
    error otherwise); ``"random"`` needs no layer. ``kwargs`` go to the class (e.g. ``N=10``, ``batch_size``).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](model, target_layer, **kwargs)
