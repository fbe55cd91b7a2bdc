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

from typing import Any

from torch import nn

from iscam.methods.base import CAM, default_target_layer, minmax_normalize, upsample
from iscam.methods.baseline import RandomCAM
from iscam.methods.gradient import GradCAM, GradCAMpp, SmoothGradCAMpp
from iscam.methods.score import ISCAM, SSCAM, ScoreCAM, iscam_coefficients

__all__ = [
    "CAM",
    "ISCAM",
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


def get(name: str, model: nn.Module, target_layer: str | nn.Module | None = None, **kwargs: Any) -> CAM:
    """Create the method registered as ``name`` (``METHODS``) on ``model`` at ``target_layer``.

    ``target_layer=None`` uses the paper's layer for VGG-16, ResNet-18, SqueezeNet 1.0 and MobileNetV2 (an
    error otherwise); ``"random"`` needs no layer. ``kwargs`` go to the class (e.g. ``N=10``, ``batch_size``).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name](model, target_layer, **kwargs)
