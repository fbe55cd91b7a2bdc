"""Notebook glue: what a chapter reads from the results stores, and the banner that says where it came from.

The book only reads. :func:`open_profiles` turns a chapter's parameters (profile, ``N``, ``sigma``, seed,
number of images) into configs and opens their stores -- the local ``<results>/<config>`` store of each
profile, and every published store committed under ``published/<profile>/`` (GPU runs of real models, with
their ``run.json``) -- and checks that the rows the chapter needs are there. A missing row is a
:class:`BookError` naming the command that computes it; ``compute=True`` (what a chapter run on its own with
papermill does) runs that command's results step first, for the chapter's studies only.

:class:`ProfileRun` is one store as a chapter sees it: the paired rows of a study (:meth:`ProfileRun.selection`),
the variants' sets, the stored maps rebuilt at the input size (:meth:`ProfileRun.maps`), the figures' input
images and Fig. 1's trace. Nothing here loads a model or forwards an image.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import tables
from .config import ExperimentConfig, load_config
from .models import MODELS, model_label, weights_label
from .runner import PlannedStudy, planned_studies
from .store import ResultsStore

__all__ = [
    "JOB_FILE",
    "BookError",
    "ProfileRun",
    "banner",
    "claims_glue",
    "claims_summary",
    "claims_table",
    "comparison",
    "data_for",
    "download",
    "finite",
    "format_claims",
    "n_sweep",
    "notebook_times",
    "open_profiles",
    "pipeline",
    "provenance_table",
    "published_dir",
    "rows",
    "sanity_flags",
    "weights_text",
]

#: The file a GPU job (``book/gpu_results.py``) writes beside the stores it packs.
JOB_FILE = "job.json"


def published_dir() -> Path:
    """The committed stores of real models computed on a GPU (``published/<profile>/``, each with its
    ``run.json``): ``$ISCAM_PUBLISHED`` or ``<checkout>/published``."""
    env = os.environ.get("ISCAM_PUBLISHED")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "published"


class BookError(RuntimeError):
    """A chapter cannot be rendered from the stores: the message names the command that fixes it."""


def _overrides(config: ExperimentConfig, *, n_images: int | None, N: int | None, sigma: float | None,
               seed: int | None) -> list[str]:
    """The ``--set`` overrides a chapter's parameters mean for ``config`` (None keeps the profile's)."""
    present = {m.name for m in config.methods}
    changes = []
    if n_images is not None:
        changes.append(f"data.num_images={int(n_images)}")
    if N is not None and "iscam" in present:
        changes.append(f"methods.iscam.N={int(N)}")
    if sigma is not None and "sscam" in present:
        changes.append(f"methods.sscam.sigma={float(sigma)}")
    if seed is not None:
        changes.append(f"seed={int(seed)}")
    return changes


def _unpack(folder: Path) -> Path:
    """A store given as ``<name>.tar`` (what the GPU job brings back) is unpacked beside it once."""
    packed = folder.with_suffix(".tar")
    if not folder.is_dir() and packed.is_file():
        with tarfile.open(packed) as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            for member in members:
                if Path(member.name).is_absolute() or ".." in Path(member.name).parts:
                    raise BookError(f"{packed}: unsafe member {member.name!r}")
            # the "data" filter (Python >= 3.10.12 / 3.11.4) also refuses links and special files
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(folder.parent, members=members, **safe)
    return folder


@dataclass
class ProfileRun:
    """One store as a chapter reads it (see the module docstring)."""

    profile: str
    config: ExperimentConfig
    store: ResultsStore
    studies: list[PlannedStudy]
    published: bool
    command: str
    _frames: dict[bool, pd.DataFrame] = field(default_factory=dict, repr=False)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.config.model.name

    @property
    def record(self) -> dict[str, Any]:
        return self.store.provenance() or {}

    @property
    def label(self) -> str:
        """The model's display name, with ``(published)`` for a committed GPU store."""
        return model_label(self.model) + (" (published)" if self.published else "")

    def rows(self, *, curves: bool = False) -> pd.DataFrame:
        """Every row of the store (maps included; curves only when asked), read once."""
        if curves not in self._frames:
            self._frames[curves] = self.store.read(curves=curves, maps=True)
        return self._frames[curves]

    # -- studies -----------------------------------------------------------------------------------
    def study(self, variant: str = "", label: str | None = None) -> list[PlannedStudy]:
        """The planned studies of ``variant`` ("" = the base rows, "figures", a config variant), all of its
        sets or the one labelled ``label``."""
        found = [s for s in self.studies if s.study.variant == variant and (label is None or s.study.label == label)]
        if not found:
            known = sorted({s.study.variant or "base" for s in self.studies})
            raise BookError(f"profile {self.profile!r} has no study {variant or 'base'!r}"
                            f"{'' if label is None else f' / {label!r}'} (it has {', '.join(known)})")
        return found

    def selection(self, variant: str = "", label: str | None = None, *, curves: bool = False) -> tables.Selection:
        """The rows of one study, paired (:func:`iscam.tables.selection`); a method without any row is a
        :class:`BookError` naming the command that computes it."""
        found = self.study(variant, label)
        if len(found) > 1:
            raise BookError(f"{self.profile}: variant {variant!r} has {len(found)} sets; name one of "
                            f"{', '.join(repr(s.study.label) for s in found)}")
        planned = found[0]
        only = planned.study.variant or "base"
        command = f"{self.command} --only {only}"
        try:
            return tables.selection(self.rows(curves=curves), planned.study.config, planned.files, command=command)
        except tables.TableError as error:
            raise BookError(f"{self.profile}: {error}") from None

    def frame(self, variant: str = "", label: str | None = None, *, curves: bool = False) -> pd.DataFrame:
        return self.selection(variant, label, curves=curves).frame

    def variant_sets(self, variant: str, *, curves: bool = False) -> dict[str, tables.Selection]:
        """Each set of ``variant`` (label -> paired rows), in the config's order."""
        return {planned.study.label: self.selection(variant, planned.study.label, curves=curves)
                for planned in self.study(variant)}

    def incomplete(self) -> list[str]:
        """One line per study whose rows are not all in the store (empty when complete)."""
        lines = []
        for planned in self.studies:
            try:
                chosen = tables.selection(self.rows(), planned.study.config, planned.files,
                                          require_every_method=False)
            except tables.TableError as error:
                lines.append(f"{planned.study.title}: {error}")
                continue
            if not chosen.complete:
                lacking = sum(len(v) for v in chosen.missing.values())
                lines.append(f"{planned.study.title}: {lacking} rows missing")
        return lines

    # -- the tables beside the rows: ROAD and the sanity checks ---------------------------------------
    def _setup(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame``'s rows of this config's setup and base methods (model, weights, preprocessing, layer,
        precision, method parameters)."""
        keys = tables._config_keys(self.config)
        for column in ("model", "weights", "resize", "layer", "precision"):
            frame = frame[frame[column] == keys[column]]
        wanted = {(m.name, self.config.method_key(m)) for m in self.config.methods}
        return frame[[pair in wanted for pair in zip(frame["method"], frame["params_key"])]]

    def road(self) -> pd.DataFrame:
        """The ROAD rows of the base methods on the config's ROAD images (paired: the images every method
        has), or a :class:`BookError` naming the command when the store has none."""
        if self.config.road is None:
            raise BookError(f"profile {self.profile!r} has no road section: ROAD is not computed for it")
        stored = self.store.read(table="road")
        frame = self._setup(stored[stored["road_key"] == self.config.road.key(self.config.seed)]) \
            if len(stored) else stored
        if frame.empty:
            raise BookError(f"{self.profile}: the store has no ROAD rows; compute them with: {self.command} "
                            "--only road")
        counts = frame.groupby("file")["method"].nunique()
        return frame[frame["file"].isin(counts[counts == counts.max()].index)].reset_index(drop=True)

    def sanity(self) -> pd.DataFrame:
        """The sanity-check rows (similarity of each randomisation stage's map to the trained one) of the base
        methods under the config's subsets, or a :class:`BookError` naming the command when there are none."""
        if not self.config.sanity:
            raise BookError(f"profile {self.profile!r} has no sanity section: the checks are not computed")
        stored = self.store.read(table="sanity")
        keys = {subset.randomisation(mode, self.config.seed)
                for subset in self.config.sanity for mode in subset.modes}
        frame = self._setup(stored[stored["randomisation"].isin(keys)]) if len(stored) else stored
        if frame.empty:
            raise BookError(f"{self.profile}: the store has no sanity-check rows; compute them with: "
                            f"{self.command} --only sanity")
        return frame.reset_index(drop=True)

    # -- maps, images, Fig. 1 ----------------------------------------------------------------------
    def maps(self, frame: pd.DataFrame) -> torch.Tensor:
        """The full-size maps ``[len(frame), H, W]`` of ``frame``'s rows (stored raw maps rebuilt, the random
        baseline's from its seed), in ``frame``'s order."""
        from .config import image_seed
        from .methods import reconstruct

        size = (self.config.model.input_size or MODELS[self.model].input_size,) * 2
        maps = []
        for row in frame.itertuples(index=False):
            params = json.loads(row.params_key)
            if row.method == "random":
                maps.append(reconstruct("random", None, size, seed=image_seed(int(params["seed"]), "random",
                                                                              row.file))[0])
                continue
            height, width = (int(v) for v in row.map_shape)
            raw = torch.from_numpy(np.array(row.map, dtype=np.float32)).view(1, height, width)
            maps.append(reconstruct(row.method, raw, size, params)[0])
        return torch.stack(maps) if maps else torch.zeros(0, *size)

    def images(self, files: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The figures' stored input images: file -> ``{"image": [3, H, W] in [0, 1], "label", "boxes"}``."""
        from PIL import Image

        stored = self.store.read(table="images")
        stored = stored[(stored["model"] == self.model) & (stored["resize"] == self.config.model.preprocessing)]
        stored = stored.set_index("file")
        found = {}
        for file in files:
            if file not in stored.index:
                raise BookError(f"{self.profile}: the store has no input image of {file}; compute it with: "
                                f"{self.command} --only figures")
            entry = stored.loc[file]
            array = np.asarray(Image.open(io.BytesIO(entry["png"])).convert("RGB"), dtype=np.float32) / 255.0
            found[file] = {"image": torch.from_numpy(array).permute(2, 0, 1), "label": int(entry["label"]),
                           "boxes": torch.tensor(list(entry["boxes"]), dtype=torch.float32).view(-1, 4)}
        return found

    def trace(self) -> dict[str, Any]:
        """Fig. 1's stored IS-CAM trace (its tensors reshaped), or a :class:`BookError` naming the command."""
        traces = self.store.read(table="traces")
        spec = next((m for m in self.config.methods if m.name == "iscam"), None)
        key = None if spec is None else self.config.method_key(spec)
        traces = traces[(traces["model"] == self.model) & (traces["params_key"] == key)] if len(traces) else traces
        if traces.empty:
            raise BookError(f"{self.profile}: the store has no IS-CAM trace for Fig. 1; compute it with: "
                            f"{self.command} --only figures")
        row = traces.iloc[-1].to_dict()
        channels = list(row["channels"])
        activation = np.asarray(row["activation"], dtype=np.float32).reshape(list(row["activation_shape"]))
        row.update(channels=channels, activation=torch.from_numpy(activation),
                   step_scores=torch.tensor(list(row["step_scores"])).view(len(channels), int(row["N"])),
                   channel_weights=torch.tensor(list(row["channel_weights"])),
                   raw=torch.tensor(list(row["raw"])).view(list(row["raw_shape"])),
                   coefficients=list(row["coefficients"]))
        return row


def _published_profiles() -> list[str]:
    folder = published_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "run.json").is_file())


