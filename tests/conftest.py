"""Shared fixtures: the data root (../shared/assets beside the repository), tiny seeded models and the
offline pretrained SqueezeNets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from iscam import models

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO.parent / "shared" / "assets"

# Tests and CI read the shared assets unless the caller points ISCAM_DATA elsewhere.
if not os.environ.get("ISCAM_DATA") and DEFAULT_ASSETS.is_dir():
    os.environ["ISCAM_DATA"] = str(DEFAULT_ASSETS)
# Converted models are cached per test session, never in the user's home.
os.environ.setdefault("ISCAM_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def assets() -> Path:
    root = Path(os.environ.get("ISCAM_DATA", DEFAULT_ASSETS))
    if not (root / "models").is_dir():
        pytest.fail(f"shared assets not found at {root}: set ISCAM_DATA to the folder holding models/")
    return root


class TinyCNN(nn.Module):
    """Two conv blocks, GAP and a linear head: small enough for exhaustive float64 reference loops."""

    def __init__(self, channels: int = 6, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


class DeadCNN(nn.Module):
    """A conv layer whose ReLU output is zero everywhere (weights 0, bias -1): every map must stay zero."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small forwards run far faster on one thread than on contended cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def glue_values(notebook: Path) -> dict[str, str]:
    """``key -> text/plain`` of every value a notebook glued (``myst_nb.glue``)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    values: dict[str, str] = {}
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("scrapbook", {})
            mime = record.get("mime_prefix", "") + "text/plain"
            if "name" in record and mime in output.get("data", {}):
                values[record["name"]] = "".join(output["data"][mime])
    return values


# ---------------------------------------------------------------------------- offline pretrained models
def data_files(assets: Path, model: str, weights: str) -> list[Path]:
    """The data-root files of ``models.load(model, weights)``; skips the test, naming the missing files."""
    wanted = [assets / "models" / f.file for f in models.MODELS[model].weights[weights].files]
    missing = [str(path) for path in wanted if not path.is_file()]
    if missing:
        pytest.skip(f"the data root lacks {', '.join(missing)} (data_scripts/fetch_assets.py fetches them)")
    return wanted


@pytest.fixture(scope="session")
def squeezenet1_0_deepcompression(assets: Path) -> models.LoadedModel:
    """SqueezeNet 1.0 with the Deep Compression weights (shared: copy it before changing it)."""
    data_files(assets, "squeezenet1_0", "deepcompression")
    return models.load("squeezenet1_0", "deepcompression")


@pytest.fixture(scope="session")
def squeezenet1_1_ncnn(assets: Path) -> models.LoadedModel:
    """SqueezeNet 1.1 with torchvision's weights from the ncnn copy (shared: copy it before changing it)."""
    data_files(assets, "squeezenet1_1", "ncnn")
    return models.load("squeezenet1_1", "ncnn")
