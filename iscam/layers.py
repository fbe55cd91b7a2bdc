"""Target layers: the defaults (read from the model registry) and name resolution with helpful errors."""

from __future__ import annotations

from torch import nn

from iscam.models import MODELS

__all__ = ["DEFAULT_TARGET_LAYERS", "LayerNotFoundError", "layer_name", "resolve_layer"]

#: The layer each architecture is explained at (its last convolutional block), as in the authors' code:
#: every registered model's :attr:`iscam.models.ModelInfo.target_layer`, plus torchvision's MobileNetV2
#: (not registered, but recognised by :func:`iscam.methods.default_target_layer` on a user's own model).
DEFAULT_TARGET_LAYERS: dict[str, str] = {name: info.target_layer for name, info in MODELS.items()} | {
    "mobilenet_v2": "features.18"
}


class LayerNotFoundError(KeyError):
    """A target layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """Return the submodule named ``layer`` (dotted path as in ``named_modules``), or ``layer`` itself.

    A wrong name raises :class:`LayerNotFoundError` listing the names that exist, so a typo is fixed at once.
    """
    if isinstance(layer, nn.Module):
        if not any(module is layer for module in model.modules()):
            raise LayerNotFoundError("the target layer module given is not a submodule of the model")
        return layer
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    available = [name for name in modules if name]
    shown = ", ".join(available[-40:])
    more = f" (last 40 of {len(available)})" if len(available) > 40 else ""
    raise LayerNotFoundError(
        f"target layer {layer!r} not found in {type(model).__name__}; available layers{more}: {shown}"
    )


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model``."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise LayerNotFoundError("the target layer module given is not a submodule of the model")
