"""What a citation depends on agrees everywhere: version, title, authors, licence and repository URL in
pyproject.toml, CITATION.cff, .zenodo.json, CHANGELOG.md, the book's citation page and its configuration;
the errata page names real commits; the Binder environment installs the package."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

import iscam
from iscam import fetch

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _cff() -> dict[str, Any]:
    return yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))


def _zenodo() -> dict[str, Any]:
    return json.loads((REPO / ".zenodo.json").read_text(encoding="utf-8"))


def _bibtex(text: str) -> dict[str, dict[str, str]]:
    """``key -> {field: value}`` of the BibTeX entries in ``text`` (outer braces removed, inner kept)."""
    entries: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"@(\w+)\{([^,]+),", text):
        fields: dict[str, str] = {"ENTRYTYPE": match.group(1)}
        position = match.end()
        while (field := re.compile(r"\s*(\w+)\s*=\s*\{").match(text, position)) is not None:
            depth, end = 1, field.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            fields[field.group(1)] = " ".join(text[field.end() : end - 1].split())
            position = end + 1 if text[end : end + 1] == "," else end
        entries[match.group(2)] = fields
    return entries


def _unbrace(value: str) -> str:
    return value.replace("{", "").replace("}", "")


def test_version_is_the_same_everywhere() -> None:
    version = _pyproject()["version"]
    assert iscam.__version__ == version
    assert str(_cff()["version"]) == version
    assert _zenodo()["version"] == version
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    top = re.search(r"^## \[([^\]]+)\] - (\S+)$", changelog, re.MULTILINE)
    assert top is not None, "CHANGELOG.md needs entries '## [VERSION] - DATE' (or '- unreleased')"
    assert top.group(1) == version
    assert top.group(2) in ("unreleased", str(_cff()["date-released"]))


def test_zenodo_agrees_with_citation_cff() -> None:
    cff, zenodo = _cff(), _zenodo()
    assert zenodo["title"] == cff["title"]
    assert [c["name"] for c in zenodo["creators"]] == [a["name"] for a in cff["authors"]]
    assert zenodo["license"].lower() == cff["license"].lower() == _pyproject()["license"]["text"].lower()
    assert zenodo["upload_type"] == cff["type"] == "software"
    assert zenodo["keywords"] == cff["keywords"]
    identifiers = {r["identifier"] for r in zenodo["related_identifiers"]}
    paper_ids = {i["value"] for i in cff["preferred-citation"]["identifiers"] if i["type"] == "other"}
    assert paper_ids == {"arXiv:2010.03023"} and paper_ids <= identifiers
    assert cff["repository-code"] in identifiers


def test_citation_page_bibtex_agrees_with_citation_cff() -> None:
    entries = _bibtex((REPO / "book" / "cite.md").read_text(encoding="utf-8"))
    cff = _cff()
    paper, companion = entries["naidu2020iscam"], entries["iscam_companion"]
    cited = cff["preferred-citation"]
    assert _unbrace(paper["title"]) == cited["title"]
    authors = [f"{a['family-names']}, {a['given-names']}" for a in cited["authors"]]
    assert [" ".join(a.split()) for a in paper["author"].split(" and ")] == authors
    assert paper["year"] == str(cited["year"]) == "2020" and paper["eprint"] == "2010.03023"
    assert paper["doi"] == next(i["value"] for i in cited["identifiers"] if i["type"] == "doi")
    assert companion["ENTRYTYPE"] == "software"
    assert _unbrace(companion["title"]) == cff["title"]
    assert _unbrace(companion["author"]) == cff["authors"][0]["name"] and len(cff["authors"]) == 1
    assert companion["version"] == str(cff["version"]) and companion["license"] == cff["license"]
    assert companion["year"] == str(cff["date-released"])[:4]
    assert companion["url"] == cff["repository-code"]


def test_the_repository_url_is_the_same_everywhere() -> None:
    urls = _pyproject()["urls"]
    repository = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert urls["Issues"] == repository + "/issues"
    assert _cff()["repository-code"] == repository
    assert {"identifier": repository, "relation": "isSupplementTo", "scheme": "url"} in _zenodo()[
        "related_identifiers"
    ]
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text(encoding="utf-8"))
    assert config["repository"]["url"] == repository
    assert fetch.COMPANION_MIRROR.startswith(repository + "/releases/download/")
    owner, name = repository.rsplit("/", 2)[-2:]
    assert urls["Documentation"] == _cff()["url"] == f"https://{owner}.github.io/{name}"


def test_book_has_launch_repository_and_download_buttons() -> None:
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text(encoding="utf-8"))
    html, launch, repository = config["html"], config["launch_buttons"], config["repository"]
    assert html["use_repository_button"] and html["use_issues_button"] and html["use_download_button"]
    assert launch["binderhub_url"] == "https://mybinder.org"
    assert launch["colab_url"] == "https://colab.research.google.com"
    # "" on purpose: the chapters render into book/notebooks/NN, so a launch button opens the repository's
    # notebooks/NN.ipynb, the committed source of the same page (test below)
    assert repository["branch"] == "main" and repository["path_to_book"] == ""


def _toc_files(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["file"]] if "file" in node else []) + [f for v in node.values() for f in _toc_files(v)]
    return [f for item in node for f in _toc_files(item)] if isinstance(node, list) else []


def test_every_launch_button_opens_a_notebook_of_the_repository() -> None:
    """Colab and Binder open ``<path_to_book>/<page>.ipynb`` of the repository: it must be committed."""
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text(encoding="utf-8"))
    toc = yaml.safe_load((REPO / "book" / "_toc.yml").read_text(encoding="utf-8"))
    pages = [f for f in [toc["root"], *_toc_files(toc["parts"])] if not (REPO / "book" / f"{f}.md").is_file()]
    assert len(pages) == 11  # the chapters; the other pages are Markdown and have no launch buttons
    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
    )
    prefix = config["repository"]["path_to_book"].strip("/")
    targets = [f"{prefix}/{page}.ipynb".lstrip("/") for page in pages]
    assert [t for t in targets if t not in tracked] == []


def test_binder_installs_the_package_with_the_makefiles_torch() -> None:
    post_build = REPO / "binder" / "postBuild"
    assert post_build.stat().st_mode & 0o111  # repo2docker runs it only when it is executable
    script = post_build.read_text(encoding="utf-8")
    assert "sed -n 's/^TORCH_SPEC ?= //p' Makefile" in script and '-e ".[book]"' in script
    spec = subprocess.run(
        ["sed", "-n", "s/^TORCH_SPEC ?= //p", "Makefile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert spec and all(re.fullmatch(r"torch(vision)?==[\d.]+", s) for s in spec)
    requires = _pyproject()["requires-python"]
    runtime = (REPO / "binder" / "runtime.txt").read_text(encoding="utf-8").strip()
    assert (
        re.fullmatch(r"python-3\.\d+", runtime) and requires == ">=3.10" and int(runtime.split(".")[1]) >= 10
    )


def _commits(text: str) -> list[str]:
    return re.findall(r"`([0-9a-f]{7,40})`", text)


def test_errata_page_is_in_the_book_and_names_real_commits() -> None:
    toc = (REPO / "book" / "_toc.yml").read_text(encoding="utf-8")
    assert "- file: errata" in toc
    errata = (REPO / "book" / "errata.md").read_text(encoding="utf-8")
    commits = _commits(errata)
    assert len(commits) >= 8
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if shallow.returncode != 0:
        pytest.fail(f"not a git checkout, cannot check the errata's commits: {shallow.stderr.strip()}")
    if shallow.stdout.strip() == "true":
        pytest.fail("a shallow clone cannot check the errata's commits: git fetch --unshallow")
    for commit in commits:
        found = subprocess.run(
            ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True, check=False
        )
        assert found.returncode == 0, (
            f"book/errata.md names {commit}, which is not a commit of this repository"
        )
