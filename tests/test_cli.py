"""The command line (run / table / explain / compact) and the overlay it draws."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iscam import cli, plots
from iscam.explain import explain
from iscam.store import ResultsStore

# Sample images with a single box covering < 60% of the image, a class the Coral MobileNetV2 predicts
# correctly (top-1 == label), chosen once by scanning the 300-image sample (file, label).
CLEAR_OBJECTS = [
    ("ILSVRC2012_val_00023201.JPEG", 25),
    ("ILSVRC2012_val_00025448.JPEG", 271),
    ("ILSVRC2012_val_00033216.JPEG", 141),
]


# --------------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------------

def test_overlay_blends_a_colormap_over_the_image(tmp_path: Path) -> None:
    image = torch.zeros(3, 4, 6)
    image[0] = 1.0  # pure red image
    saliency = torch.zeros(2, 3)
    saliency[1, 2] = 1.0
    assert (plots.overlay(image, saliency, alpha=0.0) == np.array([255, 0, 0], dtype=np.uint8)).all()
    coloured = plots.overlay(image, torch.ones(4, 6), alpha=1.0)
    assert coloured.shape == (4, 6, 3) and coloured.dtype == np.uint8
    assert (coloured == plots.heatmap(torch.ones(1, 1))[0, 0]).all()  # jet(1) everywhere
    half = plots.overlay(image, torch.zeros(4, 6), alpha=0.5)
    jet0 = plots.heatmap(torch.zeros(1, 1))[0, 0].astype(float)  # jet(0) = dark blue
    assert (half == np.round(0.5 * np.array([255.0, 0, 0]) + 0.5 * jet0).astype(np.uint8)).all()
    upsampled = plots.overlay(image, saliency, alpha=1.0)  # 2x3 map -> 4x6 image, bilinear
    assert upsampled.shape == (4, 6, 3)
    assert (upsampled[3, 5] == plots.heatmap(torch.ones(1, 1))[0, 0]).all()
    path = plots.save_png(upsampled, tmp_path / "o.png")
    assert (np.asarray(Image.open(path)) == upsampled).all()
    with pytest.raises(ValueError, match=r"in \[0, 1\] \(denormalise first\)"):
        plots.overlay(image * 3 - 1, saliency)
    with pytest.raises(ValueError, match="alpha"):
        plots.overlay(image, saliency, alpha=2)
    with pytest.raises(ValueError, match="one map"):
        plots.overlay(image, torch.zeros(2, 2, 2))


# --------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coral_v2_preprocess(assets: Path):
    from iscam import models

    return models.load("mobilenet_v2_coral", data_root=assets).preprocess


def _box(assets: Path, file: str, preprocess) -> torch.Tensor:
    """The object's box in the model's 224x224 input frame."""
    from iscam import data

    with open(assets / "imagenet-val-sample" / "manifest.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["file"] == file)
    return preprocess.map_boxes(data.parse_boxes(row["boxes"]), int(row["width"]), int(row["height"]))


@pytest.mark.parametrize(("file", "label"), CLEAR_OBJECTS)
def test_explain_heat_map_peaks_inside_the_object(assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  coral_v2_preprocess, file: str, label: int) -> None:
    image = assets / "imagenet-val-sample" / file
    out, saliency_file = tmp_path / "overlay.png", tmp_path / "map.npy"
    status = cli.main(["explain", str(image), "--model", "mobilenet_v2_coral", "--method", "gradcam",
                       "--out", str(out), "--save-saliency", str(saliency_file), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    top = [line.split() for line in printed.splitlines() if line.strip()[:2] in {f"{k}." for k in range(1, 6)}]
    assert len(top) == 5 and int(top[0][1]) == label  # top-1 is the object's class
    probabilities = [float(line[-1]) for line in top]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-4
    png = np.asarray(Image.open(out))
    assert png.shape == (224, 224, 3) and png.dtype == np.uint8
    saliency = np.load(saliency_file)
    assert saliency.shape == (224, 224) and saliency.max() == pytest.approx(1.0)
    row, column = np.unravel_index(np.argmax(saliency), saliency.shape)
    boxes = _box(assets, file, coral_v2_preprocess)
    assert boxes.shape[0] == 1
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x0 <= column + 0.5 < x1 and y0 <= row + 0.5 < y1, (row, column, boxes)
    # the PNG is exactly the overlay of that map on the model's input view
    result = explain(image, model="mobilenet_v2_coral", method="gradcam", out=tmp_path / "again.png",
                     device="cpu")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), plots.overlay(result["input"],
                                                                                        result["saliency"]))
    np.testing.assert_allclose(result["saliency"].numpy(), saliency, atol=1e-6)


def test_explain_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path) -> None:
    assert cli.main(["explain", str(tmp_path / "none.jpg"), "--model", "mobilenet_v1_coral_tiny", "--method",
                     "gradcam", "--out", str(tmp_path / "o.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    assert cli.main(["explain", str(broken), "--model", "mobilenet_v1_coral_tiny", "--method", "gradcam",
                     "--out", str(tmp_path / "o.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    image = assets / "imagenet-val-sample" / CLEAR_OBJECTS[0][0]
    assert cli.main(["explain", str(image), "--model", "mobilenet_v1_coral_tiny", "--method", "fancycam",
                     "--out", str(tmp_path / "o.png"), "--device", "cpu"]) == 2
    assert "unknown method 'fancycam'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# run / table / compact
# --------------------------------------------------------------------------------------------------

def test_run_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["run", "smoky"]) == 2
    assert "unknown config 'smoky'" in capsys.readouterr().err
    assert cli.main(["run", "smoke", "--set", "data.num_imags=3"]) == 2
    assert "unknown key 'data.num_imags'" in capsys.readouterr().err
    assert cli.main(["run", "smoke", "--set", "batch_size"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert cli.main(["run", "smoke", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                     "--device", "cpu"]) == 2
    assert "is not an existing folder" in capsys.readouterr().err
    assert cli.main(["table", str(tmp_path / "empty")]) == 2
    assert "no results in" in capsys.readouterr().err


def test_run_then_table_prints_the_papers_tables_with_cis(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          assets: Path) -> None:
    out = tmp_path / "res"
    methods = "methods=[gradcam, scorecam, {name: iscam, params: {N: 2}}, random]"
    assert cli.main(["run", "smoke", "--set", "data.num_images=2", "--set", methods, "--out", str(out),
                     "--no-progress", "--device", "cpu", "--only", "base"]) == 0
    printed = capsys.readouterr().out
    assert "smoke: 8 rows computed, 0 already present" in printed and "iscam(N=2): " in printed
    assert cli.main(["table", str(out), "--n-boot", "200"]) == 0
    printed = capsys.readouterr().out
    for title in ("TABLE I.", "TABLE II.", "Win % of IS-CAM", "TABLE III."):
        assert title in printed
    assert "(paper 48.13, vgg16)" in printed  # IS-CAM insertion, Table I
    assert "IS-CAM vs Score-CAM" in printed and "(paper 52.35, vgg16)" in printed
    assert "images: 2 of the 2 the config selects" in printed and "Random" in printed
    frame = ResultsStore(out).read()
    iscam_ins = 100 * frame.loc[frame["method"] == "iscam", "insertion_auc"].mean()
    assert f"{iscam_ins:.2f} [" in printed
    assert cli.main(["compact", str(out)]) == 0
    assert len(ResultsStore(out).merged_files()) == 1 and ResultsStore(out).part_files() == []
    assert len(ResultsStore(out).read()) == 8
