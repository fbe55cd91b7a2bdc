"""The model registry (:data:`MODELS`, one entry per name) and :func:`load`.

``load(name, weights)`` returns a :class:`LoadedModel`: the model in eval mode, its
:class:`~iscam.data.Preprocess`, its default Grad-CAM target layer and the 1000 ImageNet class names in
torchvision order. Every fact about a model -- display label, input size, target layer, whether the paper
used it, its weight options with their exact labels and data-root files -- lives in :data:`MODELS`; the
rest of the project (:data:`iscam.layers.DEFAULT_TARGET_LAYERS`, tables, banners) reads it from there.

=======================  =====  ==============  ==========================================================
name                     input  default target  weights options
=======================  =====  ==============  ==========================================================
vgg16                    224    features.29     ``default``: torchvision ``IMAGENET1K_V1`` (download)
resnet18                 224    layer4          ``default``: torchvision ``IMAGENET1K_V1`` (download)
squeezenet1_0            224    features.12     ``default``: torchvision ``IMAGENET1K_V1`` (download);
                                                ``deepcompression``: DeepScale's Caffe weights, pruned and
                                                codebook-quantised (offline, :mod:`iscam.deepcompression`)
squeezenet1_1            224    features.12     ``default``: torchvision ``IMAGENET1K_V1`` (download);
                                                ``ncnn``: the same weights, float16 (offline,
                                                :mod:`iscam.ncnn`)
mobilenet_v2_coral       224    features.18     ``default``: Coral's int8 TFLite file (offline,
                                                :mod:`iscam.tflite`)
mobilenet_v1_coral_tiny  128    features.13     ``default``: Coral's int8 TFLite file (offline)
=======================  =====  ==============  ==========================================================

torchvision weights are downloaded to the torch hub cache on first use (the paper-era ``IMAGENET1K_V1``, also
torchvision's ``DEFAULT`` for these). Offline weights are files under ``<data root>/models/``, verified by
SHA-256 and converted once (cached). All models take torchvision's ImageNet normalisation except the Coral
ones, which take the TFLite input normalisation ``x = q / 128 - 1`` (mean = std = 128/255). The Deep
Compression SqueezeNet was trained by Caffe at 227x227; it is used at the registry's 224 like the paper's
other CNNs (72.3 % top-1 on the 300 sample images at 224, 74.3 % at 227), and keeps Caffe's padded final
convolution (see :mod:`iscam.deepcompression`).
"""

from __future__ import annotations

import os
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_weights

from iscam import paths
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from iscam.deepcompression import load_deepcompression
from iscam.ncnn import load_ncnn
from iscam.tflite import load_tflite

__all__ = [
    "CORAL_MODELS",
    "MODELS",
    "MODEL_NAMES",
    "PAPER_MODELS",
    "RANDOM_WEIGHTS_LABEL",
    "DataFile",
    "LoadedModel",
    "ModelInfo",
    "WeightsSource",
    "WeightsUnavailableError",
    "imagenet_categories",
    "default_target_layer",
    "load",
    "model_label",
    "preprocess_for",
    "weights_label",
    "weights_source",
]

class WeightsUnavailableError(FileNotFoundError):
    """A model's weights could not be fetched (no network for torchvision's download); the message says
    which file to download and how to pass it (``--weights FILE``)."""


#: What :func:`weights_label` says for ``weights=None``.
RANDOM_WEIGHTS_LABEL = "none (random initialisation)"


@dataclass(frozen=True)
class DataFile:
    """A file under ``<data root>/models/`` and its SHA-256 (as listed in the data root's README)."""

    file: str
    sha256: str


