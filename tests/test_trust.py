"""Issue 11, results a reader can trust: each numbered point of the issue, through the command line.

Every test drives ``iscam.cli.main`` (or real ``iscam`` processes) on the real ``smoke`` config (the Coral
MobileNetV1 at 128 px, layer ``features.2``), kept small: ``--only base``, two to four images and, where the
method does not matter, ``methods=[gradcam, random]``. Stores that several tests read are built once per
module and copied before a test changes them.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from iscam import cli
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



# helpers shared below

@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the models loaded from now on (a run that fails up front loads none)."""
    from iscam import models

    loads: list[str] = []
    original = models.load
    monkeypatch.setattr(models, "load", lambda name, *a, **k: loads.append(name) or original(name, *a, **k))
    return loads


def _sample_rows(assets: Path, count: int) -> list[dict[str, str]]:
    with open(assets / SAMPLE / "manifest.csv", newline="") as handle:
        return [row for _, row in zip(range(count), csv.DictReader(handle))]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}



def test_explain_writes_its_png_and_map_as_ordinary_files(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           assets: Path, umask_022: None) -> None:
    image = assets / SAMPLE / _sample_rows(assets, 1)[0]["file"]
    status, out, _ = run_cli(capsys, "explain", image, "--model", "mobilenet_v1_coral_tiny", "--method", "gradcam",
                           "--out", tmp_path / "o.png", "--save-saliency", tmp_path / "map.npy", "--device", "cpu")
    assert status == 0 and f"wrote {tmp_path / 'o.png'}" in out
    assert _modes(tmp_path) == {"o.png": 0o644, "map.npy": 0o644}
    saliency = np.load(tmp_path / "map.npy")
    assert saliency.shape == (128, 128) and saliency.max() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# 6. A user's mistake is one line (exit status 2), never a traceback
# --------------------------------------------------------------------------------------------------

TINY = ["--model", "mobilenet_v1_coral_tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def image(assets: Path) -> Path:
    return assets / SAMPLE / _sample_rows(assets, 1)[0]["file"]


@pytest.mark.parametrize(("options", "named"), [
    (["--method", "gradcam", "--N", "5"], "method 'gradcam' has no parameter 'N'"),
    (["--method", "iscam", "--param", "foo=1"], "method 'iscam' has no parameter 'foo'"),
    (["--method", "iscam", "--param", "N=abc"], "N must be a positive int, got 'abc'"),
    (["--method", "fancycam"], "unknown method 'fancycam'"),
])
def test_explain_refuses_a_parameter_the_method_does_not_take_before_loading_the_model(
        image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, model_loads: list[str], options: list[str],
        named: str) -> None:
    status, out, err = run_cli(capsys, "explain", image, *TINY, *options, "--out", tmp_path / "o.png")
    assert status == 2 and out == ""
    one_line_error(err, "iscam explain: error: ", named)
    assert model_loads == [] and list(tmp_path.iterdir()) == []


def test_explain_names_the_users_out_path_never_a_temporary_file(
        image: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        model_loads: list[str]) -> None:
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path)
    assert status == 2
    one_line_error(err, f"--out {str(tmp_path)!r} is a folder")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", a_file / "o.png",
                           "--save-saliency", tmp_path / "map.npy")
    assert status == 2 and f"--out {str(a_file / 'o.png')!r}" in one_line_error(err)
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png",
                           "--save-saliency", tmp_path)
    assert status == 2 and f"--save-saliency {str(tmp_path)!r} is a folder" in one_line_error(err)
    assert model_loads == []
    # a folder the user cannot write to (simulated: this suite may run as root, who can write anywhere)
    real = tempfile.NamedTemporaryFile

    def refused(*args: object, **kwargs: object) -> object:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refused)
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png")
    line = one_line_error(err, f"--out {str(tmp_path / 'o.png')!r} cannot be written: Permission denied")
    assert status == 2 and ".tmp" not in line and ".probe" not in line and model_loads == []
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", real)
    # the folder turns read-only between the check and the write: the PNG is the file named, nothing is left
    monkeypatch.setattr("iscam.store.os.replace", refused)
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png")
    line = one_line_error(err, f"cannot write {tmp_path / 'o.png'}: Permission denied")
    assert status == 2 and ".tmp" not in line and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_cuda_without_a_gpu_is_one_line(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch, model_loads: list[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = run_cli(capsys, "explain", image, "--model", "mobilenet_v1_coral_tiny", "--method", "gradcam",
                           "--out", tmp_path / "o.png", "--device", "cuda")
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


def test_an_image_the_cli_cannot_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   model_loads: list[str]) -> None:
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


def test_a_cache_folder_that_is_a_file_is_one_line(image: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("ISCAM_CACHE", str(cache))
    status, _, err = run_cli(capsys, "explain", image, *TINY, "--method", "gradcam", "--out", tmp_path / "o.png")
    assert status == 2
    one_line_error(err, f"cache folder {str(cache)!r} (from $ISCAM_CACHE) is a file", "point ISCAM_CACHE at a folder")
