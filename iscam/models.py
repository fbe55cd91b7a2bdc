"""The paper's CNNs (torchvision) and the offline ImageNet MobileNets converted from Coral's TFLite files.

``load(name)`` returns a :class:`LoadedModel`: the model in eval mode, its :class:`~iscam.data.Preprocess`,
its default Grad-CAM target layer and the 1000 ImageNet class names in torchvision order.

=========================  =====  ==============  ===================================================
name                       input  default target  weights (``"default"``)
=========================  =====  ==============  ===================================================
vgg16                      224    features.29     torchvision ``VGG16_Weights.IMAGENET1K_V1``
resnet18                   224    layer4          torchvision ``ResNet18_Weights.IMAGENET1K_V1``
squeezenet1_0              224    features.12     torchvision ``SqueezeNet1_0_Weights.IMAGENET1K_V1``
mobilenet_v2_coral         224    features.18     data root ``models/mobilenet_v2_1.0_224_quant.tflite``
mobilenet_v1_coral_tiny    128    features.13     data root ``models/mobilenet_v1_0.25_128_quant.tflite``
=========================  =====  ==============  ===================================================

torchvision weights are downloaded to the torch hub cache on first use (the paper-era ``IMAGENET1K_V1``, which
is also torchvision's ``DEFAULT`` for these three). The Coral models are converted once by
:mod:`iscam.tflite` (cached by SHA-256) and take the TFLite input normalisation ``x = q / 128 - 1``
(mean = std = 128/255); their targets are the last 1x1 conv block (1280 channels, 7x7) for V2 and the last
depthwise-separable block (256 channels, 4x4) for V1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_weights

from iscam import paths
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from iscam.layers import DEFAULT_TARGET_LAYERS, resolve_layer
from iscam.tflite import load_tflite

__all__ = [
    "CORAL_MODELS",
    "MODEL_NAMES",
    "PAPER_MODELS",
    "CoralModel",
    "LoadedModel",
    "imagenet_categories",
    "default_target_layer",
    "load",
    "preprocess_for",
    "weights_source",
]

PAPER_MODELS: tuple[str, ...] = ("vgg16", "resnet18", "squeezenet1_0")


@dataclass(frozen=True)
class CoralModel:
    """A Coral TFLite classifier found under ``<data root>/models/``."""

    file: str
    sha256: str
    input_size: int


CORAL_MODELS: dict[str, CoralModel] = {
    "mobilenet_v2_coral": CoralModel(
        "mobilenet_v2_1.0_224_quant.tflite",
        "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
        224,
    ),
    "mobilenet_v1_coral_tiny": CoralModel(
        "mobilenet_v1_0.25_128_quant.tflite",
        "cb273c23ee76374b05b9583177e28aa19744858a7679c56a250e83d0333da785",
        128,
    ),
}

MODEL_NAMES: tuple[str, ...] = PAPER_MODELS + tuple(CORAL_MODELS)


class LoadedModel(NamedTuple):
    model: nn.Module  #: in eval mode on the requested device
    preprocess: Preprocess
    target_layer: str  #: dotted name of the default CAM layer
    categories: list[str]  #: 1000 ImageNet class names, torchvision order


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in torchvision order, from torchvision's weight metadata (offline)."""
    return list(get_model_weights("resnet18").IMAGENET1K_V1.meta["categories"])


def _state_dict_from(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return state


def _weights_path(weights: Any) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (weights= takes 'default', None or a file path)"
        )
    return path


def _load_torchvision(name: str, weights: Any) -> nn.Module:
    builder = getattr(torchvision.models, name)
    if weights is None:
        return builder(weights=None)
    if isinstance(weights, str) and weights == "default":
        return builder(weights=get_model_weights(name).IMAGENET1K_V1)
    if isinstance(weights, torchvision.models.WeightsEnum):
        return builder(weights=weights)
    model = builder(weights=None)
    model.load_state_dict(_state_dict_from(_weights_path(weights)))
    return model


