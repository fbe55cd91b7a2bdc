"""Issue 11, results a reader can trust: each numbered point of the issue, through the command line.

Every test drives ``iscam.cli.main`` (or real ``iscam`` processes) on the real ``smoke`` config (the Coral
MobileNetV1 at 128 px, layer ``features.2``), kept small: ``--only base``, two to four images and, where the
method does not matter, ``methods=[gradcam, random]``. Stores that several tests read are built once per
module and copied before a test changes them.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from iscam import cli, tables
from iscam.store import KEY_COLUMNS, ResultsStore

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "imagenet-val-sample"
CPU = ["--no-progress", "--device", "cpu"]
BASE = ["--only", "base"]
FAST = ["--set", "methods=[gradcam, random]"]  # where the method does not matter
SCORED = ["--set", "methods=[gradcam, scorecam, {name: iscam, params: {N: 2}}, random]"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


def run_cli(capsys: pytest.CaptureFixture, *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``iscam ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str, *named: str) -> str:
    """The single line a user's mistake prints (no traceback), which must name each of ``named``."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def table_counts(printed: str) -> dict[tuple[str, str], set[int]]:
    """(table title, method name) -> the n column of each table line printed by ``iscam table``."""
    counts: dict[tuple[str, str], set[int]] = {}
    title = ""
    for line in printed.splitlines():
        if line.startswith(("TABLE", "Win %")):
            title = line.split(".")[0]
        found = re.match(r"^(\S+)\s{2,}(.+?)\s{2,}(\d+)\s{2,}", line)
        if title and found and found.group(1) != "model":
            counts.setdefault((title, found.group(2)), set()).add(int(found.group(3)))
    return counts


def parts(folder: Path) -> list[Path]:
    return sorted((folder / "parts").glob("part-*.parquet")) if (folder / "parts").is_dir() else []


def raw_rows(folder: Path) -> pd.DataFrame:
    """Every row of every part file, duplicates included (what :meth:`ResultsStore.read` deduplicates)."""
    frames = [pq.read_table(p).to_pandas() for p in parts(folder)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(KEY_COLUMNS))


