"""iscam.fetch: the registry, a hash-verified fetch from a mirror on 127.0.0.1, refusals, no re-downloads."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from conftest import Mirror

from iscam import fetch

REPO = Path(__file__).resolve().parents[1]


def _by_path() -> dict[str, fetch.Asset]:
    return {a.path: a for a in fetch.registry()}


def test_registry_lists_the_data_root() -> None:
    assets = fetch.registry()
    groups = [a.group for a in assets]
    assert len(assets) == 317
    assert (groups.count("models"), groups.count("sample"), groups.count("scorecam9")) == (6, 301, 10)
    by_url = {kind: sorted(a.path for a in assets if a.url == kind) for kind in (fetch.PACKAGE, fetch.MIRROR)}
    assert by_url[fetch.PACKAGE] == [
        "imagenet-val-sample/manifest.csv",
        "imagenet-val-scorecam9/manifest.csv",
    ]
    assert len(by_url[fetch.MIRROR]) == 309 and all(p.endswith(".JPEG") for p in by_url[fetch.MIRROR])
    public = [a for a in assets if a.url not in (fetch.PACKAGE, fetch.MIRROR)]
    assert [a.name for a in public] == [
        "mobilenet_v2_1.0_224_quant.tflite",
        "mobilenet_v1_0.25_128_quant.tflite",
        "compressed_SqueezeNet_v1.0.net",
        "SqueezeNet_v1.0_deploy.prototxt",
        "squeezenet_v1.1.ncnn.param",
        "squeezenet_v1.1.ncnn.bin",
    ]
    assert all(a.url.startswith("https://github.com/") for a in public)
    # The SqueezeNet files come from the commits named in shared/assets/README.md.
    assert (
        sum("/raw/fb13faa/" in a.url for a in public) == 2
        and sum("/raw/0392c1c" in a.url for a in public) == 2
    )


def test_packaged_files_are_the_registry_files() -> None:
    """The labels and manifests ship in the package with the registry's hashes; the manifests list the images."""
    assets = _by_path()
    data = resources.files("iscam.resources").joinpath("data")
    for asset in (a for a in assets.values() if a.url == fetch.PACKAGE):
        blob = data.joinpath(*asset.path.split("/")).read_bytes()
        assert (hashlib.sha256(blob).hexdigest(), len(blob)) == (asset.sha256, asset.size), asset.path
    for folder, count in (("imagenet-val-sample", 300), ("imagenet-val-scorecam9", 9)):
        text = data.joinpath(folder, "manifest.csv").read_text(encoding="utf-8")
        rows = list(csv.DictReader(text.splitlines()))
        assert len(rows) == count
        assert sorted(f"{folder}/{r['file']}" for r in rows) == sorted(
            p for p in assets if p.startswith(folder + "/") and p.endswith(".JPEG")
        )


