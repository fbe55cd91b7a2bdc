"""Build the iscam book in two steps: compute the results stores, then render the notebooks that read them.

``make results``, ``make book`` and ``make reproduce`` call this script, and so does the browser test, so the
book a user builds and the book the test checks come from one code path::

    python book/build.py --profile quick                      # what `make book` runs: results, then render
    python book/build.py --profile quick -p N 15              # any notebook parameter, papermill style
    python book/build.py --profile quick --skip-render        # `make results`: only compute the stores
    python book/build.py --skip-results                       # only render (complete stores: no forward pass)

Steps (each can be skipped):

1. *results*: ``iscam run`` of every profile into ``<results>/<profile>`` (only missing rows are computed;
   a complete store loads no model). The chapters' parameters (``-p N 15``) become ``--set`` overrides.
2. *render*: every ``notebooks/NN-*.ipynb`` is executed by papermill into ``book/notebooks/`` with
   ``compute=False``: a chapter only reads the stores, and a missing row is an error naming the command that
   computes it. Only parameters a notebook declares in its ``parameters`` cell are passed to it; the
   provenance appendix runs last, since it reads the other notebooks' render times. Chapters render
   ``$ISCAM_RENDER_JOBS`` at a time (default: the CPUs, at most 4).
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
    "BOOK",
    "CHAPTERS",
    "HTML",
    "NOTEBOOKS",
    "REPO",
    "build_html",
    "compute_results",
    "declared_parameters",
    "external_references",
    "install_mathjax",
    "main",
    "notebook_paths",
    "render_jobs",
    "run_notebooks",
]

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
NOTEBOOKS = REPO / "notebooks"
# The rendered chapters: book/notebooks/NN.ipynb (build outputs, not committed), so the launch buttons'
# "<repository>/notebooks/NN.ipynb" (path_to_book "") open the committed source of the same page.
CHAPTERS = BOOK / "notebooks"
HTML = BOOK / "_build" / "html"
MATHJAX_BUILD = REPO / "build" / "mathjax"
MATHJAX_VERSION = "3"
# The parts of MathJax's es5 bundle a TeX + CommonHTML page loads (fonts and lazily loaded extensions
# included); the SVG and MathML-input bundles are left out.
MATHJAX_PARTS = ("tex-chtml.js", "input/tex", "output/chtml", "ui", "a11y", "sre", "adaptors")
# The appendix reads the other notebooks' papermill metadata, so it must run after them.
LAST_NOTEBOOKS = ("10-provenance.ipynb",)
#: Notebook parameters that are the config overrides of the results step.
RESULT_PARAMETERS = ("n_images", "N", "sigma", "seed")


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


def compute_results(profiles: Sequence[str], parameters: Mapping[str, object] | None = None, *,
                    results: Path, data_root: str | None = None, device: str | None = None,
                    progress: bool = True) -> dict[str, float]:
    """The results step: ``iscam run`` of each profile into ``results/<profile>`` with the chapters'
    parameters as overrides; returns seconds per profile (a complete store takes well under a second)."""
    from iscam.book import BookError, _overrides
    from iscam.config import load_config
    from iscam.runner import run

    parameters = dict(parameters or {})
    seconds = {}
    for name in profiles:
        base = load_config(name)
        changes = _overrides(base, n_images=parameters.get("n_images"), N=parameters.get("N"),
                             sigma=parameters.get("sigma"), seed=parameters.get("seed"))
        config = load_config(name, changes)
        out = results / config.name
        command = f"iscam run {name} --out {out}" + "".join(f" --set {c}" for c in changes)
        print(f"[results] {command}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            run(config, out=out, data_root=data_root, device=device, progress=progress, command=command)
        except BookError as exc:  # pragma: no cover - run() raises the runner's own errors
            raise BuildError(str(exc)) from exc
        seconds[name] = time.perf_counter() - start
    return seconds


def render_jobs() -> int:
    """How many notebooks render at once: ``$ISCAM_RENDER_JOBS``, else the CPUs this process may use (at most
    4). A chapter spends most of its ~10 s starting a kernel and importing torch, so two at a time on two
    cores halve the render."""
    given = os.environ.get("ISCAM_RENDER_JOBS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise BuildError(f"ISCAM_RENDER_JOBS must be a positive integer, got {given!r}")
        return int(given)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, available))


def run_notebooks(
    profile: str,
    parameters: Mapping[str, object] | None = None,
    *,
    notebooks: Iterable[Path] | None = None,
    output_dir: Path = CHAPTERS,
    log_output: bool = False,
    kernel_name: str = "python3",
    jobs: int | None = None,
) -> dict[str, float]:
    """Render each notebook with papermill into ``output_dir`` (its working directory, so each chapter's
    downloads land beside its page); return seconds per notebook, in build order.

    ``profile`` and every entry of ``parameters`` are passed to the notebooks that declare them; ``compute``
    is False unless given (the results step ran before). ``jobs`` notebooks render at once (default
    :func:`render_jobs`; threads, each driving its own kernel: one process, so jupyter_client never hands
    two kernels the same port); the provenance appendix (``LAST_NOTEBOOKS``) starts after the others, since
    it reads their papermill metadata. A failing notebook fails the build once the others are done; its
    partly executed copy stays in ``output_dir`` for inspection.
    """
    import papermill
    from concurrent.futures import ThreadPoolExecutor

    parameters = {"compute": False, **dict(parameters or {})}
    parameters["profile"] = profile
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = list(notebooks) if notebooks is not None else notebook_paths()
    unknown = set(parameters) - set().union(*(declared_parameters(p) for p in paths))
    if unknown:
        raise BuildError(f"no notebook declares the parameter(s) {sorted(unknown)}")
    jobs = render_jobs() if jobs is None else jobs
    if jobs < 1:
        raise BuildError(f"jobs must be >= 1, got {jobs}")

    def render(index: int, notebook: Path) -> float:
        declared = declared_parameters(notebook)
        passed = {k: v for k, v in parameters.items() if k in declared}
        shown = " ".join(f"{k}={v!r}" for k, v in passed.items())
        print(f"[book {index}/{len(paths)}] {notebook.name}  {shown}", file=sys.stderr, flush=True)
        target = output_dir / notebook.name
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(target),
                parameters=passed,
                kernel_name=kernel_name,
                progress_bar=False,
                log_output=log_output,
                # the kernel's working directory, given to nbclient: papermill's own ``cwd`` would chdir
                # this whole process, which the other render threads share
                resources={"metadata": {"path": str(output_dir)}},
            )
        except papermill.PapermillExecutionError as exc:
            raise BuildError(
                f"{notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"(the executed copy with the traceback is {target})"
            ) from exc
        _fold_injected_parameters(target)
        return time.perf_counter() - start

    numbered = list(enumerate(paths, start=1))
    waves = [[(i, p) for i, p in numbered if p.name not in LAST_NOTEBOOKS],
             [(i, p) for i, p in numbered if p.name in LAST_NOTEBOOKS]]
    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="render") as pool:
        for wave in waves:
            futures = [(p, pool.submit(render, i, p)) for i, p in wave]
            failures = []
            for notebook, future in futures:  # every notebook of the wave finishes before a failure is raised
                try:
                    seconds[notebook.name] = future.result()
                except BuildError as error:
                    failures.append(error)
            if failures:
                raise failures[0]
    return seconds


def _fold_injected_parameters(path: Path) -> None:
    """Give the cell papermill injects the parameters cell's display tag (folded, or removed on the landing
    page), so the book shows it like the notebook's own parameters."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    own = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    tag = "remove-cell" if own is not None and "remove-cell" in own["metadata"]["tags"] else "hide-input"
    for cell in nb["cells"]:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and tag not in tags:
            tags.append(tag)
    path.write_text(json.dumps(nb, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


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
                        help="experiment profile(s), shipped config names, comma-separated (default: quick)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, as papermill's -p (repeatable), e.g. -p N 15")
    parser.add_argument("--results", type=Path, help="folder of the results stores (default: $ISCAM_RESULTS, "
                        "else <checkout>/results)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device of the results step")
    parser.add_argument("--only", nargs="+", default=[], help="render only notebooks whose name contains these")
    parser.add_argument("--chapters", type=Path, default=CHAPTERS,
                        help="where the rendered chapters go (default: book/notebooks, what the HTML build reads)")
    parser.add_argument("--skip-results", action="store_true", help="do not compute: render existing stores")
    parser.add_argument("--skip-render", action="store_true", help="only compute the stores (make results)")
    parser.add_argument("--skip-html", action="store_true", help="only compute and render the notebooks")
    parser.add_argument("--log-output", action="store_true",
                        help="stream the notebooks' output to the terminal")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    parameters = {name: _coerce(value) for name, value in args.parameter if value != ""}
    given = args.results or parameters.get("results") or os.environ.get("ISCAM_RESULTS") or REPO / "results"
    results = Path(given).expanduser().resolve()
    parameters["results"] = str(results)
    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    job = results / "job.json"
    if job.is_file():  # stores a GPU job brought back (book/gpu_results.py): render them as they are
        profiles = json.loads(job.read_text(encoding="utf-8"))["profiles"]
        args.profile, args.skip_results = ",".join(profiles), True
        print(f"[book] {results} holds a GPU job's stores ({args.profile}): rendering them", file=sys.stderr)
    try:
        if not args.skip_results:
            spent = compute_results(profiles, parameters, results=results,
                                    data_root=parameters.get("data_root"), device=args.device)
            print(f"[results] {sum(spent.values()) / 60:.1f} min", file=sys.stderr)
        if args.skip_render:
            return 0
        paths = notebook_paths(only=args.only)
        rendering = time.perf_counter()
        seconds = run_notebooks(args.profile, parameters, notebooks=paths, log_output=args.log_output,
                                output_dir=args.chapters)
        print(f"[book] rendered {len(seconds)} notebooks in {(time.perf_counter() - rendering) / 60:.1f} min "
              f"({sum(seconds.values()) / 60:.1f} min of notebook time)", file=sys.stderr)
        if not args.skip_html:
            install_mathjax()
            html = build_html()
            print(f"[book] HTML: {html / 'index.html'}", file=sys.stderr)
    except BuildError as exc:
        print(f"book build failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the runner's and the book's errors name the problem: one line
        from iscam.book import BookError
        from iscam.config import ConfigError
        from iscam.store import StoreError

        if not isinstance(exc, (BookError, ConfigError, StoreError)):
            raise
        print(f"book build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