def planned_files(folder: Path) -> list[str]:
    """The base images of the latest run, as its run.json records them."""
    (base,) = [e for e in ResultsStore(folder).provenance()["plan"] if e["variant"] == ""]
    return base["files"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """Two runs into one folder: 8 images, then the config's own 4 (12 images in the store)."""
    out = tmp_path_factory.mktemp("merged") / "S"
    assert (
        cli.main(["run", "smoke", "--out", str(out), "--set", "data.num_images=8", *FAST, *BASE, *CPU]) == 0
    )
    assert cli.main(["run", "smoke", "--out", str(out), *FAST, *BASE, *CPU]) == 0
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """Grad-CAM, Score-CAM, IS-CAM (N=2) and the random baseline on 2 images."""
    out = tmp_path_factory.mktemp("scored") / "S"
    assert (
        cli.main(["run", "smoke", "--out", str(out), "--set", "data.num_images=2", *SCORED, *BASE, *CPU]) == 0
    )
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """Grad-CAM and the random baseline on 2 images."""
    out = tmp_path_factory.mktemp("small") / "S"
    assert (
        cli.main(["run", "smoke", "--out", str(out), "--set", "data.num_images=2", *FAST, *BASE, *CPU]) == 0
    )
    return out


def copy_of(store: Path, tmp_path: Path) -> Path:
    target = tmp_path / "S"
    shutil.copytree(store, target)
    return target


# --------------------------------------------------------------------------------------------------
# 1. Tables say exactly what they tabulate
# --------------------------------------------------------------------------------------------------


def test_merged_runs_in_one_folder_tabulate_the_configs_images(
    merged: Path, capsys: pytest.CaptureFixture
) -> None:
    frame = ResultsStore(merged).read()
    assert frame["file"].nunique() == 12  # 8 + 4 images in the folder ...
    status, out, _ = run_cli(capsys, "table", merged, "--n-boot", "50")
    assert status == 0
    assert "images: 4 of the 4 the config selects" in out and "INCOMPLETE" not in out
    counts = table_counts(out)
    assert counts[("TABLE I", "Grad-CAM")] == {4} and counts[("TABLE I", "Random")] == {4}  # ... 4 tabulated
    assert set().union(*counts.values()) == {4}
    files = planned_files(merged)
    gradcam = frame[(frame["method"] == "gradcam") & frame["file"].isin(files)]
    assert len(gradcam) == 4
    assert f"{100 * gradcam['insertion_auc'].mean():.2f} [" in out  # the mean over those 4, not the 12


def test_a_deleted_part_prints_the_paired_incomplete_notice_whose_command_completes_the_store(
    merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = copy_of(merged, tmp_path)
    files = planned_files(store)
    deleted = [
        p
        for p in parts(store)
        if set(pq.read_table(p, columns=["method", "file"]).to_pandas().itertuples(index=False, name=None))
        <= {("gradcam", f) for f in files}
    ]
    assert len(deleted) == 2  # the config's 4 images in 2 batches of 2
    lost = sorted(pq.read_table(deleted[0], columns=["file"]).to_pandas()["file"])
    deleted[0].unlink()
    status, out, _ = run_cli(capsys, "table", store, "--n-boot", "50")
    assert status == 0
    (notice,) = [line for line in out.splitlines() if line.startswith("INCOMPLETE")]
    assert f"gradcam lacks 2 of 4 images (e.g. {', '.join(lost)})" in notice
    assert "compare the methods on the 2 of 4 images every method has" in notice
    assert set().union(*table_counts(out).values()) == {2}  # paired: Random on Grad-CAM's 2 images only
    command = shlex.split(notice.split("Complete the store with: ", 1)[1])
    assert command[:3] == ["iscam", "run", "smoke"] and command[-2:] == ["--only", "base"]
    status, out, _ = run_cli(capsys, *command[1:])
    assert status == 0 and "smoke: 2 rows computed, 6 already present" in out
    status, out, _ = run_cli(capsys, "table", store, "--n-boot", "50")
    assert status == 0 and "INCOMPLETE" not in out and set().union(*table_counts(out).values()) == {4}


def test_a_table_says_when_the_latest_run_failed_or_may_still_be_running(
    scored: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = copy_of(scored, tmp_path)
    record = json.loads((store / "run.json").read_text())
    for status, expected in (("failed", "NOTE: the latest run on this store failed (ConfigError: boom)"),
                             ("running", "NOTE: a run on this store is in progress or was killed")):
        (store / "run.json").write_text(json.dumps({**record, "status": status, "error": "ConfigError: boom"}))
        code, out, _ = run_cli(capsys, "table", store, "--n-boot", "50")
        assert code == 0 and expected in out
    (store / "run.json").write_text(json.dumps(record))
    code, out, _ = run_cli(capsys, "table", store, "--n-boot", "50")
    assert code == 0 and "NOTE:" not in out


def test_a_table_of_rows_the_store_lacks_is_an_error_naming_them_and_the_command(
    scored: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = copy_of(scored, tmp_path)
    status, _, err = run_cli(capsys, "table", store, "--set", "methods.iscam.N=3")
    assert status == 2
    line = one_line_error(err, "no rows for iscam(N=3)", "2 images of config 'smoke'")
    command = shlex.split(line.split("compute them with: ", 1)[1])
    assert "methods.iscam.N=3" in command and command[-2:] == ["--only", "base"]
    status, out, _ = run_cli(capsys, *command[1:])
    assert status == 0 and "smoke: 2 rows computed, 6 already present" in out  # only IS-CAM at N=3
    status, out, _ = run_cli(capsys, "table", store, "--set", "methods.iscam.N=3", "--n-boot", "50")
    assert status == 0 and "INCOMPLETE" not in out
    frame = ResultsStore(store).read()
    at_3 = frame[(frame["method"] == "iscam") & frame["params_key"].str.contains('"N":3')]
    assert len(at_3) == 2 and f"{100 * at_3['insertion_auc'].mean():.2f} [" in out


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """One store, three setups of 2 images: layer features.2 and features.4 in fp32, features.2 in bf16."""
    out = tmp_path_factory.mktemp("setups") / "S"
    common = ["--out", str(out), "--set", "data.num_images=2", *FAST, *BASE, *CPU]
    assert cli.main(["run", "smoke", *common]) == 0
    assert cli.main(["run", "smoke", *common, "--set", "model.target_layer=features.4"]) == 0
    assert cli.main(["run", "smoke", *common, "--set", "precision=bf16"]) == 0
    return out


def _header_setup(printed: str) -> tuple[str, str]:
    found = re.search(r"layer: (\S+)\s+precision: (\S+)", printed)
    assert found, printed
    return found.group(1), found.group(2)


def test_a_store_of_several_layers_and_precisions_lists_each_with_a_command_that_tabulates_it(
    setups: Path, capsys: pytest.CaptureFixture
) -> None:
    frame = ResultsStore(setups).read()
    status, out, _ = run_cli(capsys, "table", setups, "--n-boot", "50")
    assert status == 0 and _header_setup(out) == ("features.2", "bf16")  # the latest run's setup
    shown = frame[(frame["precision"] == "bf16") & (frame["method"] == "gradcam")]
    assert f"{100 * shown['insertion_auc'].mean():.2f} [" in out
    others = [line for line in out.splitlines() if line.startswith("also in the store")]
    assert len(others) == 2, out
    wanted = {("features.2", "fp32"), ("features.4", "fp32")}
    for line in others:
        assert "rows with" in line and "read them with: " in line
        command = shlex.split(line.split("read them with: ", 1)[1])
        status, again, _ = run_cli(capsys, *command[1:], "--n-boot", "50")
        assert status == 0, again
        layer, precision = _header_setup(again)
        wanted.discard((layer, precision))
        rows = frame[
            (frame["layer"] == layer) & (frame["precision"] == precision) & (frame["method"] == "gradcam")
        ]
        assert len(rows) == 2 and f"{100 * rows['insertion_auc'].mean():.2f} [" in again
        assert set().union(*table_counts(again).values()) == {2}
    assert wanted == set()


@pytest.mark.parametrize("narrowed", ["layer", "precision"])
def test_the_message_that_suggests_narrowing_gives_a_command_that_works(
    setups: Path, capsys: pytest.CaptureFixture, narrowed: str
) -> None:
    frame = ResultsStore(setups).read(curves=False, maps=False)
    other = "precision" if narrowed == "layer" else "layer"
    mixed = frame[frame[other] == ("fp32" if other == "precision" else "features.2")]
    assert mixed[narrowed].nunique() == 2
    with pytest.raises(tables.TableError) as caught:
        tables.all_tables(mixed, n_boot=50)
    suggested = re.search(r"'iscam table RESULTS ((?:--set \S+ ?)+)'", str(caught.value))
    assert suggested, str(caught.value)
    status, out, _ = run_cli(capsys, "table", setups, *shlex.split(suggested.group(1)), "--n-boot", "50")
    assert status == 0, out
    assert set().union(*table_counts(out).values()) == {2}


# --------------------------------------------------------------------------------------------------
# 2. Resume never mixes incompatible rows
# --------------------------------------------------------------------------------------------------


def test_rows_of_another_algorithm_version_stop_the_run_until_recompute_stale(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iscam.methods import METHODS

    store = copy_of(small, tmp_path)
    before = parts(store)
    monkeypatch.setattr(METHODS["gradcam"], "algorithm_version", METHODS["gradcam"].algorithm_version + 1)
    command = ["run", "smoke", "--out", store, "--set", "data.num_images=2", *FAST, *BASE, *CPU]
    status, _, err = run_cli(capsys, *command)
    assert status == 2
    one_line_error(err, "gradcam: 2 rows", "--recompute-stale", str(store))
    assert parts(store) == before  # nothing computed
    status, out, _ = run_cli(capsys, *command, "--recompute-stale")
    assert status == 0 and "2 rows computed" in out and "recomputed 2 stale row(s)" in out
    frame = ResultsStore(store).read()
    assert set(frame.loc[frame["method"] == "gradcam", "algorithm_version"]) == {
        METHODS["gradcam"].algorithm_version
    }
    status, _, _ = run_cli(capsys, *command)
    assert status == 0  # the recomputed rows are current


def test_a_part_with_another_stamp_is_recomputed_and_the_table_uses_only_the_new_rows(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = copy_of(small, tmp_path)
    frame = ResultsStore(store).read()
    good = frame.loc[frame["method"] == "gradcam", "insertion_auc"].to_numpy()
    (old,) = [
        p
        for p in parts(store)
        if set(pq.read_table(p, columns=["method"]).to_pandas()["method"]) == {"gradcam"}
    ]
    rows = pq.read_table(old).to_pandas()
    rows["algorithm_version"] = 0  # computed by an older version of Grad-CAM, with other numbers
    rows["insertion_auc"] = 0.999
    old.unlink()
    ResultsStore(store).write_part(rows)
    command = ["run", "smoke", "--out", store, "--set", "data.num_images=2", *FAST, *BASE, *CPU]
    status, _, err = run_cli(capsys, *command)
    assert status == 2 and "gradcam: 2 rows" in one_line_error(err, "--recompute-stale")
    assert run_cli(capsys, *command, "--recompute-stale")[0] == 0
    assert (raw_rows(store)["insertion_auc"] == 0.999).sum() == 2  # the stale rows are still on disk ...
    status, out, _ = run_cli(capsys, "table", store, "--n-boot", "50")
    assert status == 0 and "99.90" not in out  # ... but never tabulated
    assert f"{100 * good.mean():.2f} [" in out


# --------------------------------------------------------------------------------------------------
# 3. Validate before computing
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the models loaded from now on (a run that fails up front loads none)."""
    from iscam import models

    loads: list[str] = []
    original = models.load
    monkeypatch.setattr(models, "load", lambda name, *a, **k: loads.append(name) or original(name, *a, **k))
    return loads


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("methods.iscam.N=abc", "N must be a positive int, got 'abc'"),
        ("methods.iscam.N=2.0", "N must be a positive int, got 2.0"),
        ("methods.iscam.N=0", "N must be positive, got 0"),
        ("methods.iscam.NN=3", "method 'iscam' has no parameter 'NN'"),
    ],
)
def test_a_bad_method_parameter_is_one_line_before_any_model_load_or_part(
    tmp_path: Path, capsys: pytest.CaptureFixture, model_loads: list[str], override: str, named: str
) -> None:
    out = tmp_path / "S"
    status, stdout, err = run_cli(capsys, "run", "smoke", "--out", out, "--set", override, *CPU)
    assert status == 2 and stdout == ""
    one_line_error(err, "iscam run: error: method ", named)
    assert model_loads == [] and not out.exists()  # no model, no part, not even the folder


def _sample_rows(assets: Path, count: int) -> list[dict[str, str]]:
    with open(assets / SAMPLE / "manifest.csv", newline="") as handle:
        return [row for _, row in zip(range(count), csv.DictReader(handle))]


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "width", "height", "boxes"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_bad_manifest_row_is_named_by_file_and_line_and_skip_reports_the_count(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path, model_loads: list[str]
) -> None:
    good = _sample_rows(assets, 2)
    manifest = _write_manifest(
        tmp_path / "mine.csv",
        [good[0], {**good[1], "label": "1000"}, {**good[1], "file": "x.JPEG", "width": "0"}],
    )
    command = [
        "run",
        "smoke",
        "--out",
        tmp_path / "S",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        f"data.image_dir={assets / SAMPLE}",
        *FAST,
        *BASE,
        *CPU,
    ]
    status, _, err = run_cli(capsys, *command)
    assert status == 2 and "Traceback" not in err and model_loads == []
    assert f"manifest {manifest}: 2 bad row(s) of 3" in err
    assert f"line 3 ({good[1]['file']}): label 1000 is outside 0..999" in err
    assert "line 4 (x.JPEG): width '0' is not a positive integer" in err  # was a ZeroDivisionError
    assert not parts(tmp_path / "S")
    status, out, _ = run_cli(capsys, *command, "--set", "data.on_bad_rows=skip")
    assert status == 0 and "skipped 2 bad manifest row(s) (data.on_bad_rows: skip)" in out
    assert sorted(ResultsStore(tmp_path / "S").read()["file"].unique()) == [good[0]["file"]]


def test_no_row_stores_a_nan_pointing_value(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path
) -> None:
    """An image without boxes and one whose only box falls outside the centre crop: null plus the reason."""
    (row,) = _sample_rows(assets, 1)
    wide = Image.open(assets / SAMPLE / row["file"]).convert("RGB").resize((256, 128))
    wide.save(tmp_path / "no_boxes.png")
    wide.save(tmp_path / "cropped_away.png")
    # 256x128 -> crop keeps columns 64..192: the box 0..20 is inside the image but outside the crop
    manifest = _write_manifest(
        tmp_path / "wide.csv",
        [
            {"file": "no_boxes.png", "label": row["label"], "width": "256", "height": "128", "boxes": ""},
            {
                "file": "cropped_away.png",
                "label": row["label"],
                "width": "256",
                "height": "128",
                "boxes": "0 0 20 128",
            },
        ],
    )
    status, _, _ = run_cli(
        capsys,
        "run",
        "smoke",
        "--out",
        tmp_path / "S",
        "--set",
        f"data.manifest={manifest}",
        *FAST,
        *BASE,
        *CPU,
    )
    assert status == 0
    table = pq.read_table(parts(tmp_path / "S"))
    pointing = table.column("pointing")
    assert table.num_rows == 4 and pointing.null_count == 4  # null, never NaN
    assert not pc.any(pc.is_nan(pointing.drop_null())).as_py()
    frame = table.to_pandas()
    assert set(frame.loc[frame["file"] == "no_boxes.png", "pointing_skip"]) == {"no boxes in the manifest"}
    assert frame[["y", "o", "insertion_auc", "deletion_auc"]].notna().all().all()


def test_a_box_outside_the_crop_is_reported_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path
) -> None:
    (row,) = _sample_rows(assets, 1)
    Image.open(assets / SAMPLE / row["file"]).convert("RGB").resize((256, 128)).save(tmp_path / "wide.png")
    manifest = _write_manifest(
        tmp_path / "wide.csv",
        [{"file": "wide.png", "label": row["label"], "width": "256", "height": "128", "boxes": "0 0 20 128"}],
    )
    assert (
        run_cli(
            capsys,
            "run",
            "smoke",
            "--out",
            tmp_path / "S",
            "--set",
            f"data.manifest={manifest}",
            "--set",
            "methods=[gradcam]",
            *BASE,
            *CPU,
        )[0]
        == 0
    )
    assert set(ResultsStore(tmp_path / "S").read()["pointing_skip"]) == {"every box outside the crop"}


def test_a_run_that_reads_no_image_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_cli(
        capsys,
        "run",
        "smoke",
        "--out",
        tmp_path / "S",
        "--set",
        f"data.image_dir={empty}",
        *FAST,
        *BASE,
        *CPU,
    )
    assert status == 2
    one_line_error(err, "none of the 300 images of", f"is in {empty}", "check data.image_dir")
    garbage = tmp_path / "garbage"  # every file there, none an image
    garbage.mkdir()
    rows = _sample_rows(assets, 2)
    for row in rows:
        (garbage / row["file"]).write_bytes(b"not a JPEG")
    manifest = _write_manifest(tmp_path / "two.csv", rows)
    status, _, err = run_cli(
        capsys,
        "run",
        "smoke",
        "--out",
        tmp_path / "G",
        "--set",
        f"data.manifest={manifest}",
        "--set",
        f"data.image_dir={garbage}",
        *FAST,
        *BASE,
        *CPU,
    )
    assert status == 2 and "Traceback" not in err
    assert f"no image of {manifest} could be read (from {garbage})" in err
    assert not parts(tmp_path / "G")
    # run.json says the run failed and why, not "running" forever
    record = json.loads((tmp_path / "G" / "run.json").read_text())
    assert record["status"] == "failed" and record["finished"]
    assert record["error"].startswith("ConfigError: no image of") and str(garbage) in record["error"]


# --------------------------------------------------------------------------------------------------
# 4. Concurrent use is safe (6 concurrent history writers, and compact beside a writer: tests/test_store.py)
# --------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _computed(stdout: str) -> int:
    found = re.search(r"smoke: (\d+) rows computed, (\d+) already present", stdout)
    assert found, stdout
    return int(found.group(1))


def test_two_runs_on_one_store_wait_for_each_other_and_compute_each_row_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path
) -> None:
    """Both runs start while the store is locked (by this test, standing in for a first run): each says it
    waits; once the lock is released one computes, the other computes only what is left. The test waits
    for states (the "waiting" line of each), never for a time."""
    out = tmp_path / "S"
    first_images = ["--set", "data.seed=null", *FAST, *BASE, *CPU]  # the manifest's first images
    commands = [
        [
            sys.executable,
            "-m",
            "iscam",
            "run",
            "smoke",
            "--out",
            str(out),
            "--set",
            f"data.num_images={n}",
            *first_images,
        ]
        for n in (2, 3)
    ]
    store = ResultsStore(out)
    processes = []
    with store.lock(owner="the test"):
        status, _, err = run_cli(capsys, "run", "smoke", "--out", out, "--no-wait", *first_images)
        assert status == 2 and f"is in use by pid {os.getpid()}: the test" in one_line_error(err)
        for command in commands:
            process = subprocess.Popen(
                command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            processes.append(process)
            seen = []
            for line in process.stderr:  # blocks until the run reaches the lock (or exits)
                seen.append(line)
                if "waiting for pid" in line:
                    break
            assert f"waiting for pid {os.getpid()}: the test" in "".join(seen), "".join(seen)
        assert not parts(out)
    results = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    computed = sorted(_computed(stdout) for stdout, _ in results)
    assert sum(computed) == 6 and computed in ([0, 6], [2, 4])  # 3 images x 2 methods, once
    rows = raw_rows(out)
    assert len(rows) == 6 and not rows.duplicated(list(KEY_COLUMNS)).any()


def test_a_second_run_that_will_not_wait_is_refused_naming_the_holder(
    small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = copy_of(small, tmp_path)
    before = parts(store)
    with ResultsStore(store).lock(owner="iscam run smoke --out S"):
        status, _, err = run_cli(
            capsys,
            "run",
            "smoke",
            "--out",
            store,
            "--no-wait",
            "--set",
            "data.num_images=3",
            *FAST,
            *BASE,
            *CPU,
        )
        assert status == 2
        one_line_error(err, f"{store} is in use by pid {os.getpid()}: iscam run smoke --out S")
        status, _, err = run_cli(capsys, "compact", store)
        assert status == 2 and "is in use by" in one_line_error(err)
    assert parts(store) == before


# --------------------------------------------------------------------------------------------------
# 5. Files are ordinary files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()
    }


def test_every_file_of_a_store_honours_the_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path, umask_022: None
) -> None:
    out = tmp_path / "S"
    assert (
        run_cli(
            capsys,
            "run",
            "smoke",
            "--out",
            out,
            "--set",
            "data.num_images=1",
            *FAST,
            "--only",
            "base,figures",
            "--compact",
            *CPU,
        )[0]
        == 0
    )
    modes = _modes(out)
    assert {"run.json", "runs.jsonl", ".lock"} <= set(modes)
    assert any(name.startswith("results-") for name in modes) and any(
        name.startswith("images-") for name in modes
    )
    assert set(modes.values()) == {0o644}, modes
    os.umask(0o027)
    assert (
        run_cli(capsys, "run", "smoke", "--out", out, "--set", "data.num_images=2", *FAST, *BASE, *CPU)[0]
        == 0
    )
    newer = {name: mode for name, mode in _modes(out).items() if name not in modes}
    assert newer and set(newer.values()) == {0o640}, newer


def test_explain_writes_its_png_and_map_as_ordinary_files(
    tmp_path: Path, capsys: pytest.CaptureFixture, assets: Path, umask_022: None
) -> None:
    image = assets / SAMPLE / _sample_rows(assets, 1)[0]["file"]
    status, out, _ = run_cli(
        capsys,
        "explain",
        image,
        "--model",
        "mobilenet_v1_coral_tiny",
        "--method",
        "gradcam",
        "--out",
        tmp_path / "o.png",
        "--save-saliency",
        tmp_path / "map.npy",
        "--device",
        "cpu",
    )
    assert status == 0 and f"wrote {tmp_path / 'o.png'}" in out
    assert _modes(tmp_path) == {"o.png": 0o644, "map.npy": 0o644}
    saliency = np.load(tmp_path / "map.npy")
    assert saliency.shape == (128, 128) and saliency.max() == pytest.approx(1.0)


def test_the_model_cache_honours_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assets: Path, umask_022: None
) -> None:
    from iscam import models

    monkeypatch.setenv("ISCAM_CACHE", str(tmp_path / "cache"))
    models.load("mobilenet_v1_coral_tiny", data_root=assets)
    entries = list((tmp_path / "cache").rglob("*.pt"))
    assert len(entries) == 1 and stat.S_IMODE(entries[0].stat().st_mode) == 0o644


# --------------------------------------------------------------------------------------------------
# 6. A user's mistake is one line (exit status 2), never a traceback
# --------------------------------------------------------------------------------------------------

TINY = ["--model", "mobilenet_v1_coral_tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def image(assets: Path) -> Path:
    return assets / SAMPLE / _sample_rows(assets, 1)[0]["file"]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--method", "gradcam", "--N", "5"], "method 'gradcam' has no parameter 'N'"),
        (["--method", "iscam", "--param", "foo=1"], "method 'iscam' has no parameter 'foo'"),
        (["--method", "iscam", "--param", "N=abc"], "N must be a positive int, got 'abc'"),
        (["--method", "fancycam"], "unknown method 'fancycam'"),
    ],
)
def test_explain_refuses_a_parameter_the_method_does_not_take_before_loading_the_model(
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    model_loads: list[str],
    options: list[str],
    named: str,
) -> None:
    status, out, err = run_cli(capsys, "explain", image, *TINY, *options, "--out", tmp_path / "o.png")
    assert status == 2 and out == ""
    one_line_error(err, "iscam explain: error: ", named)
    assert model_loads == [] and list(tmp_path.iterdir()) == []


def test_explain_names_the_users_out_path_never_a_temporary_file(
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model_loads: list[str],
) -> None:
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path)
    assert status == 2
    one_line_error(err, f"--out {str(tmp_path)!r} is a folder")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    status, _, err = run_cli(
        capsys,
        "explain",
        image,
        *TINY,
        "--method",
        "gradcam",
        "--out",
        a_file / "o.png",
        "--save-saliency",
        tmp_path / "map.npy",
    )
    assert status == 2 and f"--out {str(a_file / 'o.png')!r}" in one_line_error(err)
    status, _, err = run_cli(
        capsys,
        "explain",
        image,
        *TINY,
        "--method",
        "gradcam",
        "--out",
        tmp_path / "o.png",
        "--save-saliency",
        tmp_path,
    )
    assert status == 2 and f"--save-saliency {str(tmp_path)!r} is a folder" in one_line_error(err)
    assert model_loads == []
    # a folder the user cannot write to (simulated: this suite may run as root, who can write anywhere)
    real = tempfile.NamedTemporaryFile

    def refused(*args: object, **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
    status, _, err = run_cli(
        capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png"
    )
    line = one_line_error(err, f"--out {str(tmp_path / 'o.png')!r} cannot be written: Permission denied")
    assert status == 2 and ".tmp" not in line and ".probe" not in line and model_loads == []
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", real)
    # the folder turns read-only between the check and the write: the PNG is the file named, nothing is left
    monkeypatch.setattr("iscam.store.os.replace", refused)
    status, _, err = run_cli(
        capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png"
    )
    line = one_line_error(err, f"cannot write {tmp_path / 'o.png'}: Permission denied")
    assert status == 2 and ".tmp" not in line and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_cuda_without_a_gpu_is_one_line(
    image: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model_loads: list[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_cli(
        capsys,
        "explain",
        image,
        "--model",
        "mobilenet_v1_coral_tiny",
        "--method",
        "gradcam",
        "--out",
        tmp_path / "o.png",
        "--device",
        "cuda",
    )
    assert status == 2
    one_line_error(err, "device 'cuda' requested but torch sees no CUDA GPU", "--device cpu")
    status, _, err = run_cli(capsys, "run", "smoke", "--out", tmp_path / "S", "--device", "cuda")
    assert status == 2 and "--device cpu" in one_line_error(err, "iscam run: error: device 'cuda'")
    assert model_loads == [] and list(tmp_path.iterdir()) == []


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but holds none (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_an_image_the_cli_cannot_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, model_loads: list[str]
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(100_000, 100_000))
    out = ["--model", "mobilenet_v1_coral_tiny", "--method", "gradcam", "--out", tmp_path / "o.png"]
    status, _, err = run_cli(capsys, "explain", bomb, *out)
    assert status == 2
    one_line_error(err, f"cannot read image {str(bomb)!r}: 10,000,000,000 pixels", "decompression bomb")
    status, _, err = run_cli(capsys, "explain", tmp_path, *out)
    assert status == 2 and "does not exist" not in one_line_error(err, f"image {str(tmp_path)!r} is a folder")
    status, _, err = run_cli(capsys, "explain", tmp_path / "none.jpg", *out)
    assert status == 2 and "does not exist" in one_line_error(err, str(tmp_path / "none.jpg"))
    assert model_loads == []


def test_a_cache_folder_that_is_a_file_is_one_line(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("ISCAM_CACHE", str(cache))
    status, _, err = run_cli(
        capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png"
    )
    assert status == 2
    one_line_error(
        err, f"cache folder {str(cache)!r} (from $ISCAM_CACHE) is a file", "point ISCAM_CACHE at a folder"
    )
    status, _, err = run_cli(
        capsys, "run", "smoke", "--out", tmp_path / "S", "--set", "data.num_images=1", *FAST, *BASE, *CPU
    )
    assert status == 2 and "point ISCAM_CACHE at a folder" in one_line_error(err, str(cache))
    assert not parts(tmp_path / "S")


def _temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".probe"))]


def test_a_read_only_store_leaves_nothing_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, assets: Path
) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    out = tmp_path / "S"
    monkeypatch.setattr("iscam.store.os.replace", refused)  # what a read-only folder does to a rename
    status, _, err = run_cli(
        capsys, "run", "smoke", "--out", out, "--set", "data.num_images=2", *FAST, *BASE, *CPU
    )
    assert status == 2
    one_line_error(err, f"cannot write {out}", "Permission denied")
    assert _temporary_files(out) == [] and not parts(out) and not (out / "run.json").exists()
    monkeypatch.undo()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    status, _, err = run_cli(
        capsys, "run", "smoke", "--out", a_file, "--set", "data.num_images=2", *FAST, *CPU
    )
    assert status == 2
    one_line_error(err, f"the results folder {a_file} is a file, not a folder")


def test_a_full_disk_mid_run_leaves_no_temporary_file_and_the_rerun_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, assets: Path
) -> None:
    real = os.replace
    written: list[str] = []

    def disk_fills_after_one_part(source: str, target: str) -> None:
        if Path(target).name.startswith("part-"):
            if written:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(target)
        real(source, target)

    out = tmp_path / "S"
    command = ["run", "smoke", "--out", out, "--set", "data.num_images=2", *FAST, *BASE, *CPU]
    monkeypatch.setattr("iscam.store.os.replace", disk_fills_after_one_part)
    status, _, err = run_cli(capsys, *command)
    assert status == 2
    one_line_error(err, f"cannot write {out / 'parts'}", "No space left on device")
    assert len(parts(out)) == 1 and _temporary_files(out) == []
    monkeypatch.undo()
    status, printed, _ = run_cli(capsys, *command)
    assert status == 0 and "2 rows computed, 2 already present" in printed


def test_a_truncated_run_json_is_named(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = copy_of(small, tmp_path)
    text = (store / "run.json").read_text()
    (store / "run.json").write_text(text[: len(text) // 2])
    for command in ("table", "claims"):
        status, _, err = run_cli(capsys, command, store)
        assert status == 2
        one_line_error(
            err, f"{store / 'run.json'} is not a valid run record", "rewritten by the next 'iscam run'"
        )


def test_paper_weights_that_cannot_be_downloaded_name_the_weights_option(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)  # no network in tests
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached
    status, _, err = run_cli(
        capsys,
        "explain",
        image,
        "--model",
        "vgg16",
        "--method",
        "gradcam",
        "--out",
        tmp_path / "o.png",
        "--device",
        "cpu",
    )
    assert status == 2
    one_line_error(err, "vgg16", "cannot be downloaded", "--weights FILE")


# --------------------------------------------------------------------------------------------------
# iscam claims RESULTS
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(scored: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scored store plus its N sweep (IS-CAM at N = 1 and 3 on the same 2 images)."""
    out = tmp_path_factory.mktemp("swept") / "S"
    shutil.copytree(scored, out)
    assert (
        cli.main(
            [
                "run",
                "smoke",
                "--out",
                str(out),
                "--set",
                "data.num_images=2",
                *SCORED,
                "--only",
                "n_sweep",
                *CPU,
            ]
        )
        == 0
    )
    return out


def _claim_line(printed: str, claim: str) -> str:
    (line,) = [line for line in printed.splitlines() if line.startswith(claim + " ")]
    return line


def test_claims_judges_the_base_rows_paired_with_the_store_as_the_n_sweep(
    swept: Path, capsys: pytest.CaptureFixture
) -> None:
    from iscam.claims import CLAIMS

    frame = ResultsStore(swept).read()
    status, out, _ = run_cli(capsys, "claims", swept, "--n-boot", "200")
    assert status == 0
    assert "images: 2 of the 2 the config selects" in out and "INCOMPLETE" not in out
    for claim in CLAIMS:
        assert _claim_line(out, claim.id)
    # IS-CAM minus Score-CAM insertion AUC, in points, on the 2 paired images
    base = frame[frame["metrics_key"] == frame.loc[frame["method"] == "gradcam", "metrics_key"].iloc[0]]
    mine = base[(base["method"] == "iscam") & base["params_key"].str.contains('"N":2')].set_index("file")
    theirs = base[base["method"] == "scorecam"].set_index("file")
    diff = 100 * (mine["insertion_auc"] - theirs.loc[mine.index, "insertion_auc"]).mean()
    line = _claim_line(out, "insertion-close-scorecam")
    assert f"diff {diff:+.2f} [" in line and "not resolved at 2 images" in line
    assert "no scorecam rows" not in out
    # the whole store is the N sweep: the N claim is judged (N = 1 and 3 against the run's N = 2), not skipped
    sweep_line = _claim_line(out, "n-changes-metrics")
    assert "not evaluated" not in sweep_line and re.search(r"N=[13] vs N=2", sweep_line)
    # the maps of the sweep are in the store: "N barely changes the maps" is judged as the book judges it
    from iscam.book import _recorded, claims_table
    from iscam.claims import format_claims

    maps_line = _claim_line(out, "n-barely-changes-maps")
    assert "not evaluated" not in maps_line and re.search(r"N=[13] vs N=2", maps_line)
    book_table, similarity = claims_table([_recorded("smoke", swept, published=False)], n_boot=200)
    assert similarity is not None and set(similarity["N"]) == {1, 2, 3} and similarity["file"].nunique() == 2
    assert _claim_line(format_claims(book_table), "n-barely-changes-maps") == maps_line
    assert "not evaluated: no sscam rows" in _claim_line(out, "win-vs-sscam")
    # --margin reaches the equivalence claims: the images needed to resolve "close to" follow the margin
    status, wider, _ = run_cli(capsys, "claims", swept, "--n-boot", "200", "--margin", "25")
    needed = [
        re.search(r"~(\d+) would", _claim_line(text, "insertion-close-scorecam")) for text in (out, wider)
    ]
    assert status == 0 and all(needed) and needed[0].group(1) != needed[1].group(1), (line, wider)
    status, _, err = run_cli(capsys, "claims", swept, "--margin", "0")
    assert status == 2
    one_line_error(err, "iscam claims: error: margin must be a finite number > 0", "got 0.0")
    status, _, err = run_cli(capsys, "claims", swept, "--n-boot", "0")
    assert status == 2 and "n_boot must be a positive integer, got 0" in one_line_error(err)


def test_claims_on_rows_the_store_lacks_is_an_error(swept: Path, capsys: pytest.CaptureFixture) -> None:
    status, _, err = run_cli(capsys, "claims", swept, "--set", "methods.iscam.N=7")
    assert status == 2
    one_line_error(err, "no rows for iscam(N=7)", "compute them with: iscam run smoke")
