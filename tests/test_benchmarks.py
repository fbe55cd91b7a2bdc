"""The benchmark scripts run end to end on the CPU and report what issues 7, 12 and 13 ask for."""

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


@pytest.fixture(scope="module")
def workload() -> Iterator[ModuleType]:
    with loaded_script("workload.py", "workload") as module:
        yield module


def test_small_cpu_run_writes_the_table(gpu_benchmark, tmp_path: Path, capsys, one_thread) -> None:
    out = tmp_path / "cpu.json"
    status = gpu_benchmark.main(
        ["--device", "cpu", "--small", "--models", "squeezenet1_0", "--input-size", "48",
         "--methods", "scorecam", "sscam", "iscam", "--set", "methods.sscam.N=3", "methods.iscam.N=4",
         "--out", str(out)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "speed-up fp32" in printed and "squeezenet1_0" in printed
    payload = json.loads(out.read_text())
    assert payload["small"] is True and payload["failures"] == {}
    assert payload["allocator"] in ({"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}, {})
    (report,) = payload["models"]
    assert report["model"] == "squeezenet1_0" and report["images"] == 1 and report["input_size"] == 48
    assert report["weights"] == "none (random initialisation)"
    assert report["inputs"] == "random normalised inputs"
    assert set(report["iscam_s_per_image"]) == {"scorecam/fp32", "sscam/fp32", "iscam/fp32"}
    assert set(report["torchcam_s_per_image"]) == {"scorecam", "sscam", "iscam"}
    # 512 channels at features.12; IS-CAM (N = 4) and SS-CAM (N = 3, both by --set) forward each scored
    # channel N times; TorchCAM every channel, after the user's and its own clean forward
    scored = report["forwards_per_image"]["scorecam"] - 1
    assert 0 < scored <= 512
    assert report["forwards_per_image"]["iscam"] == 4 * scored + 1
    assert report["forwards_per_image"]["sscam"] == 3 * scored + 1
    assert report["torchcam_forwards_per_image"] == {"scorecam": 2 + 512, "sscam": 2 + 3 * 512,
                                                     "iscam": 2 + 4 * 512}
    assert report["methods"] == {"scorecam": {}, "sscam": {"N": 3, "sigma": 2.0},
                                 "iscam": {"N": 4, "schedule": "authors"}}
    assert 0.0 <= report["skipped_share"] <= report["skipped_or_duplicate_share"] <= 1.0
    assert all(value > 0 for value in report["floor_ms_per_image"].values())


def test_small_cpu_run_times_every_method_on_a_real_squeezenet(
    gpu_benchmark, squeezenet1_0_deepcompression, tmp_path: Path, one_thread
) -> None:
    """A real-weight model explains a real image; every method has a row, TorchCAM all but the random one,
    and the forwards are those of the methods themselves on the same image."""
    import torch

    from iscam import methods, models
    from iscam.data import ManifestDataset, sample_manifest

    out = tmp_path / "cpu.json"
    argv = ["--device", "cpu", "--small", "--models", "squeezenet1_0:deepcompression", "--input-size", "64",
            "--config", "smoke", "--out", str(out)]
    assert gpu_benchmark.main(argv) == 0
    payload = json.loads(out.read_text())
    (report,) = payload["models"]
    assert report["model"] == "squeezenet1_0:deepcompression" and report["inputs"] == "imagenet-val-sample"
    assert report["weights"] == models.weights_label("squeezenet1_0", "deepcompression")
    assert set(report["iscam_s_per_image"]) == {f"{name}/fp32" for name in methods.METHODS}
    assert set(report["torchcam_s_per_image"]) == set(methods.METHODS) - {"random"}
    (random_row,) = [line.split() for line in payload["table"].splitlines()
                     if line.split()[:2] == ["squeezenet1_0:deepcompression", "random"]]
    assert random_row[3:7] == ["-", "-", "0", "-"]  # no TorchCAM time, speed-up or forwards; no forward

    model = squeezenet1_0_deepcompression.model
    preprocess = models.preprocess_for("squeezenet1_0", input_size=64)
    x = ManifestDataset(sample_manifest(), preprocess, limit=1)[0].image[None]
    forwards = {}
    for name, params in {"gradcam": {}, "smoothgradcampp": {"n_samples": 2, "noise_std": 4.0},
                         "scorecam": {}, "iscam": {"N": 2}, "random": {}}.items():
        with methods.get(name, model, "features.12", **params) as cam:
            cam(x)
            forwards[name] = cam.forward_count
    assert {name: report["forwards_per_image"][name] for name in forwards} == forwards
    assert forwards["smoothgradcampp"] == 3 and forwards["random"] == 0
    theirs = report["torchcam_forwards_per_image"]
    assert theirs["gradcam"] == theirs["gradcampp"] == 1 and theirs["smoothgradcampp"] == 1 + 2
    assert theirs["scorecam"] == 2 + 512 and theirs["sscam"] == theirs["iscam"] == 2 + 2 * 512
    assert torch.isclose(torch.tensor(report["skipped_or_duplicate_share"]),
                         torch.tensor(1 - (forwards["scorecam"] - 1) / 512))


def test_models_are_named_with_their_weights(workload) -> None:
    from iscam import models

    assert workload.parse_model("squeezenet1_0:deepcompression") == workload.BenchModel(
        "squeezenet1_0", "deepcompression")
    assert workload.parse_model("squeezenet1_1:ncnn").real
    assert workload.parse_model("resnet18") == workload.BenchModel("resnet18", None)  # never a download
    assert workload.parse_model("mobilenet_v2_coral") == workload.BenchModel("mobilenet_v2_coral", "default")
    assert workload.parse_model("mobilenet_v2_coral:random").weights is None
    for spec in ("squeezenet1_1:ncnn", "resnet18", "mobilenet_v2_coral", "mobilenet_v2_coral:random",
                 "vgg16:default"):
        assert workload.parse_model(spec).spec == spec
    label = workload.parse_model("squeezenet1_0:deepcompression").label
    assert label == f"SqueezeNet1.0 [{models.weights_label('squeezenet1_0', 'deepcompression')}]"
    with pytest.raises(ValueError, match="unknown model 'squeezenet'.*squeezenet1_0"):
        workload.parse_model("squeezenet:ncnn")
    with pytest.raises(ValueError, match="1_1 has no weights 'deepcompression'.*default, ncnn, random"):
        workload.parse_model("squeezenet1_1:deepcompression")


def test_a_wrong_model_is_refused_before_any_child_starts(capsys) -> None:
    with loaded_script("methods_cpu.py", "methods_cpu") as module, pytest.raises(SystemExit):
        module.main(["--models", "squeezenet1_1:caffe"])
    assert "squeezenet1_1 has no weights 'caffe'" in capsys.readouterr().err


def test_method_parameters_come_from_the_config(workload) -> None:
    params = workload.method_params("squeezenet", ["methods.iscam.N=5"], ["sscam", "iscam"])
    assert params == {"sscam": {"N": 15, "sigma": 2.0}, "iscam": {"N": 5, "schedule": "authors"}}
    assert list(workload.method_params("smoke")) == ["gradcam", "gradcampp", "smoothgradcampp", "scorecam",
                                                     "sscam", "iscam", "random"]
    assert workload.method_label("iscam", params["iscam"]) == "IS-CAM (N=5, schedule=authors)"
    assert workload.method_label("gradcam", {}) == "Grad-CAM"


def test_torchcam_counterparts_get_the_same_samples_and_noise(workload, tiny_cnn) -> None:
    """N and sigma reach TorchCAM under its own argument names; TorchCAM has no random baseline."""
    shape = (3, 8, 8)
    with workload.torchcam_extractor("sscam", {"N": 15, "sigma": 2.0}, tiny_cnn, "features.3", shape) as cam:
        assert (cam.num_samples, cam.std) == (15, 2.0)
    with workload.torchcam_extractor("iscam", {"N": 7, "schedule": "authors"}, tiny_cnn, "features.3",
                                     shape) as cam:
        assert cam.num_samples == 7
    with workload.torchcam_extractor("smoothgradcampp", {"n_samples": 35, "noise_std": 4.0}, tiny_cnn,
                                     "features.3", shape) as cam:
        assert (cam.num_samples, cam.std) == (35, 4.0)
    with pytest.raises(ValueError, match="TorchCAM has no counterpart of 'random'"):
        workload.torchcam_extractor("random", {}, tiny_cnn, "features.3", shape)


def test_forwards_are_counted_per_image_and_the_hook_goes(workload, tiny_cnn) -> None:
    import torch

    x = torch.zeros(3, 3, 8, 8)
    with workload.counted_forwards(tiny_cnn) as forwards:
        tiny_cnn(x)
        tiny_cnn(x[:2])
    tiny_cnn(x)
    assert forwards.images == 5 and not tiny_cnn._forward_pre_hooks


def test_torchcam_explains_as_its_users_do(workload, tiny_cnn) -> None:
    """Gradient methods get a differentiable forward; the Score family a no-grad one; maps per image."""
    import torch

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("gradcam", "scorecam"):
        extractor = workload.torchcam_extractor(name, {}, tiny_cnn, "features.4", (3, 8, 8))
        with extractor, workload.counted_forwards(tiny_cnn) as forwards:
            maps = workload.torchcam_explain(extractor, name, tiny_cnn, x)
        assert maps.shape == (2, 4, 4)
        # Grad-CAM: the user's forward; Score-CAM: that, its own clean forward and 6 channels per image
        assert forwards.images == (2 if name == "gradcam" else 2 + 2 + 2 * 6)


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
    assert "| sys / user |" in text
    assert "TorchCAM ran under the same allocator setting and memory layout as iscam" in text


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


def test_methods_cpu_times_every_method_on_a_squeezenet_in_channels_last(
    squeezenet1_1_ncnn, tmp_path: Path, one_thread
) -> None:
    """Real weights, a real image, channels-last: the counted forwards are the method's forward_count (and
    TorchCAM's its hand count), the random baseline has no TorchCAM row, the maps are iscam's own."""
    from iscam import methods, models
    from iscam.data import ManifestDataset, Preprocess, sample_manifest

    out = tmp_path / "methods"
    with loaded_script("methods_cpu.py", "methods_cpu") as module:
        argv = ["--models", "squeezenet1_1:ncnn", "--methods", "sscam", "random",
                "--config", "smoke", "--size", "64", "--layouts", "channels_last", "--allocators", "tuned",
                "--out", str(out)]
        assert module.main(argv) == 0
        digest = module.digest
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {(row["method_name"], row["library"]): row for row in payload["rows"]}
    assert set(rows) == {("sscam", "iscam"), ("sscam", "torchcam"), ("random", "iscam")}
    for row in rows.values():
        assert (row["model_spec"], row["layout"], row["allocator"], row["channels"]) == (
            "squeezenet1_1:ncnn", "channels_last", "tuned", 512)
    assert rows["sscam", "iscam"]["params"] == {"N": 2, "sigma": 2.0}
    assert rows["sscam", "iscam"]["method"] == "SS-CAM (N=2, sigma=2.0)"
    assert rows["sscam", "torchcam"]["forwards_per_image"] == 2 + 2 * 512
    assert rows["random", "iscam"]["forwards_per_image"] == 0

    model = models.load("squeezenet1_1", "ncnn").model  # its own copy: channels_last changes the layout
    reference = squeezenet1_1_ncnn.preprocess
    preprocess = Preprocess(64, mean=reference.mean, std=reference.std)
    x = ManifestDataset(sample_manifest(), preprocess, limit=1)[0].image[None]
    with methods.SSCAM(model, "features.12", N=2, batch_size=32, channels_last=True) as cam:
        maps = cam(x)
    ours = rows["sscam", "iscam"]
    assert ours["forwards_per_image"] == cam.forward_count and ours["maps_digest"] == digest(maps)
    assert ours["skipped_constant_share"] == cam.last_stats["skipped_constant"] / 512
    text = out.with_suffix(".md").read_text()
    assert "| squeezenet1_1:ncnn | Random | channels_last | tuned |" in text and "TorchCAM lacks it" in text
    assert models.weights_label("squeezenet1_1", "ncnn") in text


def test_channel_shares_of_a_squeezenet_name_their_weights(
    squeezenet1_1_ncnn, tmp_path: Path, one_thread
) -> None:
    """The results file names the model and its weights; the shares are ScoreCAM's on the same image."""
    from iscam import methods, models
    from iscam.data import ManifestDataset, sample_manifest

    with loaded_script("channel_shares.py", "channel_shares") as module:
        module.RESULTS = tmp_path
        assert module.main(["--model", "squeezenet1_1:ncnn", "--images", "1"]) == 0
    report = json.loads((tmp_path / "channel_shares-squeezenet1_1-ncnn-1.json").read_text())
    assert (report["model"], report["weights"], report["layer"], report["channels"], report["images"]) == (
        "squeezenet1_1", "ncnn", "features.12", 512, 1)
    assert report["weights_label"] == models.weights_label("squeezenet1_1", "ncnn")

    x = ManifestDataset(sample_manifest(), squeezenet1_1_ncnn.preprocess, limit=1)[0].image[None]
    with methods.ScoreCAM(squeezenet1_1_ncnn.model, "features.12", batch_size=64) as cam:
        cam.channel_weights(x)
        stats = cam.last_stats
    assert report["constant_share"] == stats["skipped_constant"] / 512
    assert report["duplicate_share"] == stats["deduplicated"] / 512


def test_metrics_cpu_on_a_squeezenet_in_both_layouts(squeezenet1_1_ncnn, tmp_path: Path) -> None:
    """The curves of a real SqueezeNet on a real image are the same in both layouts (up to rounding) and
    are those of Grad-CAM + deletion_curve / insertion_curve computed here."""
    import torch

    from iscam import methods, metrics
    from iscam.data import ManifestDataset, sample_manifest

    out = tmp_path / "metrics-squeezenet"
    with loaded_script("metrics_cpu.py", "metrics_cpu") as module:
        argv = ["--model", "squeezenet1_1:ncnn", "--images", "1", "--single-images", "0", "--parts", "curves",
                "--libraries", "iscam", "--step", "4096", "--layouts", "contiguous", "channels_last",
                "--allocators", "tuned", "--out", str(out)]
        assert module.main(argv) == 0
    payload = json.loads(Path(f"{out}.json").read_text())
    assert [row["layout"] for row in payload["rows"]] == ["contiguous", "channels_last"]
    # 224 x 224 pixels at step 4096: ceil(50176 / 4096) = 13 intervals, 14 frames per curve
    assert all(row["forwards_per_image"] == 28 for row in payload["rows"])
    assert payload["images"] == ["1 imagenet-val-sample image(s)"] and "ncnn" in payload["model"]
    assert 0 <= payload["max_abs_difference_contiguous_vs_channels_last"] < 1e-4

    loaded = squeezenet1_1_ncnn
    x = ManifestDataset(sample_manifest(), loaded.preprocess, limit=1)[0].image[None]
    with torch.no_grad():
        target = loaded.model(x).argmax(dim=1)
    with methods.GradCAM(loaded.model, loaded.target_layer) as cam:
        saliency = cam(x, target)
    deletion = metrics.deletion_curve(loaded.model, x, saliency, target, step=4096, substrate="zeros")
    insertion = metrics.insertion_curve(loaded.model, x, saliency, target, step=4096, substrate="zeros")
    contiguous = payload["rows"][0]
    assert contiguous["deletion_auc"] == pytest.approx(float(metrics.auc(deletion).mean()), abs=1e-6)
    assert contiguous["insertion_auc"] == pytest.approx(float(metrics.auc(insertion).mean()), abs=1e-6)
