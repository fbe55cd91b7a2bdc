"""The runner's promises: resumable after SIGKILL, incremental when a parameter changes, identical under
torchrun. The tests use the real ``smoke`` config (Coral MobileNetV1 on 4 sample images) and share one
uninterrupted reference run (:mod:`iscam.runner`)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from iscam.config import load_config
from iscam.runner import run
from iscam.store import KEY_COLUMNS, ROW_COLUMNS, STAMP_COLUMNS, TIMING_COLUMNS, ResultsStore

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# runner (real smoke config)
# --------------------------------------------------------------------------------------------------

COMPARED = [c for c in ROW_COLUMNS if c not in TIMING_COLUMNS]
BASE = ["--only", "base"]  # the paper's rows of the smoke config: 4 images x 7 methods, 2 batches each


def assert_same_rows(actual: pd.DataFrame, expected: pd.DataFrame, *, atol: float = 1e-6) -> None:
    """Row for row equality of two stores, timing columns excluded, floats within ``atol``."""
    actual = actual[COMPARED].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    expected = expected[COMPARED].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    assert len(actual) == len(expected)
    for column in COMPARED:
        a, e = actual[column], expected[column]
        if column.endswith("_curve") or column == "map":
            np.testing.assert_allclose(np.concatenate(a.map(np.asarray).tolist()),
                                       np.concatenate(e.map(np.asarray).tolist()), atol=atol, rtol=0,
                                       err_msg=column)
        elif column == "map_shape":
            assert a.map(list).tolist() == e.map(list).tolist(), column
        elif pd.api.types.is_float_dtype(e) or pd.api.types.is_float_dtype(a):
            # a null (a skipped pointing game) reads as NaN, and equals NaN here
            np.testing.assert_allclose(pd.to_numeric(a).to_numpy(dtype=float), pd.to_numeric(e).to_numpy(dtype=float),
                                       atol=atol, rtol=0, err_msg=column)
        else:
            assert a.tolist() == e.tolist(), column


# Every run whose rows are compared uses one intra-op thread: reductions split over a different number of
# threads add in a different order, and torchrun gives each worker OMP_NUM_THREADS=1. Comparisons then hold
# to float rounding whatever the machine's load or core count.
COMPARED_THREADS = 1


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(COMPARED_THREADS)
    return env


def _smoke(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "iscam", "run", "smoke", "--out", str(out), "--no-progress", "--device", "cpu",
            *extra]


def _pinned_run(*args, **kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(COMPARED_THREADS)
    try:
        return run(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """An uninterrupted, in-process run of the whole smoke config (base rows, variants, figures)."""
    out = tmp_path_factory.mktemp("reference") / "smoke"
    summary = _pinned_run(load_config("smoke"), out=out, device="cpu", progress=False)
    assert summary.rows_skipped == 0 and not summary.images_skipped
    return out


def _base(frame: pd.DataFrame) -> pd.DataFrame:
    """The base rows of the smoke config (its 4 selected images, its 7 methods' parameters)."""
    from iscam import tables

    files = frame.loc[frame["index"].isin(_base_indices()), "file"].unique()
    return tables.select(frame, load_config("smoke"), files=files)


def _base_indices() -> list[int]:
    from iscam.config import select_indices

    return select_indices(300, load_config("smoke").data)


def test_reference_run_has_every_row_metric_map_and_provenance(reference: Path) -> None:
    store = ResultsStore(reference)
    frame = _base(store.read())
    assert len(frame) == 28 and frame["file"].nunique() == 4
    assert sorted(frame["method"].unique()) == sorted(["gradcam", "gradcampp", "smoothgradcampp", "scorecam",
                                                       "sscam", "iscam", "random"])
    assert set(frame["layer"]) == {"features.2"} and set(frame["model"]) == {"mobilenet_v1_coral_tiny"}
    for column in ("y", "o", "drop", "increase", "insertion_auc", "deletion_auc", "pointing"):
        values = frame[column].to_numpy(dtype=float)
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1 + 1e-6).all(), column
    assert (frame["pointing_skip"] == "").all()
    np.testing.assert_allclose(frame["change"], frame["y"] - frame["o"], atol=1e-7)
    np.testing.assert_allclose(frame["drop"], np.maximum(0, frame["y"] - frame["o"]) / frame["y"], atol=1e-6)
    assert ((frame["increase"] == 1.0) == (frame["o"] > frame["y"])).all()
    # 128x128 input, step 2048 -> 8 steps -> 9 points; the curves' ends are the clean score and the substrate's
    assert set(frame["insertion_curve"].map(len)) == {9} and set(frame["deletion_curve"].map(len)) == {9}
    np.testing.assert_allclose(frame["deletion_curve"].map(lambda c: c[0]), frame["y"], atol=1e-5)
    np.testing.assert_allclose(frame["insertion_curve"].map(lambda c: c[-1]), frame["y"], atol=1e-5)
    # the same target for every method of an image: argmax of the clean logits
    assert (frame.groupby("file")["target"].nunique() == 1).all()
    assert (frame["correct"] == (frame["target"] == frame["label"])).all()
    forwards = frame.groupby("method")["forward_count"].max()
    assert forwards["random"] == 0 and forwards["gradcam"] == 1
    assert 1 < forwards["scorecam"] <= 1 + 32 and forwards["iscam"] <= 1 + 2 * 32
    # the metrics' forwards: 2 for confidence, 9 + 9 for the curves
    assert set(frame["metric_forward_count"]) == {20}
    # maps: the 32x32 layer's raw map (the random baseline's is rebuilt from its seed)
    shapes = frame.set_index("method")["map_shape"].map(list)
    assert shapes["gradcam"].iloc[0] == [32, 32] and shapes["random"].iloc[0] == [128, 128]
    assert (frame.loc[frame["method"] == "random", "map"].map(len) == 0).all()
    assert (frame.loc[frame["method"] != "random", "map"].map(len) == 32 * 32).all()
    for column in STAMP_COLUMNS:
        assert frame[column].notna().all(), column
    provenance = store.provenance()
    assert provenance["status"] == "complete" and provenance["config"] == load_config("smoke").to_dict()
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["device"].startswith("cpu")
    assert provenance["world_size"] == 1
    labels = {m.label() for m in load_config("smoke").methods}
    assert labels <= set(provenance["cost"])  # the base methods, and the variants' own parameter sets
    for cost in provenance["cost"].values():
        assert cost["seconds"] == pytest.approx(cost["map_seconds"] + cost["metric_seconds"])
        assert cost["total_forwards"] == pytest.approx(cost["forwards"] + cost["metric_forwards"])
    assert provenance["started"] <= provenance["finished"]
    assert [entry["variant"] for entry in provenance["plan"]][:2] == ["", "n_sweep"]


