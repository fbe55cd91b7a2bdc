"""Shared fixtures and helpers: the data root, tiny seeded models, the offline SqueezeNets, and the
reference loops the methods are checked against."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iscam import models

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO.parent / "shared" / "assets"

# Tests and CI read the shared assets unless the caller points ISCAM_DATA elsewhere.
if not os.environ.get("ISCAM_DATA") and DEFAULT_ASSETS.is_dir():
    os.environ["ISCAM_DATA"] = str(DEFAULT_ASSETS)
# Converted models are cached per test session, never in the user's home.
os.environ.setdefault("ISCAM_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh virtual environment holding only this checkout's wheel (built here, installed
    without dependencies: a test puts this environment's site-packages on PYTHONPATH for those)."""
    work = tmp_path_factory.mktemp("wheel")
    wheels = work / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("iscam-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                               capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


@pytest.fixture(scope="session")
def assets() -> Path:
    root = Path(os.environ.get("ISCAM_DATA", DEFAULT_ASSETS))
    if not (root / "models").is_dir():
        pytest.fail(f"shared assets not found at {root}: set ISCAM_DATA to the folder holding models/")
    return root.resolve()  # the package resolves links (../shared may be one), so messages name the target


#: The six methods and the random baseline with their cheapest settings (tests of behaviour, not of values).
FAST_KWARGS: dict[str, dict[str, object]] = {
    "gradcam": {},
    "gradcampp": {},
    "smoothgradcampp": {"n_samples": 2},
    "scorecam": {},
    "sscam": {"N": 2},
    "iscam": {"N": 2},
    "random": {},
}


class OnePixelModel(nn.Module):
    """Two classes; logit 0 = gain * x[channel 0, row, col], logit 1 = 0: p_0 = sigmoid(gain * pixel)."""

    def __init__(self, row: int, col: int, gain: float = 3.0) -> None:
        super().__init__()
        self.row, self.col, self.gain = row, col, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.gain * x[:, 0, self.row, self.col]
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


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


# ---------------------------------------------------------------------------- references for the methods
Perturb = Callable[[Tensor, Tensor, int], Iterable[Tensor]]


def score_reference(
    model: nn.Module, layer: nn.Module, x: Tensor, perturb: Perturb, target: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Weights [B, K] and maps [B, H, W] of the Score family, one image, one channel, one input at a time.

    ``perturb(image, mask, k)`` yields the perturbed inputs of channel k; the weight is the mean softmax
    probability of the target over them; constant upsampled maps are skipped; map = minmax(ReLU(sum w U)).
    """
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    activation = captured[0]
    target = logits.argmax(1) if target is None else target
    batch, channels = activation.shape[:2]
    size = x.shape[-2:]
    weights = torch.zeros(batch, channels, dtype=torch.float64)
    maps = []
    for b in range(batch):
        upsampled = []
        for k in range(channels):
            u = F.interpolate(
                activation[b : b + 1, k : k + 1], size=size, mode="bilinear", align_corners=False
            )
            u = u[0, 0]
            upsampled.append(u)
            if u.max() == u.min():
                continue
            mask = (u - u.min()) / (u.max() - u.min())
            with torch.no_grad():  # this channel's perturbed inputs in one small batch
                probs = torch.softmax(model(torch.stack(list(perturb(x[b], mask, k)))), dim=1)[:, target[b]]
            weights[b, k] = probs.sum() / probs.numel()
        saliency = torch.relu(sum(weights[b, k] * upsampled[k] for k in range(channels)))
        if saliency.max() > saliency.min():
            saliency = (saliency - saliency.min()) / (saliency.max() - saliency.min())
        else:
            saliency = torch.zeros_like(saliency)
        maps.append(saliency)
    return weights, torch.stack(maps)


def scorecam_inputs(image: Tensor, mask: Tensor, k: int) -> list[Tensor]:
    return [image * mask]


def iscam_inputs(schedule: str, n: int) -> Perturb:
    def perturb(image: Tensor, mask: Tensor, k: int) -> list[Tensor]:
        if schedule == "authors":  # the authors' cumulative mask, literally
            running, out = torch.zeros_like(image), []
            for i in range(1, n + 1):
                running = running + image * mask * i / n
                out.append(running)
            return out
        if schedule == "paper":  # eq. 6-7: M_0 = 0, score M_i, then M_{i+1} = M_i + X*A*i/N
            running, out = torch.zeros_like(image), []
            for i in range(1, n + 1):
                out.append(running)
                running = running + image * mask * i / n
            return out
        return [image * mask * i / n for i in range(1, n + 1)]

    return perturb


def torchcam_gradcam(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """TorchCAM's Grad-CAM of the top-1 class, upsampled bilinearly to the input and min-max normalised."""
    from torchcam.methods import GradCAM as TorchGradCAM

    with TorchGradCAM(model, layer, input_shape=tuple(x.shape[1:])) as extractor:
        logits = model(x)
        theirs = extractor(logits.argmax(1).tolist(), logits)[0].detach()  # [B, h, w], min-max normalised
    theirs = F.interpolate(theirs[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = theirs.amin(dim=(1, 2), keepdim=True), theirs.amax(dim=(1, 2), keepdim=True)
    return (theirs - low) / (high - low)


def imagenet_xml(wnid: str, width: int, height: int, boxes: list[tuple[int, int, int, int]], extra: str = "") -> str:
    """An ``ILSVRC2012_bbox_val_v3`` XML file (PASCAL VOC, 1-based inclusive boxes) for one image."""
    objects = "".join(
        f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    return (
        f"<annotation><folder>val</folder><filename>x</filename><source><database>ILSVRC_2012</database>"
        f"</source><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objects}{extra}</annotation>"
    )


def write_imagenet_layout(root: Path, images: list[tuple[int, tuple[int, int], str, list[tuple[int, ...]]]],
                          *, seed: int = 0) -> Path:
    """The official ILSVRC2012 validation layout under ``root``: random-pixel JPEGs
    ``ILSVRC2012_img_val/ILSVRC2012_val_<number>.JPEG`` and their ``ILSVRC2012_bbox_val_v3/val`` XML, for
    ``(number, (width, height), wnid, boxes)`` entries. Returns ``root``."""
    import numpy as np
    from PIL import Image

    folder, boxes_dir = root / "ILSVRC2012_img_val", root / "ILSVRC2012_bbox_val_v3" / "val"
    folder.mkdir(parents=True, exist_ok=True)
    boxes_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number, (width, height), wnid, boxes in images:
        name = f"ILSVRC2012_val_{number:08d}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.JPEG")
        (boxes_dir / f"{name}.xml").write_text(imagenet_xml(wnid, width, height, boxes), encoding="utf-8")
    return root


@dataclass
class Mirror:
    folder: Path
    url: str
    requests: list[str]  #: the paths the server was asked for, in order


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """An empty mirror folder served over HTTP from 127.0.0.1 in a thread; every request is recorded."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    seen: list[str] = []

    class Recording(_QuietHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Recording, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy configured for the registries must not intercept
    try:
        yield Mirror(folder, f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