def _recorded(name: str, out: Path, *, published: bool) -> ProfileRun:
    """A store read with the config its own ``run.json`` records (a published or brought-back store: it is
    shown as it was computed, never recomputed here)."""
    from .config import config_from_dict

    store = ResultsStore(out)
    record = store.provenance()
    if record is None:
        raise BookError(f"the store {out} has no run.json (is {name!r} a store of this folder?)")
    config = config_from_dict(record["config"])
    studies = planned_studies(config, store)
    return ProfileRun(name, config, store, studies, published, str(record.get("command", "")))


def open_profiles(profile: str = "quick", *, n_images: int | None = None, N: int | None = None,
                  sigma: float | None = None, seed: int | None = None, results: str | os.PathLike[str] | None = None,
                  published: str | Sequence[str] | None = "auto", data_root: str | os.PathLike[str] | None = None,
                  compute: bool = False, needs: Sequence[str] = ("base",)) -> list[ProfileRun]:
    """The stores a chapter reads: one per profile of ``profile`` (comma-separated config names), each under
    ``results`` (default :func:`iscam.paths.results_dir`), then the published stores (``"auto"``: every one
    under ``published/``; a list: those; None: none).

    ``n_images``, ``N``, ``sigma``, ``seed`` override the local profiles (published stores are shown as they
    were computed). ``needs``: the studies the chapter reads (``"base"``, ``"figures"``, a variant name, or
    ``"*"`` for all); ``compute=True`` runs the results step for those first (only missing rows are computed);
    otherwise a store that lacks them raises :class:`BookError` naming the command that computes them.
    """
    from .paths import results_dir
    from .runner import run

    names = [p.strip() for p in str(profile).split(",") if p.strip()]
    if not names:
        raise BookError("profile is empty: name a shipped config (e.g. 'quick')")
    folder = Path(results) if results else results_dir()
    chosen_published = _published_profiles() if published == "auto" else list(published or [])
    runs = []
    if (folder / JOB_FILE).is_file():  # stores a GPU job brought back: read as they were computed
        for name in names:
            runs.append(_recorded(name, _unpack(folder / name), published=False))
        names = []
    for name in names:
        base = load_config(name)
        changes = _overrides(base, n_images=n_images, N=N, sigma=sigma, seed=seed)
        config = load_config(name, changes)
        out = _unpack(folder / config.name)
        command = f"iscam run {name} --out {out}" + "".join(f" --set {c}" for c in changes)
        only = None if "*" in needs else list(needs)
        if compute:
            run(config, out=out, data_root=data_root, progress=False, only=only, command=command)
        store = ResultsStore(out)
        if not store.exists():
            raise BookError(f"no results for profile {name!r} in {out}: compute them with {command}"
                            + ("" if only is None else f" --only {','.join(only)}") + " (or: make results)")
        studies = planned_studies(config, store, data_root=data_root)
        runs.append(ProfileRun(name, config, store, studies, False, command))
    shown = {run.profile for run in runs}
    for name in chosen_published:
        if name not in shown:
            runs.append(_recorded(name, published_dir() / name, published=True))
    for run_ in runs:
        for need in needs:
            if need == "*":
                continue
            run_.study("" if need == "base" else need)
    return runs