@dataclass(frozen=True)
class WeightsSource:
    """One ``weights=`` option of a model: its exact human label, how it is read, and the files it needs.

    ``reader``: ``"torchvision"`` (torchvision's ``IMAGENET1K_V1``, downloaded), ``"tflite"``
    (:func:`iscam.tflite.load_tflite`), ``"ncnn"`` (:func:`iscam.ncnn.load_ncnn`) or ``"deepcompression"``
    (:func:`iscam.deepcompression.load_deepcompression`); ``files`` are in the reader's argument order.
    """

    label: str
    reader: str
    files: tuple[DataFile, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """Everything the project states about one model name (see the module docstring's table)."""

    name: str  #: the name :func:`load` takes
    label: str  #: display name in tables and banners
    input_size: int  #: square input side in pixels
    target_layer: str  #: default CAM layer (dotted ``named_modules`` name)
    in_paper: bool  #: one of the paper's three CNNs
    weights: dict[str, WeightsSource] = field(hash=False)  #: ``weights=`` option -> source; "default" first
    #: the paper's column its tables are compared with (None: the VGG-16 column, the paper's main CNN)
    paper_column: str | None = None

    @property
    def torchvision_architecture(self) -> bool:
        """The module is torchvision's own (so ``weights=None`` / a state_dict path build it directly)."""
        return self.weights["default"].reader == "torchvision"


_TORCHVISION = WeightsSource("torchvision IMAGENET1K_V1", "torchvision")

MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("vgg16", "VGG-16", 224, "features.29", True, {"default": _TORCHVISION}, "vgg16"),
        ModelInfo("resnet18", "ResNet-18", 224, "layer4", True, {"default": _TORCHVISION}, "resnet18"),
        ModelInfo(
            "squeezenet1_0",
            "SqueezeNet1.0",
            224,
            "features.12",
            True,
            {
                "default": _TORCHVISION,
                "deepcompression": WeightsSource(
                    "SqueezeNet 1.0, Deep Compression Caffe weights (pruned + 8-bit codebook), "
                    "not torchvision's",
                    "deepcompression",
                    (
                        DataFile(
                            "compressed_SqueezeNet_v1.0.net",
                            "e4ab6960ae8cd81505e1c2136921201507e930966c53deaf15862a395b3a3261",
                        ),
                        DataFile(
                            "SqueezeNet_v1.0_deploy.prototxt",
                            "3bcb0e792e2b50ddeb955b178ba6742e28d8950956915348eba355652040674c",
                        ),
                    ),
                ),
            },
            "squeezenet1_0",  # paper_column
        ),
        ModelInfo(
            "squeezenet1_1",
            "SqueezeNet1.1",
            224,
            "features.12",
            False,
            {
                "default": _TORCHVISION,
                "ncnn": WeightsSource(
                    "SqueezeNet 1.1, torchvision IMAGENET1K_V1 weights as a float16 ncnn copy (offline)",
                    "ncnn",
                    (
                        DataFile(
                            "squeezenet_v1.1.ncnn.param",
                            "7dfb3045edf49f199ccc03dfc262956c6b9f38089b14d32a273aa8463c49c46b",
                        ),
                        DataFile(
                            "squeezenet_v1.1.ncnn.bin",
                            "3de9f2f9dbbbc4468fe452d9033300633b60748073a9509a7ea882caec57e544",
                        ),
                    ),
                ),
            },
            "squeezenet1_0",  # paper_column: the same family; the paper reports SqueezeNet1.0 only
        ),
        ModelInfo(
            "mobilenet_v2_coral",
            "Coral MobileNetV2 (int8)",
            224,
            "features.18",  # the last 1x1 conv block (1280 channels, 7x7)
            False,
            {
                "default": WeightsSource(
                    "Coral mobilenet_v2_1.0_224_quant.tflite, converted to PyTorch",
                    "tflite",
                    (
                        DataFile(
                            "mobilenet_v2_1.0_224_quant.tflite",
                            "7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
                        ),
                    ),
                )
            },
        ),
        ModelInfo(
            "mobilenet_v1_coral_tiny",
            "Coral MobileNetV1 0.25 (int8, 128 px)",
            128,
            "features.13",  # the last depthwise-separable block (256 channels, 4x4)
            False,
            {
                "default": WeightsSource(
                    "Coral mobilenet_v1_0.25_128_quant.tflite, converted to PyTorch",
                    "tflite",
                    (
                        DataFile(
                            "mobilenet_v1_0.25_128_quant.tflite",
                            "cb273c23ee76374b05b9583177e28aa19744858a7679c56a250e83d0333da785",
                        ),
                    ),
                )
            },
        ),
    )
}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
#: The CNNs the paper used (torchvision names).
PAPER_MODELS: tuple[str, ...] = tuple(name for name, info in MODELS.items() if info.in_paper)
#: The Coral TFLite file of each Coral model (``.file``, ``.sha256``).
CORAL_MODELS: dict[str, DataFile] = {
    name: info.weights["default"].files[0]
    for name, info in MODELS.items()
    if info.weights["default"].reader == "tflite"
}


