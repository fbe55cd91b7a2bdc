"""Shared fixtures: the data root (../shared/assets beside the repository) and tiny seeded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

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
