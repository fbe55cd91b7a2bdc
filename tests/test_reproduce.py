"""The paths nobody here can run for real, exercised end to end at a tiny size on the CPU:

- ``make reproduce``: the three paper profiles (random weights, a fake ILSVRC2012 folder in the official
  layout written here, 2 images each, tiny N and input size) through the results stores and the book's
  render step;
- ``make gpu-results``: the GPU job on a tiny profile, its packed stores (at most 8 files of at most 16 MiB),
  and the render step reading them on another machine (another folder, no data root);
- ``pip install`` of the wheel into a fresh virtual environment (not editable): ``iscam run smoke`` and
  ``iscam table`` from another working directory, the configs read from inside the package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from conftest import glue_values, write_imagenet_layout

from iscam import book
from iscam.config import load_config
from iscam.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]
PAPER = ("paper-vgg16", "paper-resnet18", "paper-squeezenet")
# Small layers and inputs keep the Score family's forwards cheap on random-weight paper CNNs.
TINY_LAYERS = {"paper-vgg16": "features.2", "paper-resnet18": "layer1", "paper-squeezenet": "features.3"}


def _build_module():
    spec = importlib.util.spec_from_file_location("iscam_book_build_reproduce", REPO / "book" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny(name: str) -> list[str]:
    """Overrides that make a paper profile run in seconds: random weights, 48 px (the sanity checks' minimum),
    2 images, N = 2, ROAD and the sanity checks on one image."""
    return ["model.weights=null", "model.input_size=48", f"model.target_layer={TINY_LAYERS[name]}",
            "data.num_images=2", "methods.iscam.N=2", "methods.sscam.N=2", "methods.smoothgradcampp.n_samples=2",
            "metrics.insertion.step=256", "metrics.deletion.step=256", "metrics.batch_size=64",
            "variants.n_sweep.images=2", "variants.n_sweep.grid={methods.iscam.N: [1, 2]}",
            "variants.protocol.images=1", "figures.images=2", "forward_batch_size=64", "batch_size=2",
            "road.images=1", "road.fractions=[0.2, 0.8]", "sanity.all.images=1", "sanity.all.stages=2",
            "sanity.all.methods=[gradcam, random]"]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ILSVRC2012 validation folder in the official layout, with its manifest made by the data script."""
    root = write_imagenet_layout(tmp_path_factory.mktemp("imagenet"), [
        (1, (320, 240), "n02110806", [(60, 40, 200, 220)]),  # basenji, one of the classes Fig. 2 looks for
        (2, (240, 320), "n01443537", [(20, 30, 200, 300)]),
        (3, (300, 300), "n02091134", [(1, 1, 150, 150), (160, 160, 300, 300)]),  # whippet, two boxes
    ])
    made = subprocess.run([sys.executable, str(REPO / "data_scripts" / "imagenet_to_manifest.py"),
                           "--data-root", str(root)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    return root


def test_make_reproduce_path_runs_the_three_paper_profiles_through_stores_and_the_book(
        fake_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``make reproduce`` runs (book/build.py on the three paper profiles: results step, then render),
    on the paper configs with the tiny overrides written out as YAML files of the same names."""
    import yaml

    profiles = []
    for name in PAPER:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(load_config(name, _tiny(name)).to_dict(), sort_keys=False))
        profiles.append(str(path))
    results = tmp_path / "results"
    monkeypatch.setenv("ISCAM_DATA", str(fake_imagenet))
    build = _build_module()
    chapters = tmp_path / "chapters"
    status = build.main(["--profile", ",".join(profiles), "--results", str(results), "--skip-html",
                         "--chapters", str(chapters), "-p", "published", "None",
                         # the chapters that read every store (tables, claims, provenance), Fig. 1 and the sweep;
                         # tests/test_book.py renders them all on the smoke profile
                         "--only", "00-", "01-", "04-", "06-", "10-"])
    assert status == 0
    for name in PAPER:
        frame = ResultsStore(results / name).read(curves=False)
        assert set(frame["weights"]) == {"none"} and set(frame["resize"]) == {"crop@48"}
        assert frame["pointing"].notna().any()  # the boxes of the XML reached the pointing game
        assert ResultsStore(results / name).provenance()["status"] == "complete"
    claims = glue_values(chapters / "00-claims.ipynb")
    assert "VGG-16" in claims["claims_profiles"] and "SqueezeNet1.0" in claims["claims_profiles"]
    glued = glue_values(chapters / "04-confidence.ipynb")
    assert int(glued["t2_images"]) == 2


def test_gpu_job_packs_at_most_8_files_that_render_elsewhere(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("iscam_gpu_results", REPO / "book" / "gpu_results.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "gpu-results"
    assert job.main(["--out", str(out), "--profiles", "smoke", "--budget", "1", "--calibrate", "1",
                     "--device", "cpu", "--work", str(tmp_path / "work")]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["job.json", "smoke.tar"] and all((out / f).stat().st_size <= job.MAX_BYTES for f in files)
    record = json.loads((out / "job.json").read_text())
    assert record["profiles"] == ["smoke"] and record["images"]["smoke"] >= 1
    with tarfile.open(out / "smoke.tar") as archive:
        names = archive.getnames()
    assert "smoke/run.json" in names and not any(Path(n).name.startswith(".") for n in names)
    # another machine: the packed folder moved elsewhere, no data root
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    monkeypatch.delenv("ISCAM_DATA", raising=False)
    (run,) = book.open_profiles("smoke", results=moved, published=None, needs=("*",))
    assert len(run.studies[0].files) == record["images"]["smoke"] and run.incomplete() == []
    build = _build_module()
    chapter = [p for p in build.notebook_paths() if p.name.startswith("04-")]
    seconds = build.run_notebooks("smoke", {"results": str(moved), "published": None}, notebooks=chapter,
                                  output_dir=tmp_path / "rendered")
    assert list(seconds) == ["04-confidence.ipynb"]
    assert int(glue_values(tmp_path / "rendered" / "04-confidence.ipynb")["t2_images"]) == record["images"]["smoke"]


def test_the_wheel_installs_and_runs_from_another_directory(tmp_path: Path, assets: Path,
                                                           wheel_python: Path) -> None:
    python = wheel_python
    venv = python.parents[1]
    # the dependencies come from this environment's site-packages (on PYTHONPATH, so no .pth file -- and no
    # editable install of the checkout -- is read); the package itself is the wheel's copy
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "ISCAM_DATA": str(assets),
           "ISCAM_RESULTS": str(tmp_path / "default-results")}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    probe = "import iscam, iscam.config as c; print(iscam.__file__); print(sorted(c.config_names()))"
    where = subprocess.run([str(python), "-c", probe], cwd=elsewhere, env=env, capture_output=True,
                           text=True, check=False)
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout and "'smoke'" in where.stdout and "'squeezenet'" in where.stdout
    iscam = venv / "bin" / "iscam"
    ran = subprocess.run([str(iscam), "run", "smoke", "--only", "base", "--set", "data.num_images=1",
                          "--set", "methods=[gradcam, random]", "--no-progress", "--device", "cpu"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr[-2000:]
    store = tmp_path / "default-results" / "smoke"  # the one default results folder ($ISCAM_RESULTS)
    assert len(ResultsStore(store).read()) == 2
    table = subprocess.run([str(iscam), "table", str(store), "--n-boot", "100"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=False)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "TABLE I." in table.stdout and "images: 1 of the 1 the config selects" in table.stdout
