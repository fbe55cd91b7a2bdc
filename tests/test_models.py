"""Model registry: every model loads (random torchvision weights), targets resolve, weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from iscam import models
from iscam.cache import sha256_file
from iscam.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from iscam.layers import DEFAULT_TARGET_LAYERS, resolve_layer
from iscam.paths import DataRootError


@pytest.mark.parametrize("name", models.PAPER_MODELS)
def test_paper_models_load_with_random_weights(name: str) -> None:
    torch.manual_seed(0)
    loaded = models.load(name, weights=None)
    model, preprocess, target, categories = loaded  # a NamedTuple unpacks
    assert not model.training
    assert target == {"vgg16": "features.29", "resnet18": "layer4", "squeezenet1_0": "features.12"}[name]
    layer = resolve_layer(model, target)
    assert isinstance(layer, nn.Module)
    assert preprocess.size == 224 and preprocess.resize == "crop" and preprocess.mean == IMAGENET_MEAN
    assert len(categories) == 1000 and categories[:2] == ["tench", "goldfish"]
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64))
    handle.remove()
    assert logits.shape == (1, 1000) and len(seen) == 1


@pytest.mark.parametrize(
    ("name", "size", "target", "channels"),
    [("mobilenet_v2_coral", 224, "features.18", 1280), ("mobilenet_v1_coral_tiny", 128, "features.13", 256)],
)
def test_coral_models_load_with_their_input_size_and_target(
    name: str, size: int, target: str, channels: int
) -> None:
    loaded = models.load(name)
    assert loaded.target_layer == target and loaded.preprocess.size == size
    assert loaded.preprocess.mean == loaded.preprocess.std == pytest.approx((128 / 255,) * 3)
    activations = []
    handle = resolve_layer(loaded.model, target).register_forward_hook(
        lambda _m, _i, out: activations.append(out)
    )
    with torch.no_grad():
        loaded.model(torch.zeros(2, 3, size, size))
    handle.remove()
    assert activations[0].shape == (2, channels, size // 32, size // 32)
    random = models.load(name, weights=None)
    first = next(random.model.parameters())
    assert not torch.equal(first, next(loaded.model.parameters()))  # re-initialised, same architecture
    assert [n for n, _ in random.model.named_modules()] == [n for n, _ in loaded.model.named_modules()]


def test_coral_labels_are_torchvision_order_after_dropping_background(assets: Path) -> None:
    coral = (assets / "models" / "imagenet_labels.txt").read_text().splitlines()
    assert len(coral) == 1001 and coral[0] == "background"
    categories = models.imagenet_categories()
    same = sum(c.split(",")[0].strip() == t for c, t in zip(coral[1:], categories, strict=True))
    assert same >= 998  # only 'crane'/'crane bird' and 'maillot, tank suit'/'maillot tank suit' differ


def test_local_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.load("resnet18", weights=None).model
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = models.load("resnet18", weights=path).model
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        models.load("resnet18", weights=tmp_path / "absent.pth")


def test_bad_names_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown model 'alexnet'.*vgg16.*mobilenet_v1_coral_tiny"):
        models.load("alexnet")
    with pytest.raises(ValueError, match="resize must be"):
        models.load("squeezenet1_0", weights=None, resize="pad")
    stretch = models.load("squeezenet1_0", weights=None, resize="stretch")
    assert isinstance(stretch.preprocess, Preprocess) and stretch.preprocess.resize == "stretch"
    with pytest.raises(DataRootError, match="mobilenet_v2_coral needs models/"):
        models.load("mobilenet_v2_coral", data_root=tmp_path / "nowhere")
    monkeypatch.delenv("ISCAM_DATA")
    with pytest.raises(DataRootError, match="ISCAM_DATA"):
        models.load("mobilenet_v1_coral_tiny")


def test_model_names_and_device() -> None:
    assert models.MODEL_NAMES == (
        "vgg16",
        "resnet18",
        "squeezenet1_0",
        "squeezenet1_1",
        "mobilenet_v2_coral",
        "mobilenet_v1_coral_tiny",
    )
    loaded = models.load("mobilenet_v1_coral_tiny", device=torch.device("cpu"))
    assert next(loaded.model.parameters()).device.type == "cpu"


# --- the registry


def test_registry_is_the_one_source_of_model_facts() -> None:
    assert models.PAPER_MODELS == ("vgg16", "resnet18", "squeezenet1_0")
    assert {
        name: (info.label, info.input_size, info.target_layer) for name, info in models.MODELS.items()
    } == {
        "vgg16": ("VGG-16", 224, "features.29"),
        "resnet18": ("ResNet-18", 224, "layer4"),
        "squeezenet1_0": ("SqueezeNet1.0", 224, "features.12"),
        "squeezenet1_1": ("SqueezeNet1.1", 224, "features.12"),
        "mobilenet_v2_coral": ("Coral MobileNetV2 (int8)", 224, "features.18"),
        "mobilenet_v1_coral_tiny": ("Coral MobileNetV1 0.25 (int8, 128 px)", 128, "features.13"),
    }
    assert {name: list(info.weights) for name, info in models.MODELS.items()} == {
        "vgg16": ["default"],
        "resnet18": ["default"],
        "squeezenet1_0": ["default", "deepcompression"],
        "squeezenet1_1": ["default", "ncnn"],
        "mobilenet_v2_coral": ["default"],
        "mobilenet_v1_coral_tiny": ["default"],
    }
    derived = {name: info.target_layer for name, info in models.MODELS.items()}
    assert DEFAULT_TARGET_LAYERS == {**derived, "mobilenet_v2": "features.18"}
    assert models.CORAL_MODELS["mobilenet_v2_coral"].file == "mobilenet_v2_1.0_224_quant.tflite"


def test_registered_hashes_are_those_of_the_data_root_files(assets: Path) -> None:
    files = [f for info in models.MODELS.values() for source in info.weights.values() for f in source.files]
    assert len(files) == 6
    for data_file in files:
        path = assets / "models" / data_file.file
        if path.is_file():  # every model test loads through these hashes; this names a stale one directly
            assert sha256_file(path) == data_file.sha256, path


def test_weights_labels(tmp_path: Path) -> None:
    assert models.weights_label("squeezenet1_0", "deepcompression") == (
        "SqueezeNet 1.0, Deep Compression Caffe weights (pruned + 8-bit codebook), not torchvision's"
    )
    assert models.weights_label("squeezenet1_0", "default") == "torchvision IMAGENET1K_V1"
    assert models.weights_label("squeezenet1_1", "ncnn").startswith(
        "SqueezeNet 1.1, torchvision IMAGENET1K_V1"
    )
    assert models.weights_label("mobilenet_v2_coral", "default") == (
        "Coral mobilenet_v2_1.0_224_quant.tflite, converted to PyTorch"
    )
    assert models.weights_label("vgg16", None) == "none (random initialisation)"
    assert models.weights_label("resnet18", tmp_path / "w.pth") == str(tmp_path / "w.pth")
    assert models.weights_label("resnet18", "my.pth") == "my.pth"
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert models.weights_label("resnet18", enum) == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        models.weights_label("alexnet", "default")
    with pytest.raises(TypeError, match="weights for vgg16 must be 'default', None or a file path, got 3"):
        models.weights_label("vgg16", 3)


def test_squeezenet1_1_with_random_weights() -> None:
    torch.manual_seed(0)
    loaded = models.load("squeezenet1_1", weights=None)
    assert loaded.target_layer == "features.12" and loaded.preprocess.mean == IMAGENET_MEAN
    assert sum(p.numel() for p in loaded.model.parameters()) == 1_235_496
    assert loaded.model.default_target_layer == "features.12"


def test_offline_squeezenets_load_by_option(
    squeezenet1_0_deepcompression: models.LoadedModel, squeezenet1_1_ncnn: models.LoadedModel
) -> None:
    for loaded, cls in ((squeezenet1_0_deepcompression, "1_0"), (squeezenet1_1_ncnn, "1_1")):
        reference = torchvision.models.get_model(f"squeezenet{cls}", weights=None).state_dict()
        state = loaded.model.state_dict()
        assert list(state) == list(reference)  # torchvision's names, key for key
        assert all(state[k].shape == reference[k].shape for k in state)
        assert not loaded.model.training and loaded.target_layer == "features.12"
        assert loaded.preprocess.size == 224
        assert (loaded.preprocess.mean, loaded.preprocess.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert squeezenet1_0_deepcompression.model.classifier[1].padding == (1, 1)  # Caffe's conv_final
    assert squeezenet1_1_ncnn.model.classifier[1].padding == (0, 0)


def test_unknown_weights_options_and_types() -> None:
    with pytest.raises(FileNotFoundError, match=r"weights= for squeezenet1_1 takes 'default', 'ncnn', None"):
        models.load("squeezenet1_1", "deepcompression")
    with pytest.raises(
        TypeError, match="weights for resnet18 must be 'default', None or a file path, got 1.5"
    ):
        models.load("resnet18", 1.5)
    with pytest.raises(TypeError, match="mobilenet_v2_coral is not a torchvision architecture"):
        models.load("mobilenet_v2_coral", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
