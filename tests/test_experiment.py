"""Configs, the results store, and the runner's promises: resumable after SIGKILL, incremental when a
parameter changes, identical under torchrun. The runner tests use the real ``smoke`` config (Coral
MobileNetV1 on 4 sample images) and share one uninterrupted reference run."""

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

from iscam import experiment
from iscam.experiment import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    image_seed,
    load_config,
    parse_override,
    resolved_params,
    run,
    select_indices,
)
from iscam.store import KEY_COLUMNS, ROW_COLUMNS, TIMING_COLUMNS, ResultsStore, StoreError, params_key

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("paper-vgg16", "paper-resnet18", "paper-squeezenet", "smoke", "quick", "mobilenet")


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate_and_run_every_method_with_the_random_baseline(name: str) -> None:
    config = load_config(name)
    assert config.name == name
    names = [m.name for m in config.methods]
    assert names == ["gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam", "iscam", "random"]
    assert config_from_dict(config.to_dict()) == config
    for spec in config.methods:  # every parameter exists in the methods module
        resolved_params(spec.name, spec.params)


def test_paper_configs_use_the_documented_n_and_sigma() -> None:
    for name in ("paper-vgg16", "paper-resnet18", "paper-squeezenet", "quick", "mobilenet"):
        config = load_config(name)
        params = {m.name: dict(m.params) for m in config.methods}
        assert params["iscam"] == {"N": 10, "schedule": "authors"}
        assert params["sscam"] == {"N": 15, "sigma": 2.0}
        assert config.metrics.insertion == {"step": 224, "substrate": "blur"}
        assert config.metrics.deletion == {"step": 224, "substrate": "zeros"}
    assert load_config("paper-resnet18").model.name == "resnet18"
    assert load_config("paper-squeezenet").model.name == "squeezenet1_0"
    assert load_config("quick").data.num_images == 100


def test_overrides_are_dotted_yaml_values() -> None:
    config = load_config("smoke", ["data.num_images=20", "methods.iscam.N=15", "metrics.insertion.substrate=zeros",
                                   "device=cpu", "methods.sscam.params.sigma=0.5"])
    assert config.data.num_images == 20
    assert dict(next(m for m in config.methods if m.name == "iscam").params) == {"N": 15, "schedule": "authors"}
    assert dict(next(m for m in config.methods if m.name == "sscam").params)["sigma"] == 0.5
    assert config.metrics.insertion == {"step": 2048, "substrate": "zeros"}
    assert config.device == "cpu"
    assert parse_override("methods=[gradcam, random]") == (["methods"], ["gradcam", "random"])
    replaced = load_config("smoke", ["methods=[gradcam, {name: iscam, params: {N: 3}}]"])
    assert [(m.name, dict(m.params)) for m in replaced.methods] == [("gradcam", {}), ("iscam", {"N": 3})]
    by_position = load_config("smoke", ["methods.5.N=7"])
    assert dict(by_position.methods[5].params)["N"] == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("colour=red", "unknown key 'colour'"),
        ("data.num_imgs=3", "unknown key 'data.num_imgs'"),
        ("data.num_images=many", "data.num_images must be an integer"),
        ("data.num_images=0", "data.num_images must be >= 1"),
        ("methods.fancycam.N=3", "no method 'fancycam'"),
        ("methods.iscam.M=3", "method 'iscam' has no parameter 'M'"),
        ("methods.iscam.N", "expected key=value"),
        ("metrics.insertion.substrate=noise", "metrics.insertion.substrate must be one of zeros, blur"),
        ("metrics.insertion.steps=3", "unknown key"),
        ("precision=fp8", "precision must be one of fp32, bf16"),
        ("methods.iscam.seed=3", "set by the runner"),
        ("data.num_images=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config = load_config("smoke", [override])
        for spec in config.methods:
            resolved_params(spec.name, spec.params)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_the_runner_forwards_in_the_config_precision(precision: str, dtype: torch.dtype) -> None:
    """Targets and metric frames run in the precision the methods use (fp16 once ran metrics in fp32)."""
    from iscam.runner import _autocast

    with _autocast(torch.device("cpu"), precision):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with _autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_config_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config 'smok'.*paper-vgg16.*smoke"):
        load_config("smok")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: vgg16}\nmethods: [gradcam]\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'batch_sise'"):
        load_config(bad)
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("name: x\nmodel: vgg16\nmethods: [gradcam, {name: iscam, params: {N: 2}}, "
                          "{name: iscam, params: {N: 2}}]\n")
    with pytest.raises(ConfigError, match=r"iscam\(N=2\) is listed twice"):
        load_config(duplicated)
    ambiguous = tmp_path / "sweep.yaml"
    ambiguous.write_text("name: sweep\nmodel: vgg16\nmethods: [{name: iscam, params: {N: 2}}, "
                         "{name: iscam, params: {N: 5}}]\n")
    assert [m.params["N"] for m in load_config(ambiguous).methods] == [2, 5]
    with pytest.raises(ConfigError, match="2 methods are named 'iscam'.*methods.0"):
        load_config(ambiguous, ["methods.iscam.N=3"])


