"""Build the iscam book: run every notebook with papermill, then compile the executed notebooks to HTML.

``make book`` and ``make reproduce`` call this script, and so does the browser test, so the book a user
builds and the book the test checks come from one code path::

    python book/build.py --profile quick                      # what `make book` runs
    python book/build.py --profile quick -p N 15              # any notebook parameter, papermill style
    python book/build.py --profile smoke --skip-html          # only run the notebooks
    python book/build.py --skip-run                           # only rebuild the HTML from executed notebooks

Steps (each can be skipped):

1. *run*: every ``notebooks/NN-*.ipynb`` is executed by papermill into ``notebooks/executed/`` with the
   profile and the given parameters; only parameters a notebook declares in its ``parameters`` cell are
   passed to it. The provenance appendix runs last, since it reads the other notebooks' run times.
2. *chapters*: the executed notebooks are copied into ``book/chapters/`` where ``_toc.yml`` expects them.
3. *mathjax*: MathJax 3 from npm's ``mathjax`` package is copied into ``book/_mathjax/_static/mathjax``,
   which Sphinx merges into the output's ``_static`` (the book must render offline: no CDN).
4. *html*: ``jupyter-book build -W -n --keep-going`` (every Sphinx warning is an error), then every page
   is checked to load no script, style sheet, font or image from another host.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO",
    "BOOK",
    "NOTEBOOKS",
    "EXECUTED",
    "CHAPTERS",
    "HTML",
    "notebook_paths",
    "declared_parameters",
    "run_notebooks",
    "copy_chapters",
    "install_mathjax",
    "build_html",
    "external_references",
    "main",
]

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
NOTEBOOKS = REPO / "notebooks"
EXECUTED = NOTEBOOKS / "executed"
CHAPTERS = BOOK / "chapters"
HTML = BOOK / "_build" / "html"
MATHJAX_BUILD = REPO / "build" / "mathjax"
MATHJAX_VERSION = "3"
# The parts of MathJax's es5 bundle a TeX + CommonHTML page loads (fonts and lazily loaded extensions
# included); the SVG and MathML-input bundles are left out.
MATHJAX_PARTS = ("tex-chtml.js", "input/tex", "output/chtml", "ui", "a11y", "sre", "adaptors")
# The appendix reads the other notebooks' papermill metadata, so it must run after them.
LAST_NOTEBOOKS = ("09-provenance.ipynb",)


class BuildError(RuntimeError):
    """A step of the book build failed; the message names the step and the file."""


def notebook_paths(notebooks_dir: Path = NOTEBOOKS, only: Sequence[str] = ()) -> list[Path]:
    """The chapter notebooks in build order (``NN-name.ipynb``), optionally only those matching ``only``."""
    paths = sorted(p for p in notebooks_dir.glob("[0-9][0-9]-*.ipynb"))
    if not paths:
        raise BuildError(f"no notebooks named NN-*.ipynb in {notebooks_dir}")
    paths.sort(key=lambda p: (p.name in LAST_NOTEBOOKS, p.name))
    if only:
        selected = [p for p in paths if any(token in p.name for token in only)]
        if not selected:
            names = ", ".join(p.name for p in paths)
            raise BuildError(f"--only {' '.join(only)} matches none of the notebooks: {names}")
        return selected
    return paths


def declared_parameters(notebook: Path) -> dict[str, object]:
    """Names and default values assigned in the notebook's cell tagged ``parameters``."""
    with notebook.open(encoding="utf-8") as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            names: dict[str, object] = {}
            for node in ast.parse(source).body:
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, ast.AnnAssign) else []
                )
                for target in targets:
                    if isinstance(target, ast.Name):
                        value = node.value
                        names[target.id] = ast.literal_eval(value) if value is not None else None
            return names
    raise BuildError(f"{notebook.name} has no cell tagged 'parameters' (papermill could not set its inputs)")


