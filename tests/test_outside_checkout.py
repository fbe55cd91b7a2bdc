"""A chapter launched outside a checkout (what Colab or Binder do): the package installed from its wheel into a
fresh virtual environment, no data root, the downloads pointed at a mirror served from 127.0.0.1
(``ISCAM_DOWNLOAD_BASE``). The chapter's first cell fetches the models and sample images, verified by
SHA-256, then runs the results step for its own rows and renders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from conftest import Mirror, glue_values

from iscam import fetch
from iscam.store import ResultsStore

REPO = Path(__file__).resolve().parents[1]


def test_one_chapter_runs_in_a_fresh_directory_from_the_wheel_and_a_mirror(
        mirror: Mirror, tmp_path: Path, assets: Path, wheel_python: Path) -> None:
    python = wheel_python
    venv = python.parents[1]

    # the mirror: the models and the sample images, flat, as a maintainer publishes them
    fetch.build_mirror(assets, mirror.folder, what=("models", "sample"), link=True)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy2(REPO / "notebooks" / "04-confidence.ipynb", fresh / "chapter.ipynb")
    env = {key: value for key, value in os.environ.items() if key not in ("ISCAM_DATA", "ISCAM_RESULTS")}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"],  # the dependencies; iscam itself is the wheel's
               ISCAM_DOWNLOAD_BASE=mirror.url, ISCAM_CACHE=str(tmp_path / "cache"), NO_PROXY="127.0.0.1")
    where = subprocess.run([str(python), "-c", "import iscam; print(iscam.__file__)"], cwd=fresh, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not the checkout's
    run = subprocess.run(
        [str(python), "-m", "papermill", "chapter.ipynb", "out.ipynb", "-p", "profile", "smoke",
         "-p", "published", "None", "-p", "results", str(fresh / "results"), "--no-progress-bar"],
        cwd=fresh, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    # the chapter's kernel imported the wheel's iscam, fetched through the mirror and verified every file
    fetched = tmp_path / "cache" / "data"
    assert (fetched / "models" / "mobilenet_v1_0.25_128_quant.tflite").is_file()
    assert len(list((fetched / "imagenet-val-sample").glob("*.JPEG"))) == 300
    assert any(path.endswith(".tflite") for path in mirror.requests)
    frame = ResultsStore(fresh / "results" / "smoke").read(curves=False)
    assert len(frame) == 4 * 7  # the chapter's own rows (the base study), computed where it was launched
    glued = glue_values(fresh / "out.ipynb")
    assert int(glued["t2_images"]) == 4