def test_fetch_from_a_mirror_on_localhost(
    tmp_path: Path, assets: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = fetch.build_mirror(assets, mirror.folder, what=("models", "scorecam9"), link=True)
    assert len(written) == 6 + 9  # the labels and the manifest ship in the package
    monkeypatch.setenv(fetch.DOWNLOAD_ENV, mirror.url + "/")
    fresh = tmp_path / "fresh"
    root = fetch.ensure_assets(fresh, what=("models", "scorecam9"))
    assert root == fresh.resolve()
    assert sorted(mirror.requests) == sorted(f"/{p.name}" for p in written)
    expected = fetch.select(fetch.registry(), ("models", "scorecam9"))
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert found == sorted(a.path for a in expected)
    for asset in expected:
        assert fetch.sha256(root / asset.path) == asset.sha256, asset.path
    # the Coral class-name list is read by no code here: it is neither shipped nor fetched
    assert not (root / "models" / "imagenet_labels.txt").exists()

    stamps = {a.path: (root / a.path).stat().st_mtime_ns for a in expected}
    mirror.requests.clear()
    assert fetch.ensure_assets(fresh, what=("models", "scorecam9")) == root
    assert mirror.requests == []  # present and valid: nothing is downloaded again
    assert {a.path: (root / a.path).stat().st_mtime_ns for a in expected} == stamps


def test_a_corrupted_mirrored_file_is_refused(
    tmp_path: Path, assets: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch.build_mirror(assets, mirror.folder, what="scorecam9", link=True)
    bad = mirror.folder / "ILSVRC2012_val_00000073.JPEG"
    bad.unlink()
    bad.write_bytes(b"not the JPEG")
    monkeypatch.setenv(fetch.DOWNLOAD_ENV, mirror.url)
    root = tmp_path / "fresh"
    rel = "imagenet-val-scorecam9/ILSVRC2012_val_00000073.JPEG"
    with pytest.raises(fetch.ChecksumError) as caught:
        fetch.ensure_assets(root, what="scorecam9")
    error = caught.value
    actual = hashlib.sha256(b"not the JPEG").hexdigest()
    assert (error.path, error.expected, error.actual) == (rel, _by_path()[rel].sha256, actual)
    message = str(error)
    assert rel in message and error.expected in message and actual in message and "refused" in message
    assert not (root / rel).exists()  # nothing was written for it
    assert len(list((root / "imagenet-val-scorecam9").glob("*.JPEG"))) == 8  # the other files are there
    assert "/ILSVRC2012_val_00000073.JPEG" in mirror.requests

    # Mended mirror: only the refused file is fetched.
    shutil.copyfile(assets / rel, bad)
    mirror.requests.clear()
    fetch.ensure_assets(root, what="scorecam9")
    assert mirror.requests == ["/ILSVRC2012_val_00000073.JPEG"]


def test_wrong_local_files_are_never_overwritten(tmp_path: Path, mirror: Mirror) -> None:
    root = tmp_path / "root"
    own = root / "models" / "SqueezeNet_v1.0_deploy.prototxt"
    own.parent.mkdir(parents=True)
    own.write_text("background\n")
    report = fetch.sync(root, fetch.select(fetch.registry(), "models"), download=False)
    assert [e.path for e in report.wrong] == ["models/SqueezeNet_v1.0_deploy.prototxt"]
    assert report.wrong[0].actual == hashlib.sha256(b"background\n").hexdigest()
    assert own.read_text() == "background\n"  # kept: it may be the user's own file
    assert sorted(report.missing) == sorted(
        a.path for a in fetch.select(fetch.registry(), "models") if a.path != str(own.relative_to(root))
    )
    with pytest.raises(fetch.FetchError, match="6 of 6 files not usable") as caught:
        fetch.ensure_assets(root, what="models", base=mirror.url)  # the empty mirror has none of them
    assert "models/SqueezeNet_v1.0_deploy.prototxt: SHA-256" in str(caught.value)
    assert "404" in str(caught.value) and own.read_text() == "background\n"


def test_bad_arguments_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="'nope'"):
        fetch.ensure_assets(root, what=("models", "nope"))
    with pytest.raises(ValueError, match="must name groups"):
        fetch.ensure_assets(root, what=())
    with pytest.raises(ValueError, match="base 'ftp://example.org/x'"):
        fetch.ensure_assets(root, base="ftp://example.org/x")
    monkeypatch.setenv(fetch.DOWNLOAD_ENV, "127.0.0.1:8000")
    with pytest.raises(ValueError, match=r"\$ISCAM_DOWNLOAD_BASE '127.0.0.1:8000'"):
        fetch.ensure_assets(root)
    monkeypatch.delenv(fetch.DOWNLOAD_ENV)
    with pytest.raises(ValueError, match="is not a folder"):
        fetch.ensure_assets(root, source=tmp_path / "nowhere")
    assert not root.exists()


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("../models/x.tflite,{h},3,mirror", "must be a relative path"),
        ("elsewhere/x.tflite,{h},3,mirror", "must be a relative path"),
        ("models/x.tflite,{h}0,3,mirror", "is not 64 hex digits"),
        ("models/x.tflite,{h},0,mirror", "is not a positive integer"),
        ("models/x.tflite,{h},3,s3://bucket/x", "neither an http(s)/file URL"),
        ("models/x.tflite,{h},3,mirror\nimagenet-val-sample/x.tflite,{h},3,mirror", "names must be unique"),
    ],
)
def test_read_registry_rejects_bad_rows(tmp_path: Path, row: str, problem: str) -> None:
    path = tmp_path / "registry.csv"
    path.write_text("path,sha256,bytes,url\n" + row.format(h="a" * 64) + "\n")
    with pytest.raises(fetch.FetchError, match=re.escape(problem)) as caught:
        fetch.read_registry(path)
    assert str(path) in str(caught.value)
    assert ("line 2" in str(caught.value)) == ("unique" not in problem)  # a row's error names its line


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ISCAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ISCAM_DATA")
    assert fetch.default_data_root() == tmp_path / "cache" / "data"
    monkeypatch.setenv("ISCAM_DATA", str(tmp_path / "mine"))
    assert fetch.default_data_root() == tmp_path / "mine"


def test_wheel_ships_the_registry_and_the_packaged_files(tmp_path: Path) -> None:
    """A wheel install can verify: it holds assets.csv and every ``package`` file (never an image or model)."""
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "iscam", source / "iscam", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("iscam-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {f"iscam/resources/data/{a.path}" for a in fetch.registry() if a.url == fetch.PACKAGE}
    assert {"iscam/fetch.py", "iscam/resources/assets.csv"} | packaged <= names
    assert not [n for n in names if n.lower().endswith((".jpeg", ".jpg", ".tflite", ".bin", ".net"))]