def test_variant_and_figure_rows_and_artifacts_are_stored(reference: Path) -> None:
    store = ResultsStore(reference)
    frame = store.read(curves=False)
    plan = {(e["variant"], e["label"]): e for e in store.provenance()["plan"]}
    sweep_files = plan[("n_sweep", "N=1")]["files"]
    assert sweep_files == plan[("", "")]["files"][:2]  # the variant's images: a prefix of the base's
    iscam = frame[frame["method"] == "iscam"]
    assert {json.loads(k)["N"] for k in iscam["params_key"]} == {1, 2, 3}
    zeros = frame[frame["metrics_key"].str.contains('"insertion":{"step":2048,"substrate":"zeros"}')]
    assert set(zeros["method"]) == {"scorecam", "iscam"} and set(zeros["file"]) == set(sweep_files)
    figure_files = plan[("figures", "Fig. 1 and Fig. 2")]["files"]
    assert len(figure_files) == 3 and set(frame.loc[frame["file"].isin(figure_files), "method"]) == {
        "gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam", "iscam", "random"}
    images = store.read(table="images")
    assert set(images["file"]) == set(figure_files) and images["png"].map(lambda b: b[:4] == b"\x89PNG").all()
    (trace,) = store.read(table="traces").to_dict("records")
    assert trace["file"] == figure_files[0] and trace["N"] == 2 and len(trace["channels"]) == 4
    steps = np.asarray(trace["step_scores"]).reshape(4, 2)
    weights = np.asarray(trace["channel_weights"])
    np.testing.assert_allclose(steps.mean(1), weights[list(trace["channels"])], rtol=1e-3, atol=1e-5)