# --------------------------------------------------------------------------------------------------
# What the chapters compute from the stores (tables, figures' inputs): never a forward pass
# --------------------------------------------------------------------------------------------------

def data_for(data_root: str | os.PathLike[str] | None, *, compute: bool) -> str | None:
    """The data root a chapter uses: the one given or configured; when there is none and the chapter may
    compute (launched in Colab or Binder), the models and sample images fetched by :mod:`iscam.fetch`
    (hash-verified). Rendering from complete stores needs none."""
    if data_root or os.environ.get("ISCAM_DATA") or not compute:
        return None if data_root is None else str(data_root)
    from . import fetch

    root = fetch.ensure_assets(what=("models", "sample"))
    os.environ["ISCAM_DATA"] = str(root)
    return str(root)


def rows(runs: Sequence[ProfileRun], *, curves: bool = False) -> pd.DataFrame:
    """The base rows of every store, paired per store, as one frame (what Tables I-III read)."""
    return pd.concat([run.frame(curves=curves) for run in runs], ignore_index=True)


def comparison(run: ProfileRun) -> Any:
    """Fig. 2's maps: every method of the profile on the figures' images, rebuilt from the stored rows."""
    from .methods import PAPER_NAMES
    from .models import imagenet_categories
    from .plots import Explained

    (planned,) = run.study("figures")
    chosen = tables.selection(run.rows(), planned.study.config, planned.files,
                              command=f"{run.command} --only figures")
    if not chosen.complete:
        raise BookError(f"{run.profile}: {chosen.notice()}")
    files = list(planned.files)
    categories = imagenet_categories()
    images = run.images(files)
    maps: dict[str, torch.Tensor] = {}
    titles: list[str] = []
    for spec in planned.study.config.methods:
        frame = chosen.frame[chosen.frame["method"] == spec.name].set_index("file").loc[files].reset_index()
        maps[PAPER_NAMES.get(spec.name, spec.name)] = run.maps(frame)
        if not titles:
            titles = [f"{categories[int(t)]} ({float(y):.2f})" for t, y in zip(frame["target"], frame["y"])]
    return Explained(torch.stack([images[f]["image"] for f in files]), files, titles, maps)