class LoadedModel(NamedTuple):
    model: nn.Module  #: in eval mode on the requested device
    preprocess: Preprocess
    target_layer: str  #: dotted name of the default CAM layer
    categories: list[str]  #: 1000 ImageNet class names, torchvision order


def _info(name: str) -> ModelInfo:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[name]


def _options(info: ModelInfo) -> str:
    return ", ".join(repr(option) for option in info.weights) + ", None or a file path"


def weights_label(name: str, weights: Any) -> str:
    """The exact human label of ``load(name, weights)``'s weights, for banners and tables.

    ``None`` -> :data:`RANDOM_WEIGHTS_LABEL`; an option (``"default"``, ``"deepcompression"``, ...) -> its
    :attr:`WeightsSource.label`; a torchvision weights enum -> ``torchvision <enum>``; a path -> the path.
    """
    info = _info(name)
    if weights is None:
        return RANDOM_WEIGHTS_LABEL
    if isinstance(weights, torchvision.models.WeightsEnum):
        return f"torchvision {type(weights).__name__}.{weights.name}"
    if isinstance(weights, str) and weights in info.weights:
        return info.weights[weights].label
    if isinstance(weights, (str, os.PathLike)):
        return os.fspath(weights)
    raise TypeError(f"weights for {name} must be {_options(info)}, got {weights!r}")


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


def _weights_path(info: ModelInfo, weights: str | os.PathLike[str]) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (weights= for {info.name} takes {_options(info)})"
        )
    return path


def _data_files(info: ModelInfo, option: str, data_root: str | os.PathLike[str] | None) -> list[Path]:
    """The option's files under the data root; an error naming the expected path when one is missing."""
    files = info.weights[option].files
    needed = " + ".join(f"models/{f.file}" for f in files)
    try:
        root = paths.data_root(data_root)
    except paths.DataRootError as exc:
        raise paths.DataRootError(f"{info.name} needs {needed} under a data root: {exc}") from exc
    found = []
    for data_file in files:
        path = root / "models" / data_file.file
        if not path.is_file():
            raise FileNotFoundError(
                f"{info.name} (weights={option!r}): expected {path} (data root {root} + "
                f"models/{data_file.file}); run data_scripts/fetch_assets.py --data-root to put it there"
            )
        found.append(path)
    return found


def _read_offline(source: WeightsSource, files: list[Path]) -> nn.Module:
    hashes = [data_file.sha256 for data_file in source.files]
    if source.reader == "tflite":
        return load_tflite(files[0], expected_sha256=hashes[0])
    if source.reader == "ncnn":
        return load_ncnn(files[0], files[1], expected_sha256=(hashes[0], hashes[1]))
    if source.reader == "deepcompression":
        return load_deepcompression(files[0], files[1], expected_sha256=(hashes[0], hashes[1]))
    raise ValueError(f"unknown weights reader {source.reader!r}")


def _load_option(info: ModelInfo, option: str, data_root: str | os.PathLike[str] | None) -> nn.Module:
    source = info.weights[option]
    if source.reader == "torchvision":
        enum = get_model_weights(info.name).IMAGENET1K_V1
        try:
            return torchvision.models.get_model(info.name, weights=enum)
        except OSError as error:  # no network (URLError), a full or read-only torch hub cache
            reason = error.reason if isinstance(error, urllib.error.URLError) else (error.strerror or error)
            raise WeightsUnavailableError(
                f"{info.name}: torchvision's {enum} weights cannot be downloaded from {enum.url} ({reason}); "
                f"download that file elsewhere and pass it with --weights FILE (weights=FILE), or put it in "
                f"the torch hub cache ({torch.hub.get_dir()}/checkpoints)"
            ) from None
    return _read_offline(source, _data_files(info, option, data_root))


def _random(info: ModelInfo, data_root: str | os.PathLike[str] | None) -> nn.Module:
    if info.torchvision_architecture:
        return torchvision.models.get_model(info.name, weights=None)
    model = _load_option(info, "default", data_root)  # the architecture is read from the file
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):  # torch layers, not our modules
            module.reset_parameters()
    return model


