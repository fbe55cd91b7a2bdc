"""Model registry: every model loads (random torchvision weights), targets resolve, weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from iscam import models
from iscam.paths import DataRootError
from iscam.data import IMAGENET_MEAN, Preprocess
from iscam.layers import resolve_layer


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
        "mobilenet_v2_coral",
        "mobilenet_v1_coral_tiny",
    )
    loaded = models.load("mobilenet_v1_coral_tiny", device=torch.device("cpu"))
    assert next(loaded.model.parameters()).device.type == "cpu"
