"""The book, end to end: the results step computes the ``smoke`` profile's stores, every notebook renders
from them with papermill (no data root, no forward pass: counted), the Jupyter Book is built (warnings are
errors, MathJax served locally), served on 127.0.0.1 and checked in headless Chromium.

In the browser every page of the table of contents must load with no failed request, no HTTP error and
no request to another host; every figure must be a decoded image laid out on the page; every table must
have rows; MathJax must have typeset the formulas; and every number a chapter glues into its prose must
appear, formatted as the prose asks, in the page's text.

The build happens in a temporary copy of ``book/`` with its own results store, so running the tests never
touches a user's ``book/_build`` or ``results/``. Chromium is Debian's (``/usr/bin/chromium``, installed by
``make test``); Playwright never downloads a browser here.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import glue_values

pytestmark = pytest.mark.book

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
GLUE_ROLE = re.compile(r"\{glue:text\}`([^`]+)`")


def _load_build_module():
    spec = importlib.util.spec_from_file_location("iscam_book_build", REPO / "book" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


# ------------------------------------------------------------------------------------------------
# helpers (plain functions, unit-tested below without a browser)
# ------------------------------------------------------------------------------------------------

def toc_pages(toc_file: Path) -> list[str]:
    """Document names of ``_toc.yml`` (root first), e.g. ``["notebooks/00-claims", "intro", ...]``."""
    import yaml

    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8"))
    pages = [toc["root"]]
    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        pages.extend(entry["file"] for entry in part["chapters"])
    return pages


def glue_references(text: str) -> list[tuple[str | None, str, str]]:
    """(document or None, key, format spec) of every ``{glue:text}`` role in markdown text."""
    found = []
    for content in GLUE_ROLE.findall(text):
        document, _, rest = content.rpartition("::") if "::" in content else (None, "", content)
        key, _, spec = rest.partition(":")
        found.append((document or None, key, spec))
    return found


def expected_glue_texts(book_dir: Path, page: str) -> list[str]:
    """The strings the glue roles of ``page`` must render to (formatted as myst-nb does)."""
    from myst_nb.core.variables import format_plain_text

    source = book_dir / (page + (".ipynb" if (book_dir / f"{page}.ipynb").exists() else ".md"))
    if source.suffix == ".ipynb":
        nb = json.loads(source.read_text(encoding="utf-8"))
        text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    else:
        text = source.read_text(encoding="utf-8")
    texts = []
    for document, key, spec in glue_references(text):
        glued_in = source if document is None else (source.parent / document)
        values = glue_values(glued_in)
        assert key in values, f"{page} glues {key!r}, which {glued_in.name} does not define"
        texts.append(format_plain_text(values[key], spec))
    return texts


# Counts every module call in the render step's kernels: the book must render from the stores alone.
_COUNTER = """
import atexit, os
import torch

_calls = [0]
_original = torch.nn.Module.__call__


def _counted(self, *args, **kwargs):
    _calls[0] += 1
    return _original(self, *args, **kwargs)


torch.nn.Module.__call__ = _counted
atexit.register(lambda: open(os.path.join(os.environ["ISCAM_FORWARD_LOG"], f"{os.getpid()}.txt"), "w")
                .write(str(_calls[0])))
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The results step on the smoke profile, then the render step (in a temporary copy of book/) with no
    data root and a counter of forward passes in every kernel; the render's seconds and forward passes."""
    import os
    import time

    work = tmp_path_factory.mktemp("book")
    book_dir = work / "book"
    shutil.copytree(REPO / "book", book_dir,
                    ignore=shutil.ignore_patterns("_build", "notebooks", "_mathjax", "__pycache__"))
    shutil.copy2(REPO / "CITATION.cff", work / "CITATION.cff")  # the citation page includes ../CITATION.cff
    results = work / "results"
    build.compute_results(["smoke"], results=results, progress=False)
    counter = work / "counter"
    counter.mkdir()
    (counter / "sitecustomize.py").write_text(_COUNTER, encoding="utf-8")
    log = work / "forwards"
    log.mkdir()
    saved = {k: os.environ.get(k) for k in ("ISCAM_DATA", "PYTHONPATH", "ISCAM_FORWARD_LOG")}
    os.environ.pop("ISCAM_DATA", None)  # rendering needs no model and no image: the stores hold everything
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(counter), str(REPO), saved["PYTHONPATH"]]))
    os.environ["ISCAM_FORWARD_LOG"] = str(log)
    try:
        start = time.perf_counter()
        build.run_notebooks("smoke", {"results": str(results)}, output_dir=book_dir / "notebooks")
        seconds = time.perf_counter() - start
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    forwards = [int(p.read_text()) for p in log.glob("*.txt")]
    print(f"\nrender step: {len(build.notebook_paths())} chapters in {seconds:.1f} s, "
          f"{sum(forwards)} module calls in {len(forwards)} kernels")
    build.install_mathjax(book_dir / "_mathjax")
    return {"html": build.build_html(book_dir), "seconds": seconds, "forwards": forwards,
            "kernels": len(build.notebook_paths())}


