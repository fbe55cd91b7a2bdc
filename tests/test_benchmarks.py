"""The benchmark scripts run end to end on the CPU and report what issues 7 and 12 ask for."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def loaded_script(file: str, name: str) -> Iterator[ModuleType]:
    """A benchmark script imported as module ``name`` (registered while in use: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def gpu_benchmark() -> Iterator[ModuleType]:
    with loaded_script("gpu.py", "gpu_benchmark") as module:
        yield module


def test_small_cpu_run_writes_the_table(gpu_benchmark, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cpu.json"
    status = gpu_benchmark.main(
        ["--device", "cpu", "--small", "--models", "squeezenet1_0", "--input-size", "48", "--out", str(out)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "speed-up fp32" in printed and "squeezenet1_0" in printed
    payload = json.loads(out.read_text())
    assert payload["small"] is True and payload["failures"] == {}
    (report,) = payload["models"]
    assert report["model"] == "squeezenet1_0" and report["images"] == 1
    assert set(report["iscam_s_per_image"]) == {"scorecam/fp32", "sscam/fp32", "iscam/fp32"}
    assert set(report["torchcam_s_per_image"]) == {"scorecam", "iscam"}
    # 512 channels at features.12; IS-CAM and SS-CAM forward each scored channel N = 10 times
    scored = report["forwards_per_image"]["scorecam"] - 1
    assert 0 < scored <= 512
    assert report["forwards_per_image"]["iscam"] == 10 * scored + 1
    assert 0.0 <= report["skipped_share"] <= report["skipped_or_duplicate_share"] <= 1.0
    assert all(value > 0 for value in report["floor_ms_per_image"].values())


def test_spearman_handles_ties_and_order(gpu_benchmark) -> None:
    import torch

    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert gpu_benchmark.spearman(a, a * 5 + 1) == pytest.approx(1.0)
    assert gpu_benchmark.spearman(a, -a) == pytest.approx(-1.0)
    tied = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert gpu_benchmark.spearman(tied, torch.tensor([[0.0, 0.0], [5.0, 5.0]])) == pytest.approx(1.0)


def test_channel_shares_count_what_score_cam_skips(assets: Path, tmp_path: Path) -> None:
    """The shares script counts exactly the channels ScoreCAM leaves out on the same real images."""
    import torch

    from iscam import methods, models
    from iscam.data import ManifestDataset, iter_batches, sample_manifest

    out = tmp_path / "shares.json"
    with loaded_script("channel_shares.py", "channel_shares") as module:
        assert module.main(["--model", "mobilenet_v1_coral_tiny", "--images", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["channels"] == 256

    loaded = models.load("mobilenet_v1_coral_tiny")
    x = next(iter(iter_batches(ManifestDataset(sample_manifest(), loaded.preprocess, limit=3), 3))).x
    with methods.ScoreCAM(loaded.model.eval(), loaded.target_layer) as cam:
        cam.channel_weights(x)
        stats = cam.last_stats
    assert report["constant_share"] == stats["skipped_constant"] / stats["channels"]
    assert report["duplicate_share"] == stats["deduplicated"] / stats["channels"]
    scored = stats["channels"] - stats["skipped_constant"] - stats["deduplicated"]
    assert stats["forwards"] == scored + 3  # and the 3 clean forwards
    assert torch.isclose(torch.tensor(report["skipped_or_duplicate_share"]),
                         torch.tensor(report["constant_share"] + report["duplicate_share"]))


def test_road_benchmark_reports_the_curves_it_timed(assets: Path, tmp_path: Path) -> None:
    """The ROAD timing script reports, per order, the mean curve road_curve gives on the same image."""
    import torch

    from iscam import methods, metrics, models, road
    from iscam.data import ManifestDataset, sample_manifest

    out = tmp_path / "road_cpu"
    with loaded_script("road_cpu.py", "road_cpu") as module:
        assert module.main(["--models", "mobilenet_v1_coral_tiny", "--images", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (row["model"], row["size"], row["images"]) == ("mobilenet_v1_coral_tiny", 128, 1)
    assert "| mobilenet_v1_coral_tiny | 128² | lerf |" in out.with_suffix(".md").read_text()

    loaded = models.load("mobilenet_v1_coral_tiny")
    x = ManifestDataset(sample_manifest(), loaded.preprocess, limit=1)[0].image[None]
    with torch.no_grad():
        target = loaded.model(x).argmax(dim=1)
    with methods.get("gradcam", loaded.model, loaded.target_layer) as cam:
        saliency = cam(x, target)
    for order in ("morf", "lerf"):
        curve = metrics.road_curve(loaded.model, x, saliency, target, order=order, seed=0,
                                   noise=road.road_noise(loaded.preprocess.std))
        assert row[order]["mean_curve"] == pytest.approx(curve[0].tolist(), abs=1e-6)
    assert row["both_orders_cpu_s_per_image"] == pytest.approx(
        row["morf"]["road_curve_cpu_s_per_image"] + row["lerf"]["road_curve_cpu_s_per_image"])


def test_methods_cpu_reports_the_cost_of_both_libraries_under_both_allocators(
    assets: Path, tmp_path: Path
) -> None:
    """One clean child per (library, allocator): CPU times and page faults, equal maps, forwards per image."""
    from iscam import methods, models
    from iscam.allocator import allocator_supported
    from iscam.data import ManifestDataset, Preprocess, sample_manifest

    out = tmp_path / "methods"
    with loaded_script("methods_cpu.py", "methods_cpu") as module:
        argv = ["--models", "mobilenet_v1_coral_tiny", "--methods", "scorecam", "--size", "64",
                "--out", str(out)]
        assert module.main(argv) == 0
        digest = module.digest
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {(row["library"], row["allocator"]): row for row in payload["rows"]}
    assert set(rows) == {(library, allocator) for library in ("iscam", "torchcam")
                         for allocator in ("default", "tuned")}
    tuned = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1} if allocator_supported() else {}
    for (library, allocator), row in rows.items():
        assert row["allocator_settings"] == (tuned if allocator == "tuned" else {})
        assert row["wall_s_per_image"] > 0 and row["user_s_per_image"] > 0 and row["sys_s_per_image"] >= 0
        assert row["minor_faults_per_image"] > 0 and row["major_faults"] >= 0 and row["peak_rss_mib"] > 0
        assert row["maps_equal_across_allocators"] is True and row["channels"] == 256
    assert rows["torchcam", "default"]["forwards_per_image"] == 2 + 256

    # the row's maps are those of ScoreCAM on the same image, and its forwards are the scored channels + 1
    loaded = models.load("mobilenet_v1_coral_tiny")
    preprocess = Preprocess(64, mean=loaded.preprocess.mean, std=loaded.preprocess.std)
    x = ManifestDataset(sample_manifest(), preprocess, limit=1)[0].image[None]
    with methods.ScoreCAM(loaded.model, loaded.target_layer, batch_size=32) as cam:
        maps = cam(x)
        stats = cam.last_stats
    iscam_row = rows["iscam", "tuned"]
    assert iscam_row["maps_digest"] == digest(maps)
    assert iscam_row["forwards_per_image"] == stats["forwards"]
    assert iscam_row["skipped_constant_share"] == stats["skipped_constant"] / 256
    text = out.with_suffix(".md").read_text()
    assert "| sys / user |" in text and "TorchCAM ran under the same allocator setting as iscam" in text


def test_metrics_cpu_reports_curves_and_confidence_for_iscam_and_torchcam(
    assets: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics"
    with loaded_script("metrics_cpu.py", "metrics_cpu") as module:
        argv = ["--model", "mobilenet_v1_coral_tiny", "--images", "1", "--single-images", "1",
                "--step", "2048", "--allocators", "tuned", "--out", str(out)]
        assert module.main(argv) == 0
    payload = json.loads(Path(f"{out}.json").read_text())
    rows = {row["mode"]: row for row in payload["rows"]}
    assert set(rows) == {
        "iscam, batched (batch_size=64)", "iscam, one frame at a time (batch_size=1)",
        "TorchCAM DeletionInsertionMetric (batch_size=64)", "iscam confidence",
        "TorchCAM ClassificationMetric",
    }
    # 128 x 128 pixels at step 2048: 8 intervals, 9 frames per curve; TorchCAM shares the all-substrate frame
    # and reuses the clean score
    assert rows["iscam, batched (batch_size=64)"]["forwards_per_image"] == 18
    assert rows["TorchCAM DeletionInsertionMetric (batch_size=64)"]["forwards_per_image"] == 15
    for row in rows.values():
        assert row["allocator"] == "tuned" and row["equal_across_allocators"] is None
        assert row["user_s_per_image"] > 0 and row["minor_faults_per_image"] > 0
    assert 0 <= payload["max_abs_difference_batched_vs_single"] < 1e-4
    assert 0 <= rows["iscam confidence"]["average_drop"] <= 1
    assert 0 <= rows["TorchCAM DeletionInsertionMetric (batch_size=64)"]["deletion_auc"] <= 1


def test_metrics_cpu_random_weights_are_the_same_in_every_child(tmp_path: Path) -> None:
    """A random-weight torchvision model is seeded in each child: equal curves under both allocators."""
    out = tmp_path / "metrics-resnet"
    with loaded_script("metrics_cpu.py", "metrics_cpu") as module:
        argv = ["--model", "resnet18", "--size", "32", "--step", "256", "--images", "1",
                "--single-images", "0", "--parts", "curves", "--libraries", "iscam", "--out", str(out)]
        assert module.main(argv) == 0
    payload = json.loads(Path(f"{out}.json").read_text())
    assert [(row["allocator"], row["forwards_per_image"]) for row in payload["rows"]] == [("default", 10),
                                                                                         ("tuned", 10)]
    assert all(row["equal_across_allocators"] is True for row in payload["rows"])
    assert payload["max_abs_difference_batched_vs_single"] is None