def test_stored_maps_rebuild_the_maps_the_metrics_saw(reference: Path) -> None:
    """Every method's stored raw map (the random baseline's seed) rebuilds its full-size map to <= 1e-5."""
    from iscam import methods, models
    from iscam.config import image_seed
    from iscam.data import ManifestDataset, sample_manifest
    from iscam.runner import MethodRunner

    config = load_config("smoke")
    frame = _base(ResultsStore(reference).read(curves=False))
    loaded = models.load(config.model.name, data_root=os.environ["ISCAM_DATA"])
    dataset = ManifestDataset(sample_manifest(None, "imagenet-val-sample"), loaded.preprocess)
    for spec in config.methods:
        row = frame[frame["method"] == spec.name].iloc[0]
        x = dataset[int(row["index"])].image[None]
        height, width = (int(v) for v in row["map_shape"])
        raw = None if spec.name == "random" else torch.tensor(list(row["map"])).view(1, height, width)
        seed = image_seed(config.seed, spec.name, row["file"]) if spec.name == "random" else None
        rebuilt = methods.reconstruct(spec.name, raw, (128, 128), spec.params, seed=seed)
        with MethodRunner(spec, loaded.model, config.model.target_layer, config) as runner:
            again, _ = runner.maps(x, torch.tensor([int(row["target"])]), [row["file"]])
            recomputed = runner.finish(again, (128, 128))
        assert float((rebuilt - recomputed).abs().max()) <= 1e-5, spec.name