@pytest.fixture(scope="module")
def book_html(rendered: dict) -> Path:
    return rendered["html"]


def test_rendering_from_complete_stores_makes_no_forward_pass(rendered: dict) -> None:
    assert len(rendered["forwards"]) == rendered["kernels"]  # every kernel reported its count
    assert rendered["forwards"] == [0] * rendered["kernels"]


@pytest.fixture(scope="module")
def server(book_html: Path) -> Iterator[str]:
    """The built book on http://127.0.0.1:<random port>/ (a thread of this process)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

    handler = functools.partial(Quiet, directory=str(book_html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# ------------------------------------------------------------------------------------------------
# the browser test
# ------------------------------------------------------------------------------------------------

def test_every_page_loads_offline_with_figures_tables_math_and_glued_numbers(book_html, server, browser):
    book_dir = book_html.parents[1]
    pages = toc_pages(book_dir / "_toc.yml")
    assert len(pages) >= 12, pages
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    try:
        for page_name in pages:
            page = context.new_page()
            failed: list[str] = []
            page.on("requestfailed", lambda r, f=failed: f.append(f"failed {r.url} ({r.failure})"))
            page.on("response", lambda r, f=failed: f.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None)

            def check_host(request, f=failed):
                url = urlparse(request.url)
                if url.scheme not in ("data", "blob", "about") and url.hostname != "127.0.0.1":
                    f.append(f"request to another host: {request.url}")

            page.on("request", check_host)
            response = page.goto(server + page_name + ".html", wait_until="networkidle")
            assert response is not None and response.status == 200, f"{page_name}: {response}"
            main = page.locator("main#main-content article")
            assert main.count() == 1, f"{page_name}: no article element"

            images = page.locator("article img")
            for i in range(images.count()):
                image = images.nth(i)
                image.scroll_into_view_if_needed()
                state = image.evaluate(
                    "img => img.decode().then(() => ({w: img.naturalWidth, h: img.naturalHeight,"
                    " box: img.getBoundingClientRect().toJSON(), src: img.getAttribute('src')}))"
                )
                if not (state["w"] > 0 and state["box"]["width"] > 0 and state["box"]["height"] > 0):
                    problems.append(f"{page_name}: image {state['src']} not visible ({state})")

            tables = page.locator("article table")
            for i in range(tables.count()):
                rows = tables.nth(i).locator("tbody tr").count()
                if rows == 0:
                    problems.append(f"{page_name}: table {i + 1} has no rows")

            if page.locator("article .math").count():
                page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
                page.evaluate("() => MathJax.startup.promise")
                if page.locator("article mjx-container").count() == 0:
                    problems.append(f"{page_name}: MathJax did not typeset the formulas")

            text = " ".join(main.inner_text().split())
            for expected in expected_glue_texts(book_dir, page_name):
                if " ".join(expected.split()) not in text:
                    problems.append(f"{page_name}: glued value {expected!r} is not in the page text")

            page.wait_for_load_state("networkidle")
            problems.extend(f"{page_name}: {item}" for item in failed)
            page.close()
    finally:
        context.close()
    assert not problems, "\n".join(problems)


def _chapters(book_dir: Path) -> list[str]:
    return [p for p in toc_pages(book_dir / "_toc.yml") if p.startswith("notebooks/")]


def test_every_chapter_has_launch_repository_and_download_buttons_with_well_formed_targets(book_html, server,
                                                                                           browser):
    import yaml

    book_dir = book_html.parents[1]
    config = yaml.safe_load((book_dir / "_config.yml").read_text(encoding="utf-8"))
    repository = config["repository"]["url"].rstrip("/")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        for chapter in _chapters(book_dir):
            page.goto(server + chapter + ".html", wait_until="networkidle")
            links = page.evaluate("() => [...document.querySelectorAll('a')].map(a => a.href)")
            source = f"{chapter}.ipynb"  # path_to_book "": the repository's notebooks/NN.ipynb
            binder = [u for u in links if u.startswith("https://mybinder.org/v2/gh/")]
            colab = [u for u in links if u.startswith("https://colab.research.google.com/github/")]
            assert binder and all(u.endswith(f"?urlpath=lab/tree/{source}") for u in binder), (chapter, binder)
            assert colab and all(u.endswith(f"/blob/main/{source}") for u in colab), (chapter, colab)
            assert repository in links, f"{chapter}: no repository button"
            assert any(u.startswith(repository + "/issues") for u in links), f"{chapter}: no issues button"
            downloads = [u for u in links if u.endswith(".ipynb") and "_sources" in u]
            assert downloads, f"{chapter}: no button downloading the notebook"
            for url in downloads:
                response = page.request.get(url)
                assert response.ok and json.loads(response.body())["cells"], url
    finally:
        page.close()


def test_every_downloadable_file_exists_and_parses(book_html, server, browser):
    import io

    import pandas as pd

    page = browser.new_page()
    seen = 0
    try:
        for chapter in _chapters(book_html.parents[1]):
            page.goto(server + chapter + ".html", wait_until="networkidle")
            hrefs = page.evaluate("() => [...document.querySelectorAll('a.download, a[download]')].map(a => a.href)")
            for url in hrefs:
                response = page.request.get(url)
                assert response.ok, url
                body = response.body()
                frame = pd.read_csv(io.BytesIO(body)) if url.endswith(".csv") else pd.read_parquet(io.BytesIO(body))
                assert len(frame) > 0 and len(frame.columns) > 1, url
                seen += 1
    finally:
        page.close()
    assert seen >= 10, f"only {seen} downloadable tables"


def test_the_landing_page_shows_claims_profile_and_how_to_reproduce_above_the_fold(book_html, server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(server, wait_until="networkidle")  # index.html redirects to the landing page
        page.wait_for_url("**/00-claims.html")
        fold = 800

        def bottom(selector: str) -> float:
            box = page.locator(selector).first.bounding_box()
            assert box is not None, selector
            return box["y"] + box["height"]

        rows = page.locator(".iscam-claims tbody tr")
        assert rows.count() >= 10
        assert bottom(".iscam-claims table") <= fold, "the claims table does not fit above the fold"
        text = page.locator("article").inner_text()
        first_screen = page.evaluate(
            "() => [...document.querySelectorAll('article p')].filter(p => p.getBoundingClientRect().bottom"
            " <= 800).map(p => p.innerText).join(' ')")
        for needed in ("This build:", "smoke", "make book", "make reproduce", "Binder"):
            assert needed in first_screen, f"{needed!r} not above the fold: {first_screen!r}"
        assert "supported" in text or "not resolved" in text
    finally:
        page.close()


def test_the_book_reads_on_a_phone_without_horizontal_scrolling(book_html, server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})
    problems = []
    try:
        for name in toc_pages(book_html.parents[1] / "_toc.yml"):
            page.goto(server + name + ".html", wait_until="networkidle")
            overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            if overflow > 1:
                wide = page.evaluate(
                    "() => [...document.querySelectorAll('article *')].filter(e => e.getBoundingClientRect()"
                    ".right > window.innerWidth + 1).slice(0, 3).map(e => e.tagName + '.' + e.className)")
                problems.append(f"{name}: the page scrolls sideways by {overflow}px ({wide})")
            tables = page.locator("article table")
            for i in range(tables.count()):
                box = tables.nth(i).evaluate(
                    "t => { const b = t.closest('div') || t; return [b.scrollWidth, b.clientWidth,"
                    " getComputedStyle(t).overflowX, getComputedStyle(b).overflowX]; }")
                if box[0] > box[1] + 1 and "auto" not in (box[2], box[3]) and "scroll" not in (box[2], box[3]):
                    problems.append(f"{name}: table {i + 1} is wider than its box and does not scroll ({box})")
    finally:
        page.close()
    assert not problems, "\n".join(problems)


def test_built_book_loads_nothing_from_other_hosts(book_html):
    assert build.external_references(book_html) == []
    assert (book_html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_every_chapter_states_its_profile_model_weights_and_images(book_html):
    for page in sorted((book_html / "notebooks").glob("*.html")):
        text = page.read_text(encoding="utf-8")
        banner = re.search(r'class="[^"]*iscam-banner[^"]*".*?</div>', text, re.DOTALL)
        assert banner, f"{page.name} has no provenance banner"
        words = re.sub(r"<[^>]+>", " ", banner.group(0))
        for label in ("profile", "model", "weights", "images"):
            assert label in words, f"{page.name}: the banner does not state the {label}: {words!r}"
        assert "smoke" in words, f"{page.name}: the banner does not name the smoke profile: {words!r}"


# ------------------------------------------------------------------------------------------------
# unit tests of the helpers and of book/build.py (no browser, no notebook run)
# ------------------------------------------------------------------------------------------------

def test_glue_references_parse_document_key_and_format():
    text = "a {glue:text}`ins_iscam:.2f` b {glue:text}`chapters/x.ipynb::profile:s` c {glue:text}`n`"
    assert glue_references(text) == [(None, "ins_iscam", ".2f"), ("chapters/x.ipynb", "profile", "s"),
                                     (None, "n", "")]


def test_external_references_flag_loaded_resources_but_not_links(tmp_path):
    (tmp_path / "a.html").write_text(
        '<a href="https://arxiv.org/abs/2010.03023">paper</a>'
        '<link rel="canonical" href="https://example.org/x.html">'
        '<script src="_static/local.js"></script>'
        '<script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/f.css">'
        '<img src="../_images/f.png">',
        encoding="utf-8",
    )
    (tmp_path / "s.css").write_text("@font-face{src:url('https://fonts.example.org/a.woff2')}"
                                    "b{background:url(data:image/png;base64,AA==)} i{src:url(x.woff)}",
                                    encoding="utf-8")
    assert build.external_references(tmp_path) == [
        ("a.html", "https://cdn.example.org/mathjax.js"),
        ("a.html", "//fonts.example.org/f.css"),
        ("s.css", "https://fonts.example.org/a.woff2"),
    ]


def test_declared_parameters_reads_the_tagged_cell(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("profile = 'quick'\nN: int | None = None\nn_images = 20  # few\n")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), cell]
    path = tmp_path / "01-x.ipynb"
    nbformat.write(nb, path)
    assert build.declared_parameters(path) == {"profile": "quick", "N": None, "n_images": 20}
    nb.cells = nb.cells[:1]
    nbformat.write(nb, path)
    with pytest.raises(build.BuildError, match="no cell tagged 'parameters'"):
        build.declared_parameters(path)


def _tiny_notebook(path: Path, body: str) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell("profile = 'x'\ncompute = False")
    parameters.metadata["tags"] = ["parameters"]
    nb.cells = [parameters, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_chapters_render_in_parallel_and_the_appendix_after_all_of_them(tmp_path, monkeypatch):
    """Two chapters render at once (each waits until the other has started: it would hang if they ran one
    after the other, so a 60 s wait fails the test instead); the appendix starts once both are done."""
    source, out, elsewhere = tmp_path / "src", tmp_path / "out", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # every kernel runs in `out`, and this process never leaves its directory
    wait = ("import pathlib, time\n"
            f"assert pathlib.Path.cwd() == pathlib.Path({str(out.resolve())!r}), pathlib.Path.cwd()\n"
            "pathlib.Path('started-{me}').touch()\n"
            "deadline = time.monotonic() + 60\n"
            "while not pathlib.Path('started-{other}').exists():\n"
            "    assert time.monotonic() < deadline, 'the other chapter never started'\n"
            "    time.sleep(0.05)\n"
            "pathlib.Path('done-{me}').touch()\n")
    paths = [_tiny_notebook(source / "01-a.ipynb", wait.format(me="a", other="b")),
             _tiny_notebook(source / "02-b.ipynb", wait.format(me="b", other="a")),
             _tiny_notebook(source / "10-provenance.ipynb",
                            "import pathlib\nassert pathlib.Path('done-a').exists() and pathlib.Path('done-b').exists()")]
    seconds = build.run_notebooks("x", notebooks=paths, output_dir=out, jobs=2)
    assert list(seconds) == ["01-a.ipynb", "02-b.ipynb", "10-provenance.ipynb"]
    assert all((out / p.name).is_file() for p in paths)
    # a failing chapter fails the build, naming it, once the others have finished
    broken = _tiny_notebook(source / "03-broken.ipynb", "raise ValueError('chapter three is broken')")
    fine = _tiny_notebook(source / "04-fine.ipynb", "import pathlib\npathlib.Path('done-fine').touch()")
    with pytest.raises(build.BuildError, match=r"03-broken.ipynb failed in cell .*chapter three is broken"):
        build.run_notebooks("x", notebooks=[broken, fine], output_dir=out, jobs=2)
    assert (out / "done-fine").is_file()
    assert Path.cwd() == elsewhere and not list(elsewhere.iterdir())
    monkeypatch.setenv("ISCAM_RENDER_JOBS", "3")
    assert build.render_jobs() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv("ISCAM_RENDER_JOBS", bad)
        with pytest.raises(build.BuildError, match="ISCAM_RENDER_JOBS must be a positive integer"):
            build.render_jobs()


def test_every_committed_notebook_has_parameters_and_no_outputs():
    notebooks = build.notebook_paths()
    assert [p.name for p in notebooks][-1] == "10-provenance.ipynb"
    pages = {Path(p).name for p in toc_pages(REPO / "book" / "_toc.yml")}
    for path in notebooks:
        assert path.stem in pages, f"{path.name} is not in book/_toc.yml"
        declared = build.declared_parameters(path)
        for name in ("profile", "published", "n_images", "N", "sigma", "seed", "data_root", "results", "compute",
                     "downloads"):
            assert name in declared, f"{path.name}: parameter {name!r} missing from the parameters cell"
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
                    f"{path.name} is committed with outputs: clear them (papermill writes executed copies)"