def test_params_key_fills_method_defaults_and_seeds_only_stochastic_methods() -> None:
    config = load_config("smoke")
    explicit = experiment.MethodSpec("iscam", {"N": 10, "schedule": "authors"})
    implicit = experiment.MethodSpec("iscam", {})
    assert config.method_key(explicit) == config.method_key(implicit)
    assert json.loads(config.method_key(implicit))["N"] == 10
    assert config.method_key(experiment.MethodSpec("iscam", {"N": 15})) != config.method_key(implicit)
    random_key = json.loads(config.method_key(experiment.MethodSpec("random", {})))
    assert random_key == {"seed": 0}
    assert "seed" not in json.loads(config.method_key(implicit))
    assert params_key({"b": 1, "a": [1, 2.5]}) == '{"a":[1,2.5],"b":1}'


def test_image_selection_and_seeds_are_stable() -> None:
    spec = experiment.DataSpec(num_images=5, seed=3)
    chosen = select_indices(300, spec)
    assert chosen == sorted(chosen) and len(set(chosen)) == 5 and chosen == select_indices(300, spec)
    assert select_indices(300, experiment.DataSpec(num_images=5, seed=None)) == [0, 1, 2, 3, 4]
    assert select_indices(4, experiment.DataSpec(num_images=10, seed=0)) == [0, 1, 2, 3]
    assert image_seed(0, "sscam", "a.JPEG") == image_seed(0, "sscam", "a.JPEG")
    assert len({image_seed(0, "sscam", "a.JPEG"), image_seed(1, "sscam", "a.JPEG"),
                image_seed(0, "random", "a.JPEG"), image_seed(0, "sscam", "b.JPEG")}) == 4
    assert 0 <= image_seed(7, "random", "x") < 2**63


# --------------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------------

def _rows(files: list[str], method: str = "gradcam", value: float = 0.5) -> list[dict]:
    rows = []
    for i, file in enumerate(files):
        row = dict(zip(KEY_COLUMNS, (file, "m", "default", "crop", "layer", "fp32", method, "{}", "{}")))
        row.update(index=i, label=1, target=1, correct=True, y=0.9, o=value, drop=0.1, increase=0.0, change=0.1,
                   insertion_auc=0.4, deletion_auc=0.2, pointing=0.3, insertion_curve=[0.1, 0.2],
                   deletion_curve=[0.3, 0.1], method_seconds=0.1, metric_seconds=0.2, forward_count=1, rank=0)
        rows.append(row)
    return rows


