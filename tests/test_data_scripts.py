"""data_scripts/: --help, the committed paper list, manifest conversion, asset verification (tiny files)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_imagenet_layout

from iscam.data import ManifestDataset, Preprocess

SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"


def run(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a script's ``main(argv)`` in this process (a subprocess would re-import torch each time)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("script", ["select_paper_images.py", "imagenet_to_manifest.py", "fetch_assets.py"])
def test_help(script: str) -> None:
    result = run(script, "--help")
    assert result.returncode == 0 and "--data-root" in result.stdout


def test_scripts_run_standalone() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "fetch_assets.py"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "sha256" in result.stdout.lower()


def test_committed_paper_list_is_the_seeded_selection(tmp_path: Path) -> None:
    with open(SCRIPTS / "paper_2000.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2000 and len({r["file"] for r in rows}) == 2000
    assert [int(r["rank"]) for r in rows] == list(range(2000))
    expected = (
        np.random.default_rng(2020).permutation(50000)[:2000] + 1
    )  # the documented recipe, reimplemented
    assert [r["file"] for r in rows] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in expected]
    assert run("select_paper_images.py", "--check").returncode == 0
    other = tmp_path / "other.csv"
    assert run("select_paper_images.py", "--seed", "1", "--count", "5", "--out", other).returncode == 0
    assert run("select_paper_images.py", "--check", "--out", other).returncode == 1  # seed 2020 differs


def test_committed_paper_list_labels(assets: Path) -> None:
    """paper_2000.csv's labels: torchvision indices, equal to the shipped manifests' on the shared images."""
    with open(SCRIPTS / "paper_2000.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["rank", "file", "label"]
        labels = {r["file"]: int(r["label"]) for r in reader}
    assert len(labels) == 2000 and all(0 <= v <= 999 for v in labels.values())
    assert len(set(labels.values())) > 800  # 2000 uniform draws over 1000 classes cover ~865 of them
    known = {}
    for name in ("imagenet-val-sample", "imagenet-val-scorecam9"):
        with open(assets / name / "manifest.csv", newline="") as handle:
            known.update({r["file"]: int(r["label"]) for r in csv.DictReader(handle)})
    shared = sorted(set(known) & set(labels))
    assert len(shared) == 13  # the overlap of the two samples with our draw
    assert {f: labels[f] for f in shared} == {f: known[f] for f in shared}


def test_select_paper_images_synset_labels(tmp_path: Path) -> None:
    from iscam.data import imagenet_wnids

    wnids = imagenet_wnids()
    ground_truth = tmp_path / "validation_labels.txt"  # image n has class (n * 7) % 1000
    ground_truth.write_text("".join(f"{wnids[(n * 7) % 1000]}\n" for n in range(1, 50001)))
    out = tmp_path / "labelled.csv"
    result = run("select_paper_images.py", "--count", "2", "--synset-labels", ground_truth, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "not the recorded" in result.stderr  # SHA-256 differs from the public file's
    assert out.read_text().splitlines() == [
        "rank,file,label",
        f"0,ILSVRC2012_val_00007195.JPEG,{7195 * 7 % 1000}",
        f"1,ILSVRC2012_val_00040051.JPEG,{40051 * 7 % 1000}",
    ]
    check = ["select_paper_images.py", "--count", "2", "--check", "--out", out]
    check += ["--synset-labels", ground_truth]
    assert run(*check).returncode == 0
    out.write_text(out.read_text().replace(",365\n", ",366\n"))  # 7195 * 7 % 1000 == 365
    assert run(*check).returncode == 1  # --check compares the labels too
    short = tmp_path / "short.txt"
    short.write_text("n01440764\n")
    result = run("select_paper_images.py", "--synset-labels", short, "--out", tmp_path / "x.csv")
    assert result.returncode == 1 and not (tmp_path / "x.csv").exists()  # SystemExit: "expected 50000"
    both = run("select_paper_images.py", "--synset-labels", short, "--labels", short)
    assert both.returncode == 2 and "not allowed with" in both.stderr


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    return write_imagenet_layout(tmp_path, [
        (7195, (400, 300), "n01443537", [(101, 31, 300, 150)]),
        (40051, (200, 400), "n15075141", [(51, 151, 150, 250), (1, 1, 20, 20)]),
        (3, (64, 64), "n01440764", [(1, 1, 64, 64)]),
    ])


def test_imagenet_to_manifest(imagenet_root: Path, tmp_path: Path) -> None:
    result = run("imagenet_to_manifest.py", "--data-root", imagenet_root)
    assert result.returncode == 0, result.stderr
    manifest = imagenet_root / "ILSVRC2012_img_val" / "manifest.csv"
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {
            "file": "ILSVRC2012_val_00000003.JPEG",
            "label": "0",
            "width": "64",
            "height": "64",
            "boxes": "0 0 64 64",
        },
        {
            "file": "ILSVRC2012_val_00007195.JPEG",
            "label": "1",
            "width": "400",
            "height": "300",
            "boxes": "100 30 300 150",
        },
        {
            "file": "ILSVRC2012_val_00040051.JPEG",
            "label": "999",
            "width": "200",
            "height": "400",
            "boxes": "50 150 150 250;0 0 20 20",
        },
    ]
    sample = ManifestDataset(manifest, Preprocess(224))[1]
    torch.testing.assert_close(sample.boxes, torch.tensor([[37.5, 22.4, 186.5, 112.0]]), atol=1e-4, rtol=0)

    subset = tmp_path / "subset.csv"
    subset.write_text("rank,file\n0,ILSVRC2012_val_00040051.JPEG\n")
    out = tmp_path / "paper.csv"
    assert (
        run(
            "imagenet_to_manifest.py", "--data-root", imagenet_root, "--files", subset, "--out", out
        ).returncode
        == 0
    )
    assert out.read_text().splitlines()[1:] == [
        "ILSVRC2012_val_00040051.JPEG,999,200,400,50 150 150 250;0 0 20 20"
    ]

    labelled = tmp_path / "labelled.csv"
    assert (
        run(
            "select_paper_images.py", "--count", "2", "--data-root", imagenet_root, "--out", labelled
        ).returncode
        == 0
    )
    assert labelled.read_text().splitlines() == [
        "rank,file,label",
        "0,ILSVRC2012_val_00007195.JPEG,1",
        "1,ILSVRC2012_val_00040051.JPEG,999",
    ]


def test_imagenet_to_manifest_errors(imagenet_root: Path, tmp_path: Path) -> None:
    (imagenet_root / "ILSVRC2012_bbox_val_v3" / "val" / "ILSVRC2012_val_00000003.xml").unlink()
    result = run("imagenet_to_manifest.py", "--data-root", imagenet_root)
    assert result.returncode == 1 and "ILSVRC2012_val_00000003.xml" in result.stderr
    result = run("imagenet_to_manifest.py", "--data-root", tmp_path / "nowhere")
    assert result.returncode == 1 and "folder not found" in result.stderr


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_assets_copies_verifies_and_downloads(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "models").mkdir(parents=True)
    (source / "imagenet-val-sample").mkdir()
    files = {"models/a.tflite": b"model bytes", "imagenet-val-sample/x.JPEG": b"jpeg bytes"}
    for rel, data in files.items():
        (source / rel).write_bytes(data)
    hashes = tmp_path / "hashes.csv"
    hashes.write_text("path,sha256,bytes\n" + "".join(f"{r},{_sha(d)},{len(d)}\n" for r, d in files.items()))

    root = tmp_path / "root"
    result = run("fetch_assets.py", "--data-root", root, "--source", source, "--hashes", hashes)
    assert result.returncode == 0, result.stderr
    assert "2 copied/linked" in result.stdout and "2 verified" in result.stdout
    assert (root / "models" / "a.tflite").read_bytes() == b"model bytes"

    (root / "imagenet-val-sample" / "x.JPEG").write_bytes(b"jpeg bytes, damaged")
    (root / "models" / "a.tflite").unlink()
    result = run("fetch_assets.py", "--data-root", root, "--hashes", hashes)
    assert result.returncode == 1
    assert "missing: models/a.tflite" in result.stderr and "WRONG SHA-256" in result.stderr
    assert (
        root / "imagenet-val-sample" / "x.JPEG"
    ).read_bytes() == b"jpeg bytes, damaged"  # never overwritten

    (root / "imagenet-val-sample" / "x.JPEG").unlink()
    result = run(
        "fetch_assets.py",
        "--data-root",
        root,
        "--hashes",
        hashes,
        "--download",
        "--url-base",
        (source / "models").as_uri(),
    )
    assert result.returncode == 1  # models can be downloaded, images cannot
    assert "1 downloaded" in result.stdout and "missing: imagenet-val-sample/x.JPEG" in result.stderr
    assert (root / "models" / "a.tflite").read_bytes() == b"model bytes"
    result = run("fetch_assets.py", "--data-root", root, "--source", source, "--hashes", hashes, "--link")
    assert result.returncode == 0, result.stderr
    assert (root / "imagenet-val-sample" / "x.JPEG").is_symlink()


def test_fetch_assets_verifies_the_shared_assets(assets: Path) -> None:
    result = run("fetch_assets.py", "--data-root", assets)
    assert result.returncode == 0, result.stderr
    assert "317 files listed" in result.stdout and "317 verified" in result.stdout


def test_fetch_assets_make_mirror_and_download_from_it(assets: Path, tmp_path: Path) -> None:
    """The full registry round trip: publish the flat mirror of the shared assets, fetch a fresh root from it."""
    mirror = tmp_path / "mirror"
    result = run("fetch_assets.py", "--data-root", assets, "--make-mirror", mirror)
    assert result.returncode == 0, result.stderr
    assert "315 files" in result.stdout and len(list(mirror.iterdir())) == 315  # 317 less the 2 packaged manifests
    root = tmp_path / "root"
    result = run("fetch_assets.py", "--data-root", root, "--download", "--url-base", mirror.as_uri())
    assert result.returncode == 0, result.stderr
    assert "2 copied/linked, 315 downloaded, 317 verified, 0 missing" in result.stdout
    assert result.stdout.count("downloading file://") == 315
    assert run("fetch_assets.py", "--data-root", root).stdout.count("downloading") == 0  # all present

    (mirror / "ILSVRC2012_val_00000057.JPEG").write_bytes(b"damaged")
    (root / "imagenet-val-scorecam9" / "ILSVRC2012_val_00000057.JPEG").unlink()
    result = run("fetch_assets.py", "--data-root", root, "--download", "--url-base", mirror.as_uri())
    assert result.returncode == 1
    assert "failed: imagenet-val-scorecam9/ILSVRC2012_val_00000057.JPEG: SHA-256" in result.stderr
    assert not (root / "imagenet-val-scorecam9" / "ILSVRC2012_val_00000057.JPEG").exists()
    both = run(
        "fetch_assets.py", "--data-root", root, "--make-mirror", mirror, "--hashes", tmp_path / "x.csv"
    )
    assert both.returncode == 2 and "cannot be combined with --hashes" in both.stderr
    bad_base = run("fetch_assets.py", "--data-root", root, "--download", "--url-base", "mirror/")
    assert bad_base.returncode == 2 and "must be an http://, https:// or file:// URL" in bad_base.stderr


def test_fetch_assets_needs_a_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISCAM_DATA")
    result = run("fetch_assets.py")
    assert result.returncode == 2 and "no data root" in result.stderr