def _load_weights(info: ModelInfo, weights: Any, data_root: str | os.PathLike[str] | None) -> nn.Module:
    if weights is None:
        return _random(info, data_root)
    if isinstance(weights, str) and weights in info.weights:
        return _load_option(info, weights, data_root)
    if isinstance(weights, torchvision.models.WeightsEnum):
        if not info.torchvision_architecture:
            raise TypeError(f"{info.name} is not a torchvision architecture; weights= takes {_options(info)}")
        return torchvision.models.get_model(info.name, weights=weights)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights for {info.name} must be {_options(info)}, got {weights!r}")
    own = _weights_path(info, weights)
    if info.weights["default"].reader == "tflite" and own.suffix == ".tflite":  # the user's own file
        return load_tflite(own)
    model = (
        torchvision.models.get_model(info.name, weights=None)
        if info.torchvision_architecture
        else _load_option(info, "default", data_root)
    )
    model.load_state_dict(_state_dict_from(own))
    return model


def load(
    name: str,
    weights: Any = "default",
    *,
    data_root: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    resize: str = "crop",
    input_size: int | None = None,
) -> LoadedModel:
    """Load a model by name (see :data:`MODELS`) with its preprocessing and default target layer.

    ``weights``: an option of the model (``"default"``: torchvision's ``IMAGENET1K_V1`` or the verified
    Coral file; ``"deepcompression"`` for ``squeezenet1_0``, ``"ncnn"`` for ``squeezenet1_1``: offline
    files under the data root, checked by SHA-256), ``None`` (random initialisation; the Coral architectures
    are still read from their file), a torchvision weights enum, or a path: a ``.pth`` state_dict, or for the
    Coral models also a ``.tflite`` file of your own (converted without the SHA-256 check). ``resize``:
    ``"crop"`` (Resize + CenterCrop, the authors' code) or ``"stretch"`` (plain resize, the paper's text);
    ``input_size``: the square input side (default: the registry's, 224 or 128).
    """
    info = _info(name)
    size = info.input_size if input_size is None else int(input_size)
    preprocess = Preprocess(size, resize, IMAGENET_MEAN, IMAGENET_STD)  # validates resize first
    model = _load_weights(info, weights, data_root)
    if info.weights["default"].reader == "tflite":
        preprocess = Preprocess(size, resize, model.input_mean, model.input_std)
    if info.target_layer not in dict(model.named_modules()):  # the registry and an architecture drifted apart
        raise RuntimeError(f"{name}: registered target layer {info.target_layer!r} is not in the model")
    # lets the methods find the layer from the model alone (methods.get(name, model) with no layer)
    model.default_target_layer = info.target_layer
    return LoadedModel(model.to(device).eval(), preprocess, info.target_layer, imagenet_categories())


def model_label(name: str) -> str:
    """The display name of model ``name`` (the name itself for a model the registry does not know)."""
    return MODELS[name].label if name in MODELS else name


def default_target_layer(name: str) -> str:
    """The layer the methods explain by default for model ``name`` (without loading it)."""
    return _info(name).target_layer


def preprocess_for(name: str, resize: str = "crop", input_size: int | None = None) -> Preprocess:
    """The preprocessing of ``load(name, "default")`` without loading the model (the Coral files' input
    quantisation is x = q/128 - 1, i.e. mean = std = 128/255, checked when the file is converted)."""
    info = _info(name)
    size = info.input_size if input_size is None else int(input_size)
    if info.weights["default"].reader == "tflite":
        half = 128.0 / 255.0
        return Preprocess(size, resize, (half,) * 3, (half,) * 3)
    return Preprocess(size, resize, IMAGENET_MEAN, IMAGENET_STD)


def weights_source(name: str, weights: Any, *, data_root: str | os.PathLike[str] | None = None) -> Path | str:
    """Where ``load(name, weights)`` takes its weights from, without loading them: a file to hash (a path of
    your own), or an identifier that already is a hash (torchvision's download name carries the first digits
    of its SHA-256; the offline files are verified against the registry's SHA-256)."""
    info = _info(name)
    if isinstance(weights, torchvision.models.WeightsEnum):
        return "torchvision:" + Path(weights.url).name
    if isinstance(weights, str) and weights in info.weights:
        source = info.weights[weights]
        if source.reader == "torchvision":
            return "torchvision:" + Path(get_model_weights(name).IMAGENET1K_V1.url).name
        return "sha256:" + "+".join(f.sha256 for f in source.files)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights for {name} must be {_options(info)}, got {weights!r}")
    return _weights_path(info, weights)