def pipeline(run: ProfileRun) -> Any:
    """Fig. 1's panels from the stored trace and input image (:func:`iscam.plots.pipeline_view`)."""
    from .models import imagenet_categories, preprocess_for
    from .plots import pipeline_view

    trace = run.trace()
    image = run.images([trace["file"]])[trace["file"]]["image"]
    preprocess = preprocess_for(run.model, run.config.model.resize, run.config.model.input_size)
    return pipeline_view(trace, image, mean=preprocess.mean, std=preprocess.std,
                         category=imagenet_categories()[int(trace["target"])])


def n_sweep(run: ProfileRun, *, variant: str = "n_sweep") -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The N sweep of a store: Tables I-III of IS-CAM for each N (long, with a column ``N``), the per-image
    map similarity with the profile's own N (:func:`iscam.tables.map_similarity`) and that N."""
    sets = run.variant_sets(variant)
    values = {label: int(label.split("=", 1)[1]) for label in sets}
    reference = int(next(m.params.get("N", 10) for m in run.config.methods if m.name == "iscam"))
    long = tables.variant_table({values[label]: chosen for label, chosen in sets.items()}, column="N")
    files = sorted(set.intersection(*(set(chosen.frame["file"]) for chosen in sets.values())))
    maps = {}
    for label, chosen in sets.items():
        frame = chosen.frame[chosen.frame["method"] == "iscam"].set_index("file").loc[files].reset_index()
        maps[values[label]] = run.maps(frame)
    similarity = tables.map_similarity(maps, files, reference=reference, model=run.model)
    return long, similarity, reference