def _coral_file(name: str, data_root: str | os.PathLike[str] | None) -> Path:
    spec = CORAL_MODELS[name]
    try:
        root = paths.data_root(data_root)
    except paths.DataRootError as exc:
        raise paths.DataRootError(f"{name} needs models/{spec.file} under a data root: {exc}") from exc
    path = root / "models" / spec.file
    if not path.is_file():
        raise FileNotFoundError(
            f"{name}: expected the TFLite file at {path} (data root {root} + models/{spec.file}); "
            "run data_scripts/fetch_assets.py --data-root to put it there"
        )
    return path


def _load_coral(name: str, weights: Any, data_root: str | os.PathLike[str] | None) -> nn.Module:
    spec = CORAL_MODELS[name]
    if isinstance(weights, (str, os.PathLike)) and not (isinstance(weights, str) and weights == "default"):
        own = _weights_path(weights)
        if own.suffix == ".tflite":  # the user's own file: no hash check
            return load_tflite(own)
        model = load_tflite(_coral_file(name, data_root), expected_sha256=spec.sha256)
        model.load_state_dict(_state_dict_from(own))
        return model
    model = load_tflite(_coral_file(name, data_root), expected_sha256=spec.sha256)
    if weights is None:  # same architecture (read from the file), fresh parameters
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    elif not (isinstance(weights, str) and weights == "default"):
        raise TypeError(f"weights must be 'default', None or a file path, got {weights!r}")
    return model


def load(
    name: str,
    weights: Any = "default",
    *,
    data_root: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    resize: str = "crop",
) -> LoadedModel:
    """Load a model by name (see :data:`MODEL_NAMES`) with its preprocessing and default target layer.

    ``weights``: ``"default"`` (ImageNet weights: torchvision's ``IMAGENET1K_V1``, or the verified Coral file
    under the data root), ``None`` (random initialisation; the Coral architectures are still read from their
    file), a torchvision weights enum, or a path: a ``.pth`` state_dict, or for the Coral models also a
    ``.tflite`` file of your own (converted without the SHA-256 check). ``resize``: ``"crop"`` (Resize +
    CenterCrop, the authors' code) or ``"stretch"`` (plain resize, the paper's text).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name in CORAL_MODELS:
        model = _load_coral(name, weights, data_root)
        preprocess = Preprocess(CORAL_MODELS[name].input_size, resize, model.input_mean, model.input_std)
    else:
        model = _load_torchvision(name, weights)
        preprocess = Preprocess(224, resize, IMAGENET_MEAN, IMAGENET_STD)
    target_layer = DEFAULT_TARGET_LAYERS[name]
    resolve_layer(model, target_layer)  # fails loudly if an architecture and its default ever drift apart
    # lets the methods find the layer from the model alone (methods.get(name, model) with no layer)
    model.default_target_layer = target_layer
    return LoadedModel(model.to(device).eval(), preprocess, target_layer, imagenet_categories())


def weights_source(name: str, weights: Any, *, data_root: str | os.PathLike[str] | None = None) -> Path | str:
    """Where ``load(name, weights)`` takes its weights from, without loading them: a file to hash (a path of
    your own), or an identifier that already is a hash (torchvision's download name carries the first
    digits of its SHA-256; the Coral files are verified against a known SHA-256)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if isinstance(weights, str) and weights == "default":
        if name in CORAL_MODELS:
            return f"sha256:{CORAL_MODELS[name].sha256}"
        return "torchvision:" + Path(get_model_weights(name).IMAGENET1K_V1.url).name
    if isinstance(weights, torchvision.models.WeightsEnum):
        return "torchvision:" + Path(weights.url).name
    return _weights_path(weights)


def default_target_layer(name: str) -> str:
    """The layer the methods explain by default for model ``name`` (without loading it)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return DEFAULT_TARGET_LAYERS[name]


def preprocess_for(name: str, resize: str = "crop") -> Preprocess:
    """The preprocessing of ``load(name, "default")`` without loading the model (the Coral files' input
    quantisation is x = q/128 - 1, i.e. mean = std = 128/255, checked when the file is converted)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if name in CORAL_MODELS:
        half = 128.0 / 255.0
        return Preprocess(CORAL_MODELS[name].input_size, resize, (half,) * 3, (half,) * 3)
    return Preprocess(224, resize, IMAGENET_MEAN, IMAGENET_STD)
