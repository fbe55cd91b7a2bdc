"""The methods on real pretrained SqueezeNets (offline weights), not only on random ones: Score-CAM and IS-CAM
against the float64 per-channel reference loop, Grad-CAM against TorchCAM, and ``iscam explain`` peaking
inside the object's box on clear single-object sample images."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from conftest import iscam_inputs, score_reference, scorecam_inputs, torchcam_gradcam

from iscam import cli, methods, models
from iscam.data import Preprocess, load_image, parse_boxes

pytestmark = pytest.mark.usefixtures("one_thread")

# At 64x64, features.12 of either SqueezeNet is 3x3 (1.1: 31 -> 15 -> 7 -> 3; 1.0: 29 -> 14 -> 7 -> 3), so
# the per-channel loop over its 512 channels stays a few seconds.
SMALL = 64
# Clear single-object images: one box covering 5-50 % of the frame and top-1 correct for the Deep Compression
# SqueezeNet 1.0; the three with the smallest boxes (7 %, 10 %, 16 % of the frame) among the first 40
# single-box images of the manifest, so that all three peaks fall inside by chance with odds of ~0.1 %.
CLEAR_IMAGES = (
    "ILSVRC2012_val_00010954.JPEG",
    "ILSVRC2012_val_00012479.JPEG",
    "ILSVRC2012_val_00010535.JPEG",
)


def small_images(assets: Path, count: int, dtype: torch.dtype = torch.float32) -> Tensor:
    preprocess = Preprocess(SMALL)
    folder = assets / "imagenet-val-sample"
    return torch.stack([preprocess(load_image(folder / name)) for name in CLEAR_IMAGES[:count]]).to(dtype)


def test_scorecam_and_iscam_match_the_reference_loop_on_real_squeezenet(
    assets: Path, squeezenet1_1_ncnn: models.LoadedModel
) -> None:
    model = copy.deepcopy(squeezenet1_1_ncnn.model).double()
    layer = model.get_submodule("features.12")
    x = small_images(assets, 1, torch.float64)
    with methods.ScoreCAM(model, "features.12") as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    ref_weights, ref_maps = score_reference(model, layer, x, scorecam_inputs)
    assert (ref_weights > 0).sum() > 100  # real activations: many non-constant channels, the check bites
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)
    with methods.ISCAM(model, "features.12", N=2) as cam:
        weights, maps = cam.channel_weights(x), cam(x)
    ref_weights, ref_maps = score_reference(model, layer, x, iscam_inputs("authors", 2))
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, ref_maps.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["squeezenet1_0_deepcompression", "squeezenet1_1_ncnn"])
def test_gradcam_agrees_with_torchcam_on_real_squeezenet(
    assets: Path, which: str, request: pytest.FixtureRequest
) -> None:
    loaded: models.LoadedModel = request.getfixturevalue(which)
    x = small_images(assets, 3)
    theirs = torchcam_gradcam(loaded.model, "features.12", x)
    with methods.GradCAM(loaded.model, "features.12") as cam:
        ours = cam(x)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours.flatten(1).amax(1) == 1).all()  # real, non-degenerate maps


def test_explain_offline_peaks_inside_the_objects_box(
    assets: Path, tmp_path: Path, squeezenet1_0_deepcompression: models.LoadedModel
) -> None:
    """``iscam explain IMG --model squeezenet1_0 --weights deepcompression --method gradcam`` (no network)."""
    folder = assets / "imagenet-val-sample"
    with open(folder / "manifest.csv", newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle)}
    preprocess = squeezenet1_0_deepcompression.preprocess
    for name in CLEAR_IMAGES:
        row = rows[name]
        out, saliency = tmp_path / f"{name}.png", tmp_path / f"{name}.npy"
        argv = ["explain", str(folder / name), "--model", "squeezenet1_0", "--weights", "deepcompression"]
        argv += [
            "--method",
            "gradcam",
            "--out",
            str(out),
            "--save-saliency",
            str(saliency),
            "--device",
            "cpu",
        ]
        assert cli.main(argv) == 0
        assert out.is_file() and out.stat().st_size > 0
        heat = np.load(saliency)
        assert heat.shape == (preprocess.size, preprocess.size)
        row_index, column = np.unravel_index(int(heat.argmax()), heat.shape)
        (box,) = preprocess.map_boxes(
            parse_boxes(row["boxes"]), int(row["width"]), int(row["height"])
        ).tolist()
        x0, y0, x1, y1 = box
        assert x0 <= column + 0.5 < x1 and y0 <= row_index + 0.5 < y1, (name, (column, row_index), box)