def test_rerun_of_a_complete_store_loads_no_model_and_a_new_n_adds_only_its_rows(
        reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "smoke"
    shutil.copytree(reference, out)
    loads = []
    original_load = models_load()
    monkeypatch.setattr("iscam.models.load", lambda *a, **k: loads.append(a) or original_load(*a, **k))
    again = run(load_config("smoke"), out=out, device="cpu", progress=False)
    assert again.rows_written == 0 and loads == []  # complete: nothing loaded, nothing forwarded
    assert again.tables == {"road": {"rows": 0, "seconds": 0.0}, "sanity": {"rows": 0, "seconds": 0.0}}
    before = ResultsStore(out).read()
    created = []
    original_get = methods_get()

    def recording_get(name, model, target_layer=None, **kwargs):
        cam = original_get(name, model, target_layer, **kwargs)
        created.append((name, kwargs, cam))
        return cam

    monkeypatch.setattr("iscam.methods.get", recording_get)
    summary = run(load_config("smoke", ["methods.iscam.N=4"]), out=out, device="cpu", progress=False,
                  only=["base"])
    assert summary.rows_written == 4 and {name for name, _, _ in created} == {"iscam"}
    after = ResultsStore(out).read()
    new = after[~after.set_index(list(KEY_COLUMNS)).index.isin(before.set_index(list(KEY_COLUMNS)).index)]
    assert len(new) == 4 and set(new["method"]) == {"iscam"}
    assert {json.loads(k)["N"] for k in new["params_key"]} == {4}
    # the forward passes spent are exactly those of the 4 new IS-CAM rows: 1 clean pass + 4 per scored channel
    assert sum(cam.forward_count for _, _, cam in created) == new["forward_count"].sum()
    assert ((new["forward_count"] - 1) % 4 == 0).all() and (new["forward_count"] <= 1 + 4 * 32).all()
    assert_same_rows(after.merge(before[list(KEY_COLUMNS)], on=list(KEY_COLUMNS)), before, atol=0)


def test_a_set_that_changes_only_the_metrics_reuses_the_maps_bit_for_bit(
        reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"insertion onto zeros" changes a metric, not the maps: its rows take the base rows' stored maps,
    targets and map costs, and equal the rows computed from scratch in every column but the timings."""
    import itertools

    config = load_config("smoke")
    store = ResultsStore(reference)
    frame = store.read(curves=False)
    zeros = frame[frame["metrics_key"].str.contains('"insertion":{"step":2048,"substrate":"zeros"}')]
    base = frame[frame["metrics_key"] == config.metrics.key]
    pairs = zeros.merge(base, on=list(KEY_COLUMNS[:-1]), suffixes=("", "_base"))
    assert len(pairs) == len(zeros) == 4 and set(pairs["method"]) == {"scorecam", "iscam"}
    for row in pairs.to_dict("records"):
        assert np.array_equal(np.asarray(row["map"]), np.asarray(row["map_base"])) and len(row["map"]) == 32 * 32
        for column in ("target", "map_shape", "method_seconds", "forward_count"):
            assert np.array_equal(row[column], row[f"{column}_base"]), column
        assert row["deletion_auc"] == row["deletion_auc_base"]  # the same map under the same deletion metric
    assert (pairs["insertion_auc"] != pairs["insertion_auc_base"]).any()  # ... under another insertion one
    cost = store.provenance()["cost"]
    assert cost["scorecam"]["maps_reused"] == 2 and cost["iscam(N=2, schedule=authors)"]["maps_reused"] == 2
    assert all(c["maps_reused"] == 0 for label, c in cost.items() if not label.startswith(("scorecam", "iscam(N=2,")))

    # every study a map identity of its own: nothing is reused, every map is computed
    counter = itertools.count()
    monkeypatch.setattr("iscam.runner._map_identity", lambda *_: str(next(counter)))
    out = tmp_path / "smoke"
    summary = _pinned_run(config, out=out, device="cpu", progress=False, only=["base", "protocol"])
    assert not any(c["maps_reused"] for c in summary.cost.values())
    fresh = ResultsStore(out).read()
    assert len(fresh) == 28 + 2 * (1 + 1 + 2 + 2)  # base; 2 images of schedule = paper, linear, TorchCAM, zeros
    same_keys = ResultsStore(reference).read().merge(fresh[list(KEY_COLUMNS)], on=list(KEY_COLUMNS))
    assert_same_rows(fresh, same_keys, atol=0)


def test_out_of_memory_splits_a_batch_with_each_image_keeping_its_reused_map(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA out-of-memory retry halves the batch: each half goes on with its own images' reused rows."""
    from types import SimpleNamespace

    from iscam import runner as iscam_runner
    from iscam.data import Batch

    calls = []

    def once(runner, method, batch, fixed, rank, reused=None):
        if len(batch.files) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        calls.append((list(batch.files), reused))
        return [{"file": batch.files[0]}]

    monkeypatch.setattr(iscam_runner, "_process_batch_once", once)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    files = ["a", "b", "c"]
    batch = Batch(x=torch.zeros(3, 3, 4, 4), labels=torch.zeros(3, dtype=torch.long),
                  boxes=[torch.zeros(0, 4)] * 3, files=files, indices=torch.arange(3))
    fake_runner = SimpleNamespace(device=torch.device("cuda"), metric_batch=8)
    method = SimpleNamespace(kwargs={"batch_size": 8}, halve_batch=lambda: None)
    reused = [{"file": f, "map": [float(i)]} for i, f in enumerate(files)]
    rows = iscam_runner._process_batch(fake_runner, method, batch, {}, 0, reused)
    assert [r["file"] for r in rows] == files
    assert calls == [([f], [reused[i]]) for i, f in enumerate(files)] and fake_runner.metric_batch == 2
    calls.clear()
    iscam_runner._process_batch(fake_runner, method, batch, {}, 0)
    assert calls == [([f], None) for f in files]


def models_load():
    from iscam import models

    return models.load


def methods_get():
    from iscam import methods

    return methods.get


def _parts(out: Path) -> int:
    return len(list((out / "parts").glob("part-*.parquet"))) if (out / "parts").is_dir() else 0


def _stopped(process: subprocess.Popen) -> bool:
    """Wait until ``process`` is stopped by SIGSTOP (True) or has exited (False)."""
    stat = Path(f"/proc/{process.pid}/stat")
    while process.poll() is None:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("T", "t"):
            return True
        time.sleep(0.01)
    return False


def test_sigint_then_sigkill_at_random_points_then_resume_equals_uninterrupted(reference: Path,
                                                                                tmp_path: Path) -> None:
    """Each round freezes the run with SIGSTOP at a random point, checks that work is left (so the run
    cannot finish before the signal lands: the state is checked, never timed), then interrupts it."""
    out = tmp_path / "killed"
    rng = random.Random(5)
    total_parts = 7 * 2  # 7 methods x 2 batches of 2 images
    interruptions = [signal.SIGINT, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL]
    delivered: list[signal.Signals] = []
    for number, sig in enumerate(interruptions):
        start_parts = _parts(out)
        if start_parts >= total_parts - 1:
            break
        process = subprocess.Popen(_smoke(out, *BASE), env=_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        # interrupt after a random amount of new work (0 = possibly still starting up), at a random instant
        wanted = min(start_parts + rng.randint(0 if number else 1, 3), total_parts - 1)
        deadline = time.monotonic() + 240
        while _parts(out) < wanted and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGSTOP)
        if not _stopped(process):  # it finished before the stop: nothing left to interrupt
            process.communicate(timeout=120)
            break
        if _parts(out) >= total_parts:  # frozen after its last part: the signal could land after the run
            process.kill()
            process.communicate(timeout=120)
            break
        process.send_signal(sig)
        process.send_signal(signal.SIGCONT)
        delivered.append(sig)
        _, stderr = process.communicate(timeout=120)
        if sig == signal.SIGINT:
            assert process.returncode == 130, stderr[-2000:]
            assert "resume with: iscam run smoke" in stderr
            assert ResultsStore(out).provenance()["status"] == "interrupted"
        else:
            assert process.returncode == -signal.SIGKILL
        ResultsStore(out).read()  # never corrupt, whatever was in flight
    # the SIGINT and at least one SIGKILL hit a running process, after it had written some parts
    assert delivered[:2] == [signal.SIGINT, signal.SIGKILL], f"interruptions delivered: {delivered}"
    assert _parts(out) > 0, "the interruptions did not fall inside the run"
    finished = subprocess.run(_smoke(out, *BASE), env=_env(), capture_output=True, text=True, timeout=600,
                              check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_rows(ResultsStore(out).read(), _base(ResultsStore(reference).read()))


def test_torchrun_two_cpu_processes_write_the_same_store_as_one(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "iscam", "run", "smoke", "--out", str(out), "--no-progress", "--device", "cpu",
               "--only", "base,road,sanity"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = ResultsStore(out).read()
    assert set(frame["rank"]) == {0, 1}
    # rank r writes its own parts: batch j of 2 images goes to rank j % 2
    for rank in (0, 1):
        assert list(out.glob(f"parts/part-r{rank:03d}-*.parquet"))
    provenance = ResultsStore(out).provenance()
    assert provenance["world_size"] == 2 and provenance["rows_written"] == 28
    assert_same_rows(frame, _base(ResultsStore(reference).read()))
    # the ROAD and sanity units are shared out too, and give the one-process rows
    for table, columns in (("road", ["road_morf", "road_lerf"]), ("sanity", ["spearman", "ssim", "hog"])):
        shared, alone = ResultsStore(out).read(table=table), ResultsStore(reference).read(table=table)
        assert set(shared["rank"]) == {0, 1} and len(shared) == len(alone)
        for column in columns:
            np.testing.assert_allclose(shared[column], alone[column], atol=1e-6, err_msg=f"{table} {column}")


# --------------------------------------------------------------------------------------------------
# ROAD and sanity tables (the smoke config: ROAD on 2 images at 3 fractions; sanity on 2 + 1 images, 2 stages)
# --------------------------------------------------------------------------------------------------

def _runner_model():
    """The smoke model as the runner loads it (eval, channels-last), its preprocessing and the images."""
    from iscam.data import ManifestDataset, sample_manifest
    from iscam.runner import _load_model

    config = load_config("smoke")
    loaded = _load_model(config, Path(os.environ["ISCAM_DATA"]), torch.device("cpu"))
    return config, loaded, ManifestDataset(sample_manifest(None, "imagenet-val-sample"), loaded.preprocess)


def test_road_rows_are_road_curves_of_the_stored_maps_with_one_seed_per_image(reference: Path,
                                                                               one_thread: None) -> None:
    from iscam import methods
    from iscam.config import image_seed, road_seed
    from iscam.road import road_curve, road_noise

    store = ResultsStore(reference)
    road = store.read(table="road")
    config, loaded, dataset = _runner_model()
    first_two = list(dict.fromkeys(_base(store.read(curves=False)).sort_values("index")["file"]))[:2]
    # every base method on the first road.images = 2 base images, nothing else
    assert len(road) == 14 and set(road["file"]) == set(first_two)
    assert sorted(road["method"].unique()) == sorted(m.name for m in config.methods)
    assert set(road["road_key"]) == {'{"fractions":[0.1,0.5,0.9],"seed":0}'}
    for column in ("road_morf", "road_lerf"):
        assert road[column].between(0, 1).all(), column
    np.testing.assert_allclose(road["road_gap"], road["road_lerf"] - road["road_morf"], atol=1e-7)
    np.testing.assert_allclose(road["road_morf"], road["road_morf_curve"].map(np.mean), atol=1e-7)
    assert set(road["road_fractions"].map(tuple)) == {(0.1, 0.5, 0.9)}
    assert set(road["road_morf_curve"].map(len)) == {3} and set(road["road_lerf_curve"].map(len)) == {3}
    # paired: one noise seed per image, the same for every method
    assert (road.groupby("file")["road_seed"].nunique() == 1).all()
    assert (road["road_seed"] == road["file"].map(lambda f: road_seed(0, f))).all()
    for column in ("road_version", *STAMP_COLUMNS):
        assert road[column].notna().all(), column
    # each row equals road_curve on the map rebuilt from the base row, explaining the base row's target
    rows = _base(store.read(curves=False)).set_index(["file", "method"])
    for method in ("gradcam", "sscam", "random"):
        spec = next(m for m in config.methods if m.name == method)
        for file in first_two:
            base_row = rows.loc[(file, method)]
            road_row = road[(road["file"] == file) & (road["method"] == method)]
            raw = None if method == "random" else torch.tensor(np.asarray(base_row["map"], np.float32)).view(
                1, *base_row["map_shape"])
            saliency = methods.reconstruct(method, raw, (128, 128), spec.params,
                                           seed=image_seed(0, method, file) if method == "random" else None)
            x = dataset[int(base_row["index"])].image[None]
            for order in ("morf", "lerf"):
                direct = road_curve(loaded.model, x, saliency, int(base_row["target"]), order=order,
                                    fractions=(0.1, 0.5, 0.9), noise=road_noise(loaded.preprocess.std),
                                    seed=road_seed(0, file))
                np.testing.assert_allclose(road_row[f"road_{order}_curve"].iloc[0], direct[0].numpy(),
                                           atol=1e-5, err_msg=f"{method} {order}")


def test_sanity_rows_are_sanity_rows_with_the_runner_methods_and_seeds(reference: Path,
                                                                        one_thread: None) -> None:
    from iscam import sanity
    from iscam.config import image_seed, method_kwargs

    store = ResultsStore(reference)
    rows = store.read(table="sanity")
    config, loaded, dataset = _runner_model()
    base = _base(store.read(curves=False)).sort_values("index")
    files = list(dict.fromkeys(base["file"]))
    # single_pass: 3 methods x 2 images x 2 modes x 2 stages; multi_pass: 4 methods x 1 image x cascading x 2
    assert len(rows) == 3 * 2 * 2 * 2 + 4 * 1 * 1 * 2
    assert set(rows["stage"]) == {1, 15} and set(rows["n_stages"]) == {15}  # spread_positions(15, 2)
    multi = rows[rows["method"].isin(["smoothgradcampp", "scorecam", "sscam", "iscam"])]
    assert len(multi) == 8 and set(multi["mode"]) == {"cascading"} and set(multi["file"]) == {files[0]}
    assert set(rows["file"]) == set(files[:2])
    assert set(rows["randomisation"]) == {'{"granularity":"block","mode":"cascading","seed":0}',
                                          '{"granularity":"block","mode":"independent","seed":0}'}
    full = rows[rows["stage"] == 15]
    assert set(full.loc[full["mode"] == "cascading", "n_randomised"]) == {15}
    assert set(full.loc[full["mode"] == "independent", "randomised"]) == {"features.0"}
    for metric in sanity.SIMILARITY_METRICS:
        assert rows[metric].dropna().between(-1, 1).all(), metric
    assert (rows.merge(base[["file", "method", "target"]], on=["file", "method"], suffixes=("", "_base"))
            .eval("target == target_base").all())  # the class the base rows explain
    # the summaries read the stored table as they read sanity_rows' rows
    flags = sanity.insensitive_methods(rows, n_boot=200)
    assert sorted(flags["method"]) == sorted(m.name for m in config.methods) and set(flags["stage"]) == {15}
    assert set(sanity.summarise(rows, n_boot=200)["stage"]) == {1, 15}
    layers = sanity.parameterised_layers(loaded.model, dataset[0].image[None])
    stages = [s for s in sanity.randomisation_stages(layers) if s.index in (1, 15)]
    for method, file in (("gradcam", files[1]), ("random", files[0]), ("sscam", files[0])):
        spec = next(m for m in config.methods if m.name == method)
        kwargs = method_kwargs(config, method, spec.params, forward_batch=config.forward_batch_size)
        if method in ("random", "sscam"):  # stochastic: the per-image seed of the base rows
            kwargs["seed"] = image_seed(0, method, file)
        index = int(base.loc[base["file"] == file, "index"].iloc[0])
        modes = ("cascading",) if method == "sscam" else ("cascading", "independent")
        direct = sanity.sanity_rows(loaded.model, dataset[index].image[None], {method: kwargs},
                                    layer="features.2", stages=[s for s in stages if s.mode in modes], seed=0)
        stored = rows[(rows["method"] == method) & (rows["file"] == file)].set_index(["mode", "stage"])
        assert len(stored) == len(direct)
        for row in direct:
            for metric in sanity.SIMILARITY_METRICS:
                where = f"{method} {row['mode']} {row['stage']} {metric}"
                np.testing.assert_allclose(stored.loc[(row["mode"], row["stage"]), metric], row[metric],
                                           atol=1e-6, err_msg=where)


def test_more_road_images_or_sanity_stages_add_only_their_rows(reference: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "smoke"
    shutil.copytree(reference, out)
    before = {table: ResultsStore(out).read(table=table) for table in ("road", "sanity")}
    created = []
    original_get = methods_get()
    monkeypatch.setattr("iscam.methods.get",
                        lambda name, *a, **k: created.append(name) or original_get(name, *a, **k))
    summary = _pinned_run(load_config("smoke", ["road.images=3", "sanity.multi_pass.stages=3"]), out=out,
                          device="cpu", progress=False)
    assert summary.rows_written == 0  # the rows table is complete: only the two tables grow
    assert summary.tables["road"]["rows"] == 7 and summary.tables["sanity"]["rows"] == 4
    # the new sanity maps (ROAD rebuilds the stored maps instead)
    assert set(created) == {"smoothgradcampp", "scorecam", "sscam", "iscam"}
    road = ResultsStore(out).read(table="road")
    new = road[~road["file"].isin(before["road"]["file"])]
    assert len(new) == 7 and new["file"].nunique() == 1 and len(road) == 14 + 7
    old = road[road["file"].isin(before["road"]["file"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, before["road"])  # untouched
    sanity_rows = ResultsStore(out).read(table="sanity")
    added = sanity_rows.merge(before["sanity"][["file", "method", "randomisation", "stage"]], how="left",
                              indicator=True).query("_merge == 'left_only'")
    assert sorted(added["method"]) == ["iscam", "scorecam", "smoothgradcampp", "sscam"]
    assert set(added["stage"]) == {8}  # spread_positions(15, 3) == [1, 8, 15]
    again = run(load_config("smoke", ["road.images=3", "sanity.multi_pass.stages=3"]), out=out, device="cpu",
                progress=False)
    assert again.tables == {"road": {"rows": 0, "seconds": 0.0}, "sanity": {"rows": 0, "seconds": 0.0}}


def test_road_without_the_base_rows_or_with_stale_rows_stops_before_the_model_loads(
        reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iscam.config import ConfigError
    from iscam.runner import StaleRowsError

    loads = []
    monkeypatch.setattr("iscam.models.load", lambda *a, **k: loads.append(a))
    lacking = r"ROAD reads the stored maps of the base rows.*gradcam: 2.*--only base,road"
    with pytest.raises(ConfigError, match=lacking):
        run(load_config("smoke"), out=tmp_path / "empty", device="cpu", progress=False, only=["road"])
    out = tmp_path / "stale"
    shutil.copytree(reference, out)
    store = ResultsStore(out)
    road = store.read(table="road")
    store.write_part(road[road["method"] == "gradcam"].assign(road_version=0), table="road")
    sanity_rows = store.read(table="sanity")
    store.write_part(sanity_rows[sanity_rows["method"] == "random"].assign(sanity_version=0), table="sanity")
    with pytest.raises(StaleRowsError, match=r"road gradcam: 2.*sanity random: 8.*--recompute-stale"):
        run(load_config("smoke"), out=out, device="cpu", progress=False, only=["road", "sanity"])
    with pytest.raises(ConfigError, match="--only colour: this config has .*road.*sanity"):
        run(load_config("smoke"), out=out, device="cpu", progress=False, only=["colour"])
    assert loads == []


def test_explain_seed_changes_a_stochastic_map_and_equals_the_runners_row(reference: Path, tmp_path: Path) -> None:
    """`iscam explain IMG --method sscam --seed S` builds its map as the runner does: seeds 1 and 2 differ, and
    the config's seed gives the map the runner stored for that image."""
    from iscam import methods
    from iscam.explain import explain

    config = load_config("smoke")
    frame = _base(ResultsStore(reference).read(curves=False))
    row = frame[frame["method"] == "sscam"].iloc[0]
    image = Path(os.environ["ISCAM_DATA"]) / "imagenet-val-sample" / row["file"]
    spec = next(m for m in config.methods if m.name == "sscam")
    params = dict(spec.params)
    common = {"model": config.model.name, "method": "sscam", "params": params, "device": "cpu",
              "target_layer": config.model.target_layer}
    first = explain(image, out=tmp_path / "1.png", seed=1, **common)
    second = explain(image, out=tmp_path / "2.png", seed=2, **common)
    assert first.seed != second.seed and float((first.saliency - second.saliency).abs().max()) > 1e-3
    same = explain(image, out=tmp_path / "0.png", seed=config.seed, **common)
    height, width = (int(v) for v in row["map_shape"])
    stored = methods.reconstruct("sscam", torch.tensor(list(row["map"])).view(1, height, width), (128, 128),
                                 params)[0]
    assert same.target == int(row["target"])
    assert float((same.saliency - stored).abs().max()) <= 1e-5
