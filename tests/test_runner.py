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
               "-m", "iscam", "run", "smoke", "--out", str(out), "--no-progress", "--device", "cpu", *BASE]
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