def sweep_inputs(run: ProfileRun) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """What the N claims read from a store: its N-sweep rows and the per-image map similarity with the
    profile's own N; ``(None, None)`` when the config has no sweep or the store lacks some of it (the N
    claims then say "not evaluated")."""
    if not any(s.study.variant == "n_sweep" for s in run.studies):
        return None, None
    try:
        _, similarity, _ = n_sweep(run)
        sets = run.variant_sets("n_sweep")
    except (BookError, tables.TableError):
        return None, None
    return pd.concat([chosen.frame for chosen in sets.values()], ignore_index=True), similarity


def claims_table(runs: Sequence[ProfileRun], *, n_boot: int = 10000, seed: int = 0,
                 margin: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """:func:`iscam.claims.evaluate` on every store's base rows, with its N sweep (metrics and per-image map
    similarity, :func:`sweep_inputs`) and the sanity checks' flags. Returns the claims table and the
    similarity frame."""
    from . import claims

    frames, sweeps, similarities = [], [], []
    for run in runs:
        frames.append(run.frame())
        sweep, similarity = sweep_inputs(run)
        if sweep is not None:
            sweeps.append(sweep)
            similarities.append(similarity)
    frame = pd.concat(frames, ignore_index=True)
    sweep = pd.concat(sweeps, ignore_index=True) if sweeps else None
    similarity = pd.concat(similarities, ignore_index=True) if similarities else None
    flags = sanity_flags(runs)
    return claims.evaluate(frame, sweep=sweep, similarity=similarity, flags=flags or None,
                           n_boot=n_boot, seed=seed, margin=margin), similarity


def sanity_flags(runs: Sequence[ProfileRun]) -> set[str]:
    """Methods whose maps barely change when the model's weights are randomised
    (:func:`iscam.sanity.insensitive_methods` on each store that has sanity checks)."""
    from . import sanity

    flagged: set[str] = set()
    for run in runs:
        if not run.config.sanity:
            continue
        try:
            rows = run.sanity()
        except BookError:
            continue
        table = sanity.insensitive_methods(rows, n_boot=1000)
        flagged.update(table.loc[table["flagged"], "method"])
    return flagged


def claims_glue(table: pd.DataFrame, runs: Sequence[ProfileRun]) -> None:
    """Glue the landing page's counts (claims per verdict) and its build line (stores, images)."""
    from myst_nb import glue

    for status in ("supported", "contradicted", "not resolved", "not evaluated"):
        glue(f"claims_{status.replace(' ', '_').replace('not_resolved', 'unresolved')}",
             int((table["status"] == status).sum()), display=False)
    glue("claims_profiles", ", ".join(f"{run.profile} ({run.label})" for run in runs), display=False)
    glue("claims_images", ", ".join(str(len(run.studies[0].files)) for run in runs), display=False)


def claims_summary(table: pd.DataFrame) -> Any:
    """The landing page's table: one line per claim (linked to its chapter) and a short verdict per store's
    model; the estimate, interval and power estimate are in each cell's tooltip and in the full table."""
    from IPython.display import HTML

    from . import claims

    shown = claims.claims_display(table)
    models = list(dict.fromkeys(table["model"]))
    head = "".join(f"<th>{html.escape(model_label(m))}</th>" for m in models)
    body = []
    for claim_id, record in zip(shown["claim"], shown.to_dict("records")):
        page = str(record["chapter"]).split("/")[-1]
        cells = []
        for model in models:
            found = table[(table["claim"] == claim_id) & (table["model"] == model)]
            if found.empty:
                cells.append("<td>–</td>")
                continue
            status = str(found["status"].iloc[0])
            n = found["n"].iloc[0] if "n" in found else None
            short = status if status in ("supported", "contradicted", "not evaluated") or n is None \
                or not math.isfinite(float(n)) else f"{status} (n={int(n)})"
            cells.append(f'<td class="iscam-{status.replace(" ", "-")}" title="{html.escape(str(record[model]))}">'
                         f"{html.escape(short)}</td>")
        body.append(f'<tr><td><a href="{page}.html">{html.escape(str(record["summary"]))}</a> '
                    f'<span class="iscam-where">({html.escape(str(record["where"]))})</span></td>'
                    f"{''.join(cells)}</tr>")
    return HTML('<div class="iscam-claims"><table class="table"><thead><tr><th>IS-CAM ... (the paper\'s claim)'
                f"</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def format_claims(table: pd.DataFrame) -> str:
    """The claims table as text (:func:`iscam.claims.format_claims`)."""
    from . import claims

    return claims.format_claims(table)


# --------------------------------------------------------------------------------------------------
# What a page says about its sources
# --------------------------------------------------------------------------------------------------

def _methods_text(config: ExperimentConfig) -> str:
    from .methods import PAPER_NAMES

    parts = []
    for spec in config.methods:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(spec.params.items()))
        parts.append(f"{PAPER_NAMES.get(spec.name, spec.name)}" + (f" ({shown})" if shown else ""))
    return "; ".join(parts)


def weights_text(config: ExperimentConfig) -> str:
    """The exact label of a config's weights (:func:`iscam.models.weights_label`)."""
    return weights_label(config.model.name, config.model.weights)


def banner(runs: Sequence[ProfileRun], *, note: str | None = None, subset: str | None = None) -> Any:
    """An HTML box stating, for every store a page reads, the profile, model, weights, layer, images,
    device and methods; a store that lacks rows is flagged INCOMPLETE with the command that completes it.

    Offline profiles are flagged as such, so their numbers are never mistaken for the paper's; ``subset``
    says when the page uses fewer images than the profile (e.g. a variant's first 30).
    """
    from IPython.display import HTML

    from .models import default_target_layer

    items = []
    for run in runs:
        config = run.config
        record = run.record
        device = record.get("device") or "not run yet"
        base = run.studies[0]
        layer = config.model.target_layer or default_target_layer(config.model.name)
        source = (f"published store <code>published/{html.escape(run.profile)}</code>, computed "
                  f"{html.escape(str(record.get('finished', '?')))}" if run.published else
                  f"store <code>{html.escape(str(run.store.folder))}</code>")
        missing = run.incomplete()
        flag = ("" if not missing else
                f'<br><strong class="iscam-incomplete">INCOMPLETE:</strong> {html.escape("; ".join(missing[:3]))}'
                f" — complete it with <code>{html.escape(run.command)}</code>")
        items.append(
            "<li>"
            f"<strong>profile</strong> <code>{html.escape(run.profile)}</code> · "
            f"<strong>model</strong> {html.escape(model_label(config.model.name))} "
            f"(<code>{html.escape(config.model.name)}</code>, layer <code>{html.escape(layer)}</code>) · "
            f"<strong>weights</strong> {html.escape(weights_text(config))} · "
            f"<strong>images</strong> {len(base.files)} from <code>{html.escape(config.data.manifest)}</code> · "
            f"<strong>device</strong> {html.escape(str(device))} · {source}<br>"
            f"<strong>methods</strong> {html.escape(_methods_text(config))}{flag}"
            "</li>"
        )
    paper = all(MODELS[run.model].in_paper and run.config.model.weights == "default"
                and len(run.studies[0].files) >= 2000 for run in runs)
    verdict = ("The paper's protocol: its CNNs, torchvision's ImageNet weights and its number of images."
               if paper else
               "<strong>Not the paper's run:</strong> other weights or models, and fewer validation images "
               "than the paper's 2000. Compare trends with the paper's values, not digits "
               "(<code>make reproduce</code> runs the paper's profiles).")
    extra = "".join(f"<p>{text}</p>" for text in (subset, note) if text)
    return HTML(
        '<div class="iscam-banner admonition important">'
        '<p class="admonition-title">Produced by</p>'
        f'<ul>{"".join(items)}</ul><p>{verdict}</p>{extra}'
        "</div>"
    )


def provenance_table(runs: Sequence[ProfileRun]) -> pd.DataFrame:
    """One column per store: config, versions, commit, device and run times from its ``run.json`` and
    ``runs.jsonl`` (every runner invocation that wrote to the store)."""
    columns = {}
    for run in runs:
        latest = run.record
        versions = latest.get("versions", {})
        cost = latest.get("cost", {})
        columns[run.profile + (" (published)" if run.published else "")] = {
            "config": run.config.name,
            "description": run.config.description,
            "model / layer": f"{run.config.model.name} / {run.config.model.target_layer or 'default'}",
            "weights": weights_text(run.config),
            "images": str(len(run.studies[0].files)),
            "manifest": str(latest.get("manifest", run.config.data.manifest)),
            "methods": _methods_text(run.config),
            "metrics": run.config.metrics.key,
            "git commit": str(latest.get("git_commit")),
            "device": f"{latest.get('device')} (world size {latest.get('world_size', 1)})",
            "host / platform": f"{latest.get('host')} / {latest.get('platform')}",
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "runner invocations": str(len(run.store.history())),
            "last run": f"{latest.get('started')} → {latest.get('finished')} ({latest.get('status')})",
            "rows in store": str(len(run.store.keys())),
            "command": run.command,
            "seconds per image (last run)": "; ".join(f"{k}: {v['seconds']:.3f}" for k, v in cost.items()) or "–",
        }
    return pd.DataFrame(columns)


def notebook_times(executed: str | Path) -> pd.DataFrame:
    """Run time of each executed chapter notebook (papermill's metadata): columns notebook, profile,
    parameters, seconds, started."""
    rows = []
    for path in sorted(Path(executed).glob("[0-9][0-9]-*.ipynb")):
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
        parameters = meta.get("parameters", {})
        duration = meta.get("duration")
        if duration is None:  # the notebook being executed right now (this appendix)
            continue
        rows.append({"notebook": path.stem, "profile": parameters.get("profile", ""),
                     "parameters": ", ".join(f"{k}={v}" for k, v in parameters.items()
                                             if k not in ("profile", "results", "executed", "downloads")
                                             and v is not None),
                     "seconds": float(duration), "started": meta.get("start_time", "")})
    return pd.DataFrame(rows, columns=["notebook", "profile", "parameters", "seconds", "started"])


def download(frame: pd.DataFrame, name: str, folder: str | os.PathLike[str] = "downloads") -> Path:
    """Write ``frame`` for the page's download links: ``<folder>/<name>`` as CSV (``.csv``) or parquet
    (``.parquet``; list columns kept). Returns the path (relative to the notebook, as the link wants it)."""
    from .store import atomic_write_bytes

    path = Path(folder) / name
    flat = frame.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [" / ".join(str(p) for p in column if str(p)) for column in flat.columns]
    if isinstance(flat.index, pd.MultiIndex) or flat.index.name is not None:
        flat = flat.reset_index()
    if path.suffix == ".csv":
        data = flat.to_csv(index=False).encode("utf-8")
    elif path.suffix == ".parquet":
        buffer = io.BytesIO()
        for column in flat.columns:
            if flat[column].dtype == object and flat[column].map(lambda v: isinstance(v, np.ndarray)).any():
                flat[column] = flat[column].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
        flat.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    else:
        raise ValueError(f"download {name!r}: the name must end in .csv or .parquet")
    atomic_write_bytes(path, data)
    return path


def finite(value: Any) -> float:
    """``value`` as a float for glue (NaN stays NaN: the page prints "–")."""
    number = float(value)
    return number if math.isfinite(number) else float("nan")

