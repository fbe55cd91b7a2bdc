"""A chapter run on its own (``papermill notebooks/04-confidence.ipynb out.ipynb -p N 15``) runs the results
step for its own rows first, and rerunning it with a new N computes only the missing rows.

Runs the Table II notebook with papermill on the ``smoke`` profile into a temporary results store (the
notebook's default ``compute=True``), then again with ``-p N 5``: the second run must add exactly one IS-CAM
row per image (with N=5 in its parameters and N forward passes per scored channel), leave every earlier row
untouched, and glue the N=5 numbers -- the values iscam.tables computes from the store -- into the chapter.
With ``compute=False`` (how ``make book`` renders) a missing row is an error naming the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import glue_values

from iscam import tables
from iscam.config import load_config
from iscam.store import ResultsStore

pytestmark = pytest.mark.book

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04-confidence.ipynb"


def _run(tmp_path: Path, name: str, **parameters) -> dict[str, str]:
    import papermill

    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    return glue_values(out)


def test_new_N_regenerates_the_chapter_and_computes_only_the_missing_rows(tmp_path, assets):
    results = tmp_path / "results"
    config = load_config("smoke")
    store = ResultsStore(results / config.name)
    images = config.data.num_images

    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match=r"BookError: no results for profile 'smoke'.*"
                       r"iscam run smoke --out"):
        _run(tmp_path, "render.ipynb", profile="smoke", results=str(results), compute=False, published=None)
    first = _run(tmp_path, "first.ipynb", profile="smoke", results=str(results), published=None)
    before = store.read(curves=False)
    methods = len(config.methods)
    assert len(before) == images * methods

    second = _run(tmp_path, "second.ipynb", profile="smoke", results=str(results), N=5, published=None)
    after = store.read(curves=False)
    key = ["file", "method", "params_key", "metrics_key"]
    new = after.merge(before[key], on=key, how="left", indicator=True)
    new = new[new["_merge"] == "left_only"]
    # Only IS-CAM with N=5 is new: one row per image; every other row was reused, not recomputed.
    assert len(after) == len(before) + images
    assert set(new["method"]) == {"iscam"}
    assert all(json.loads(p)["N"] == 5 for p in new["params_key"])
    old = before.set_index(key).sort_index()
    kept = after.set_index(key).loc[old.index].sort_index()
    assert kept["forward_count"].tolist() == old["forward_count"].tolist()
    assert kept["drop"].tolist() == old["drop"].tolist()
    # IS-CAM's forward passes scale with N: 5 per scored channel (+1 clean pass per image) against 2 before.
    # (The runner shares a batch's passes evenly between its images, rounding down: hence the tolerance.)
    old_passes = before.loc[before["method"] == "iscam", "forward_count"].sum() - images
    new_passes = new["forward_count"].sum() - images
    assert new_passes * 2 == pytest.approx(old_passes * 5, abs=5 * images)

    # The chapter's glued numbers are the N=5 rows' table values, and differ from the first run's.
    n5 = load_config("smoke", ["methods.iscam.N=5"])
    table = tables.table_ii(tables.select(after, n5))
    mine = table[table["method"] == "iscam"].set_index("metric")["ours"]
    assert float(second["t2_drop_iscam"]) == pytest.approx(float(mine["average_drop"]))
    assert float(second["t2_inc_iscam"]) == pytest.approx(float(mine["increase"]))
    assert second["t2_drop_iscam"] != first["t2_drop_iscam"]