def test_store_parts_are_atomic_and_readers_ignore_leftover_temporary_files(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "res")
    assert not store.exists() and store.read().empty and store.keys() == set()
    store.write_part(_rows(["a", "b"]))
    store.write_part(_rows(["c"], method="iscam"))
    # what a writer killed mid-write leaves behind: a partial temporary file
    (store.parts_dir / ".part-r000-x.parquet.abc.tmp").write_bytes(b"PAR1 truncated")
    frame = store.read()
    assert list(frame["file"]) == ["a", "b", "c"] and list(frame["method"]) == ["gradcam", "gradcam", "iscam"]
    assert list(frame["insertion_curve"][0]) == [0.1, 0.2]
    assert len(store.keys()) == 3
    with pytest.raises(StoreError, match="same key twice"):
        store.write_part(_rows(["a", "a"]))
    store.compact()
    assert store.part_files() == [] and store.compact_path.is_file()
    assert not list(store.parts_dir.glob("*.tmp"))
    pd.testing.assert_frame_equal(store.read(), frame)
    # a compaction killed between its rename and deleting the parts leaves duplicates: read() drops them
    store.write_part(_rows(["a", "b"]))
    assert len(store.read()) == 3
    (store.parts_dir / "part-r000-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(StoreError, match="part-r000-broken.parquet"):
        store.read()


def test_provenance_keeps_history(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write_provenance({"run": 1})
    store.write_provenance({"run": 2})
    assert store.provenance() == {"run": 2}
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines] == [1, 2]


# --------------------------------------------------------------------------------------------------
# runner (real smoke config)
# --------------------------------------------------------------------------------------------------

COMPARED = [c for c in ROW_COLUMNS if c not in TIMING_COLUMNS]


def assert_same_rows(actual: pd.DataFrame, expected: pd.DataFrame, *, atol: float = 1e-6) -> None:
    """Row for row equality of two stores, timing columns excluded, floats within ``atol``."""
    actual = actual[COMPARED].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    expected = expected[COMPARED].sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
    assert len(actual) == len(expected)
    for column in COMPARED:
        a, e = actual[column], expected[column]
        if column.endswith("_curve"):
            np.testing.assert_allclose(np.stack(a.map(np.asarray)), np.stack(e.map(np.asarray)), atol=atol,
                                       rtol=0, err_msg=column)
        elif pd.api.types.is_float_dtype(e):
            np.testing.assert_allclose(a.to_numpy(), e.to_numpy(), atol=atol, rtol=0, err_msg=column)
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """An uninterrupted, in-process run of the smoke config."""
    out = tmp_path_factory.mktemp("reference") / "smoke"
    threads = torch.get_num_threads()
    torch.set_num_threads(COMPARED_THREADS)
    try:
        summary = run(load_config("smoke"), out=out, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary.rows_written == 4 * 7 and summary.rows_skipped == 0 and not summary.images_skipped
    return out


def test_reference_run_has_every_row_metric_and_provenance(reference: Path) -> None:
    frame = ResultsStore(reference).read()
    assert len(frame) == 28 and frame["file"].nunique() == 4
    assert sorted(frame["method"].unique()) == sorted(["gradcam", "gradcampp", "smoothgradcampp", "scorecam",
                                                       "sscam", "iscam", "random"])
    assert set(frame["layer"]) == {"features.2"} and set(frame["model"]) == {"mobilenet_v1_coral_tiny"}
    for column in ("y", "o", "drop", "increase", "insertion_auc", "deletion_auc", "pointing"):
        values = frame[column].to_numpy(dtype=float)
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1 + 1e-6).all(), column
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
    provenance = ResultsStore(reference).provenance()
    assert provenance["config"] == load_config("smoke").to_dict()
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["device"].startswith("cpu")
    assert provenance["world_size"] == 1 and provenance["rows_written"] == 28
    assert set(provenance["seconds_per_image"]) == {m.label() for m in load_config("smoke").methods}
    assert provenance["started"] <= provenance["finished"]


def test_rerun_computes_nothing_and_a_new_n_adds_only_its_rows(reference: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "smoke"
    shutil.copytree(reference, out)
    created = []
    original_get = experiment_methods_get()

    def recording_get(name, model, target_layer=None, **kwargs):
        cam = original_get(name, model, target_layer, **kwargs)
        created.append((name, kwargs, cam))
        return cam

    monkeypatch.setattr("iscam.methods.get", recording_get)
    again = run(load_config("smoke"), out=out, device="cpu", progress=False)
    assert again.rows_written == 0 and again.rows_skipped == 28 and created == []

    before = ResultsStore(out).read()
    summary = run(load_config("smoke", ["methods.iscam.N=3"]), out=out, device="cpu", progress=False)
    after = ResultsStore(out).read()
    assert summary.rows_written == 4 and summary.rows_skipped == 24
    assert {name for name, _, _ in created} == {"iscam"} and all(kw["N"] == 3 for _, kw, _ in created)
    new = after[~after.set_index(list(KEY_COLUMNS)).index.isin(before.set_index(list(KEY_COLUMNS)).index)]
    assert len(new) == 4 and set(new["method"]) == {"iscam"}
    assert {json.loads(k)["N"] for k in new["params_key"]} == {3}
    # the forward passes spent are exactly those of the 4 new IS-CAM rows: 1 clean pass + 3 per scored channel
    assert sum(cam.forward_count for _, _, cam in created) == new["forward_count"].sum()
    assert ((new["forward_count"] - 1) % 3 == 0).all() and (new["forward_count"] <= 1 + 3 * 32).all()
    assert_same_rows(after.merge(before[list(KEY_COLUMNS)], on=list(KEY_COLUMNS)), before, atol=0)


def experiment_methods_get():
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
        process = subprocess.Popen(_smoke(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
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
        stdout, stderr = process.communicate(timeout=120)
        if sig == signal.SIGINT:
            assert process.returncode == 130, stderr[-2000:]
            assert "resume with: iscam run smoke" in stderr
        else:
            assert process.returncode == -signal.SIGKILL
        ResultsStore(out).read()  # never corrupt, whatever was in flight
    # the SIGINT and at least one SIGKILL hit a running process, after it had written some parts
    assert delivered[:2] == [signal.SIGINT, signal.SIGKILL], f"interruptions delivered: {delivered}"
    assert _parts(out) > 0, "the interruptions did not fall inside the run"
    finished = subprocess.run(_smoke(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_rows(ResultsStore(out).read(), ResultsStore(reference).read())


def test_torchrun_two_cpu_processes_write_the_same_store_as_one(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "iscam", "run", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = ResultsStore(out).read()
    assert set(frame["rank"]) == {0, 1}
    # rank r writes its own parts: batch j of 2 images goes to rank j % 2
    for rank in (0, 1):
        assert list(out.glob(f"parts/part-r{rank:03d}-*.parquet"))
    provenance = ResultsStore(out).provenance()
    assert provenance["world_size"] == 2 and provenance["rows_written"] == 28
    assert_same_rows(frame, ResultsStore(reference).read())