def _coerce(value: str) -> object:
    """Read a command-line parameter value as papermill's ``-p`` does: a Python literal if it is one."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def run_notebooks(
    profile: str,
    parameters: Mapping[str, object] | None = None,
    *,
    notebooks: Iterable[Path] | None = None,
    output_dir: Path = EXECUTED,
    log_output: bool = False,
    kernel_name: str = "python3",
) -> dict[str, float]:
    """Execute each notebook with papermill into ``output_dir``; return seconds per notebook.

    ``profile`` and every entry of ``parameters`` are passed to the notebooks that declare them. A
    failing notebook stops the build; its partly executed copy stays in ``output_dir`` for inspection.
    """
    import papermill

    parameters = dict(parameters or {})
    parameters["profile"] = profile
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    paths = list(notebooks) if notebooks is not None else notebook_paths()
    unknown = set(parameters) - set().union(*(declared_parameters(p) for p in paths))
    if unknown:
        raise BuildError(f"no notebook declares the parameter(s) {sorted(unknown)}")
    for index, notebook in enumerate(paths, start=1):
        declared = declared_parameters(notebook)
        passed = {k: v for k, v in parameters.items() if k in declared}
        if "executed" in declared:  # the provenance appendix reads the other executed notebooks
            passed["executed"] = str(output_dir.resolve())
        shown = " ".join(f"{k}={v!r}" for k, v in passed.items())
        print(f"[book {index}/{len(paths)}] {notebook.name}  {shown}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(output_dir / notebook.name),
                parameters=passed,
                kernel_name=kernel_name,
                cwd=str(notebook.parent),
                progress_bar=True,
                log_output=log_output,
            )
        except papermill.PapermillExecutionError as exc:
            raise BuildError(
                f"{notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"(the executed copy with the traceback is {output_dir / notebook.name})"
            ) from exc
        seconds[notebook.name] = time.perf_counter() - start
    return seconds


def copy_chapters(executed_dir: Path = EXECUTED, chapters_dir: Path = CHAPTERS) -> list[Path]:
    """Copy the executed notebooks into ``book/chapters`` (replacing what a previous build left).

    The cell papermill injects with the parameters gets the ``hide-input`` tag of the notebooks' own
    code cells, so the book shows it folded like the rest of the code.
    """
    executed = notebook_paths(executed_dir)
    if chapters_dir.exists():
        shutil.rmtree(chapters_dir)
    chapters_dir.mkdir(parents=True)
    copies = []
    for path in executed:
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            if "injected-parameters" in tags and "hide-input" not in tags:
                tags.append("hide-input")
        target = chapters_dir / path.name
        target.write_text(json.dumps(nb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        copies.append(target)
    return copies


def install_mathjax(extra_dir: Path = BOOK / "_mathjax", build_dir: Path = MATHJAX_BUILD) -> Path:
    """Put MathJax 3 under ``extra_dir/_static/mathjax`` (from npm, fetched once into ``build_dir``).

    ``extra_dir`` is the book's ``html_extra_path``: its files are copied as they are into the output,
    whereas Jupyter Book would add every script found in ``book/_static`` to every page.
    """
    package = build_dir / "node_modules" / "mathjax" / "es5"
    if not (package / "tex-chtml.js").is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise BuildError("npm is needed once to fetch MathJax 3 (the book serves it locally): install Node.js")
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(build_dir),
             f"mathjax@{MATHJAX_VERSION}"],
            check=True,
        )
    target = extra_dir / "_static" / "mathjax"
    if target.exists():
        shutil.rmtree(target)
    for part in MATHJAX_PARTS:
        source = package / part
        if source.is_dir():
            shutil.copytree(source, target / part)
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / part)
    return target / "tex-chtml.js"


def _jupyter_book() -> list[str]:
    beside = Path(sys.executable).with_name("jupyter-book")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("jupyter-book")
    if found is None:
        raise BuildError("jupyter-book is not installed: pip install -e '.[book]' (make book does it)")
    return [found]


def build_html(book_dir: Path = BOOK) -> Path:
    """Compile the book with every Sphinx warning treated as an error; return the HTML folder."""
    html = book_dir / "_build" / "html"
    if html.exists():
        shutil.rmtree(html)
    command = [*_jupyter_book(), "build", "--warningiserror", "--nitpick", "--keep-going", str(book_dir)]
    if subprocess.run(command).returncode != 0:
        raise BuildError(f"jupyter-book build failed (warnings are errors): {' '.join(command)}")
    bad = external_references(html)
    if bad:
        listing = "\n".join(f"  {page}: {url}" for page, url in bad[:20])
        raise BuildError(f"the book loads resources from other hosts (it must render offline):\n{listing}")
    return html


# Attributes through which a page *loads* something (links to other sites in <a href> are fine).
_LOADING = re.compile(
    r"<(?:script|img|iframe|source|audio|video|embed)\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']"
    r"|<link\b[^>]*?\bhref\s*=\s*[\"']([^\"']+)[\"'][^>]*>",
    re.IGNORECASE,
)
_CSS_URL = re.compile(r"url\(\s*[\"']?([^\"')]+)", re.IGNORECASE)
_IMPORT = re.compile(r"@import\s+[\"']([^\"']+)", re.IGNORECASE)


def _is_external(url: str) -> bool:
    return bool(re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", url.strip(), re.IGNORECASE))


def external_references(html_dir: Path) -> list[tuple[str, str]]:
    """(file, url) for every script, style sheet, font or image an HTML/CSS file loads from another host.

    ``<link>`` elements are counted unless they are plain navigation links (``rel`` canonical, next, prev,
    index, search, author, license, help, alternate).
    """
    found: list[tuple[str, str]] = []
    for page in sorted(html_dir.rglob("*.html")):
        text = page.read_text(encoding="utf-8", errors="replace")
        for match in _LOADING.finditer(text):
            url = match.group(1) or match.group(2)
            tag = match.group(0)
            if match.group(2) and re.search(
                r"\brel\s*=\s*[\"'](?:canonical|next|prev|index|search|author|license|help|alternate)[\"']",
                tag, re.IGNORECASE,
            ):
                continue
            if _is_external(url):
                found.append((str(page.relative_to(html_dir)), url))
    for sheet in sorted(html_dir.rglob("*.css")):
        text = sheet.read_text(encoding="utf-8", errors="replace")
        for url in [*_CSS_URL.findall(text), *_IMPORT.findall(text)]:
            if _is_external(url) and not url.startswith("data:"):
                found.append((str(sheet.relative_to(html_dir)), url))
    return found


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick",
                        help="experiment profile(s) from configs/, comma-separated (default: quick)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, as papermill's -p (repeatable), e.g. -p N 15")
    parser.add_argument("--only", nargs="+", default=[], help="run only notebooks whose name contains these")
    parser.add_argument("--skip-run", action="store_true", help="reuse notebooks/executed/")
    parser.add_argument("--skip-html", action="store_true", help="only run the notebooks")
    parser.add_argument("--log-output", action="store_true",
                        help="stream the notebooks' output (the runner's progress bars) to the terminal")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    parameters = {name: _coerce(value) for name, value in args.parameter if value != ""}
    try:
        if not args.skip_run:
            paths = notebook_paths(only=args.only)
            seconds = run_notebooks(args.profile, parameters, notebooks=paths, log_output=args.log_output)
            total = sum(seconds.values())
            print(f"[book] ran {len(seconds)} notebooks in {total / 60:.1f} min", file=sys.stderr)
        if not args.skip_html:
            copy_chapters()
            install_mathjax()
            html = build_html()
            print(f"[book] HTML: {html / 'index.html'}", file=sys.stderr)
    except BuildError as exc:
        print(f"book build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
