"""The paper's tables computed from a results store, with bootstrap confidence intervals.

Every table function takes the frame of :meth:`iscam.store.ResultsStore.read` (already narrowed to one
parameter set per method with :func:`select`) and returns a *long* frame, one row per (model, method,
metric)::

    model  method  name     metric     ours   low    high   n     paper  paper_model  diff

``ours`` is the mean over images of the per-image score in percent, ``low``/``high`` its 95% percentile
bootstrap interval over images (:func:`iscam.stats.bootstrap_ci`, seeded), ``paper`` the published value
(:data:`PAPER_VALUES`) for ``paper_model`` and ``diff = ours - paper``. The paper reports each table for
specific CNNs; for a model it did not use (e.g. the Coral MobileNets of the offline profiles) the paper
column shows the VGG-16 value and ``paper_model`` says so. :func:`format_table` prints a wide text table.

Percentages: insertion/deletion AUC x 100 (Table I), Average Drop = mean of max(0, Y-O)/Y x 100 and
Increase in Confidence = share of images with O > Y x 100 (Table II), Win % = share of images where IS-CAM's
Y-O is strictly smaller (ties count as no win), pointing-game proportion x 100 (Table III). Images whose
boxes all fall outside the (cropped) frame have no pointing value and are left out of Table III's mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .methods import METHODS, PAPER_NAMES
from .models import PAPER_MODELS
from .stats import bootstrap_ci

__all__ = [
    "PAPER_VALUES",
    "PAPER_SOURCES",
    "PAPER_MODELS",
    "METHOD_ORDER",
    "Selection",
    "TableError",
    "cost_table",
    "map_similarity",
    "paper_comparison",
    "road_table",
    "variant_table",
    "select",
    "selection",
    "table_i",
    "table_ii",
    "win_table",
    "table_iii",
    "mean_curves",
    "all_tables",
    "format_table",
]

#: The published numbers, copied from the paper text (shared/paper/iscam-paper.txt). Percentages.
PAPER_VALUES: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    # TABLE I. "Average AUC scores of the Insertion curve (the higher, the better) and Deletion curve (the
    # lower, the better) over all the 2000 images." VGG-16 (section IV.B). Columns "Insertion %", "Deletion %".
    "table_i": {
        "vgg16": {
            "insertion": {"gradcam": 45.25, "gradcampp": 44.94, "smoothgradcampp": 42.68,
                          "scorecam": 48.22, "sscam": 45.92, "iscam": 48.13},
            "deletion": {"gradcam": 11.25, "gradcampp": 11.41, "smoothgradcampp": 13.43,
                         "scorecam": 9.92, "sscam": 11.46, "iscam": 9.92},
        },
    },
    # TABLE II. "Average Drop (the lower, the better) and Average Increase in Confidence (the higher, the
    # better) across 2000 ILSVRC Validation images." Columns "VGG-16 / Resnet / SqueezeNet: Avg Drop%, Avg Inc%".
    "table_ii": {
        "vgg16": {
            "average_drop": {"scorecam": 66.03, "sscam": 79.15, "iscam": 63.30},
            "increase": {"scorecam": 51.85, "sscam": 51.30, "iscam": 52.35},
        },
        "resnet18": {
            "average_drop": {"scorecam": 64.23, "sscam": 64.53, "iscam": 64.85},
            "increase": {"scorecam": 53.55, "sscam": 54.80, "iscam": 53.50},
        },
        "squeezenet1_0": {
            "average_drop": {"scorecam": 13.42, "sscam": 12.06, "iscam": 13.00},
            "increase": {"scorecam": 60.85, "sscam": 64.85, "iscam": 62.15},
        },
    },
    # Win % (section IV.B, item 3, prose): "When our approach is compared to SS-CAM, we get 59.25% and when
    # compared to Score-CAM, we get 52.35% using VGG-16". Keyed by the method IS-CAM is compared against.
    "win": {
        "vgg16": {"win": {"sscam": 59.25, "scorecam": 52.35}},
    },
    # TABLE III. "Localization Evaluation": energy-based pointing game, columns "VGG-16 / ResNet18 /
    # SqueezeNet1.0 Proportion(%)".
    "table_iii": {
        "vgg16": {"pointing": {"gradcam": 42.69, "gradcampp": 42.87, "smoothgradcampp": 42.97,
                               "scorecam": 43.07, "sscam": 42.46, "iscam": 43.17}},
        "resnet18": {"pointing": {"gradcam": 43.55, "gradcampp": 43.53, "smoothgradcampp": 43.56,
                                  "scorecam": 43.46, "sscam": 43.30, "iscam": 43.52}},
        "squeezenet1_0": {"pointing": {"gradcam": 42.01, "gradcampp": 41.83, "smoothgradcampp": 41.77,
                                       "scorecam": 42.48, "sscam": 41.98, "iscam": 42.40}},
    },
}

#: Where each table's numbers come from in the paper.
PAPER_SOURCES: dict[str, str] = {
    "table_i": "Table I: insertion / deletion AUC (%), VGG-16, 2000 ILSVRC2012-val images",
    "table_ii": "Table II: Average Drop % / Average Increase in Confidence %, VGG-16, ResNet-18, SqueezeNet1.0",
    "win": "Section IV.B item 3: Win % of IS-CAM vs SS-CAM (59.25) and vs Score-CAM (52.35), VGG-16",
    "table_iii": "Table III: energy-based pointing game proportion (%), VGG-16, ResNet-18, SqueezeNet1.0",
}

#: Row order of the tables: the paper's, then the random baseline, then anything else (the registry's order).
METHOD_ORDER: tuple[str, ...] = tuple(METHODS)
_METRIC_LABELS = {"insertion": "Insertion %", "deletion": "Deletion %", "average_drop": "Avg Drop %",
                  "increase": "Avg Inc %", "pointing": "Proportion %"}
_COLUMNS = ["model", "method", "name", "params_key", "metric", "ours", "low", "high", "n", "paper",
            "paper_model", "diff", "skipped"]


class TableError(ValueError):
    """A store that cannot make the requested table (e.g. two parameter sets for one method)."""


def _paper_names() -> dict[str, str]:
    return dict(PAPER_NAMES)


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _config_keys(parsed: Any) -> dict[str, Any]:
    """The key columns a config's rows share (model, weights, resize, layer, precision, metrics_key)."""
    from .models import default_target_layer

    return {"model": parsed.model.name,
            "weights": "none" if parsed.model.weights is None else str(parsed.model.weights),
            "resize": parsed.model.preprocessing,
            "layer": parsed.model.target_layer or default_target_layer(parsed.model.name),
            "precision": parsed.precision, "metrics_key": parsed.metrics.key}


def select(frame: pd.DataFrame, config: Any = None, *, methods: Iterable[tuple[str, Mapping[str, Any]]] | None = None,
           metrics_key: str | None = None, seed: int | None = None, files: Iterable[str] | None = None,
           **columns: Any) -> pd.DataFrame:
    """Rows of ``frame`` that belong to one run description.

    ``config``: an :class:`iscam.config.ExperimentConfig`, its ``to_dict()`` (e.g. ``run.json``'s
    ``"config"``), or None. Keeps the rows with the config's model, weights, preprocessing, target layer,
    precision, (method, params) pairs and metric parameters -- every key column, so a store holding several
    layers or precisions is narrowed to one. ``files`` keeps those images only (the images the config
    selects: :func:`iscam.runner.plan`). ``methods`` / ``metrics_key`` / ``columns`` (``layer="features.2"``)
    select explicitly instead (``methods=[("iscam", {"N": 15})]``; the method's defaults are filled in as in
    the store, see :func:`iscam.config.method_key`, and ``seed`` -- default: the config's, else 0 -- picks
    the stochastic methods' rows).
    """
    from .config import method_key

    wanted_columns: dict[str, Any] = {}
    if config is not None:
        from .config import ExperimentConfig, config_from_dict

        parsed = config if isinstance(config, ExperimentConfig) else config_from_dict(config)
        wanted_columns = _config_keys(parsed)
        if methods is None:
            methods = [(m.name, m.params) for m in parsed.methods]
        if seed is None:
            seed = parsed.seed
    if metrics_key is not None:
        wanted_columns["metrics_key"] = metrics_key
    wanted_columns.update(columns)
    for column, value in wanted_columns.items():
        if column not in frame.columns:
            raise TableError(f"the frame has no column {column!r}")
        frame = frame[frame[column] == value]
    if methods is not None:
        wanted = {(name, method_key(name, params, seed=seed or 0)) for name, params in methods}
        pairs = list(zip(frame["method"], frame["params_key"]))
        frame = frame.loc[np.array([pair in wanted for pair in pairs], dtype=bool)]
    if files is not None:
        frame = frame[frame["file"].isin(set(files))]
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class Selection:
    """The rows of one study, paired: only the images every compared method has (:func:`selection`).

    ``frame`` is what the tables use; ``missing`` maps a method label to the planned images it lacks;
    ``dropped`` lists the images left out of ``frame`` because some method lacks them.
    """

    frame: pd.DataFrame
    planned: tuple[str, ...]
    missing: Mapping[str, tuple[str, ...]]
    dropped: tuple[str, ...]
    command: str = ""

    @property
    def complete(self) -> bool:
        return not any(self.missing.values())

    @property
    def images(self) -> int:
        return int(self.frame["file"].nunique()) if len(self.frame) else 0

    def notice(self) -> str:
        """One paragraph saying what is missing and the command that computes it ("" when complete)."""
        if self.complete:
            return ""
        lacking = [f"{label} lacks {len(files)} of {len(self.planned)} images" for label, files in self.missing.items()
                   if files]
        first = sorted({f for files in self.missing.values() for f in files})[:3]
        text = (f"INCOMPLETE: {'; '.join(lacking)} (e.g. {', '.join(first)}). The tables compare the methods on "
                f"the {self.images} of {len(self.planned)} images every method has.")
        if self.command:
            text += f" Complete the store with: {self.command}"
        return text


def selection(frame: pd.DataFrame, config: Any, files: Sequence[str], *, command: str = "",
              require_every_method: bool = True) -> Selection:
    """:func:`select` the rows of ``config`` on ``files`` and pair them: a method with no row at all is a
    :class:`TableError` naming it (``require_every_method``); images some method lacks are left out of
    every method and listed, with ``command`` (what completes the store) in :meth:`Selection.notice`."""
    from .config import ExperimentConfig, config_from_dict

    parsed = config if isinstance(config, ExperimentConfig) else config_from_dict(config)
    chosen = select(frame, parsed, files=files)
    missing: dict[str, tuple[str, ...]] = {}
    have: list[set[str]] = []
    for spec in parsed.methods:
        key = parsed.method_key(spec)
        present = set(chosen.loc[(chosen["method"] == spec.name) & (chosen["params_key"] == key), "file"])
        missing[spec.label()] = tuple(f for f in files if f not in present)
        have.append(present)
    absent = [label for label, lacking in missing.items() if len(lacking) == len(files) and files]
    if absent and require_every_method:
        where = f"; compute them with: {command}" if command else ""
        raise TableError(f"the store has no rows for {', '.join(absent)} on the {len(files)} images of config "
                         f"{parsed.name!r}{where}")
    common = set.intersection(*have) if have else set()
    dropped = tuple(f for f in files if f not in common and any(f in h for h in have))
    return Selection(chosen[chosen["file"].isin(common)].reset_index(drop=True), tuple(files), missing,
                     dropped, command)


#: The ``--set`` key that chooses each key column (for messages that must give a command that works).
_SET_KEYS = {"layer": "model.target_layer", "precision": "precision", "weights": "model.weights",
             "resize": "model.resize", "metrics_key": "metrics.<metric>.<parameter>",
             "params_key": "methods.<method>.<parameter>"}


def _check_unique(frame: pd.DataFrame) -> None:
    """One parameter set, metric protocol and setup per (model, method), or a TableError naming them."""
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        for column in ("params_key", "metrics_key", "layer", "precision", "weights", "resize"):
            if column not in group:  # e.g. the road table: ROAD has no metric parameters
                continue
            values = sorted(group[column].astype(str).unique())
            if len(values) > 1:
                example = f"--set {_SET_KEYS[column]}={values[0]}" if column not in ("params_key", "metrics_key") \
                    else f"--set {_SET_KEYS[column]}=..."
                raise TableError(
                    f"{model}/{method} has rows for {len(values)} different {column} values ({'; '.join(values)}): "
                    f"choose one, e.g. 'iscam table RESULTS {example}' (in Python: "
                    "iscam.tables.select(frame, config) or select(frame, {column}=...))".replace("{column}", column)
                )


def _paper(table: str, model: str, metric: str, method: str, paper_model: str | None) -> tuple[float, str]:
    from .models import MODELS

    values = PAPER_VALUES.get(table, {})  # ROAD is not in the paper
    column = MODELS[model].paper_column if model in MODELS else None
    chosen = paper_model or (column if column in values else "vgg16")
    if chosen not in values:
        return float("nan"), chosen
    return float(values[chosen].get(metric, {}).get(method, float("nan"))), chosen


def _row(model: str, method: str, pkey: str, metric: str, scores: np.ndarray, table: str,
         paper_model: str | None, n_boot: int, seed: int, paper_metric: str | None = None) -> dict[str, Any]:
    skipped = int((~np.isfinite(scores)).sum())
    scores = scores[np.isfinite(scores)]
    if scores.size:
        ci = bootstrap_ci(scores, n_boot=n_boot, seed=seed)
        ours, low, high = ci.estimate, ci.low, ci.high
    else:
        ours = low = high = float("nan")
    paper, chosen = _paper(table, model, paper_metric or metric, method, paper_model)
    return {"model": model, "method": method, "name": _paper_names().get(method, method), "params_key": pkey,
            "metric": metric, "ours": ours, "low": low, "high": high, "n": int(scores.size),
            "paper": paper, "paper_model": chosen, "diff": ours - paper, "skipped": skipped}


def _metric_table(frame: pd.DataFrame, table: str, metrics: Sequence[tuple[str, str]], *,
                  methods: Sequence[str] | None, paper_model: str | None, n_boot: int, seed: int) -> pd.DataFrame:
    _check_unique(frame)
    rows = []
    groups = frame.groupby(["model", "method"], sort=False)
    keys = sorted(groups.groups, key=lambda k: (k[0], _method_rank(k[1])))
    for model, method in keys:
        if methods is not None and method not in methods:
            continue
        group = groups.get_group((model, method))
        for metric, column in metrics:
            scores = 100.0 * group[column].to_numpy(dtype=np.float64)
            rows.append(_row(model, method, str(group["params_key"].iloc[0]), metric, scores, table,
                             paper_model, n_boot, seed))
    return pd.DataFrame(rows, columns=_COLUMNS)


def table_i(frame: pd.DataFrame, *, methods: Sequence[str] | None = None, paper_model: str | None = None,
            n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Table I: insertion AUC % (higher is better) and deletion AUC % (lower is better)."""
    return _metric_table(frame, "table_i", [("insertion", "insertion_auc"), ("deletion", "deletion_auc")],
                         methods=methods, paper_model=paper_model, n_boot=n_boot, seed=seed)


def table_ii(frame: pd.DataFrame, *, methods: Sequence[str] | None = None, paper_model: str | None = None,
             n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Table II: Average Drop % (lower is better) and Increase in Confidence % (higher is better)."""
    return _metric_table(frame, "table_ii", [("average_drop", "drop"), ("increase", "increase")],
                         methods=methods, paper_model=paper_model, n_boot=n_boot, seed=seed)


def table_iii(frame: pd.DataFrame, *, methods: Sequence[str] | None = None, paper_model: str | None = None,
              n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Table III: energy-based pointing game, proportion of the map's energy inside the boxes, %."""
    return _metric_table(frame, "table_iii", [("pointing", "pointing")],
                         methods=methods, paper_model=paper_model, n_boot=n_boot, seed=seed)


def road_table(frame: pd.DataFrame, *, methods: Sequence[str] | None = None, n_boot: int = 10000,
               seed: int = 0) -> pd.DataFrame:
    """ROAD (Rong et al. 2022) beside Table I, from a store's ``road`` table: the mean MoRF curve (most
    relevant pixels removed first; lower is better), the mean LeRF curve (least relevant first; higher is
    better) and their gap (LeRF - MoRF; higher is better), x 100, per image and averaged over the removal
    fractions. The paper has no ROAD numbers."""
    return _metric_table(frame, "road", [("road_morf", "road_morf"), ("road_lerf", "road_lerf"),
                                         ("road_gap", "road_gap")],
                         methods=methods, paper_model=None, n_boot=n_boot, seed=seed)


def win_table(frame: pd.DataFrame, *, method: str = "iscam", against: Sequence[str] = ("sscam", "scorecam"),
              paper_model: str | None = None, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Win % of ``method`` against each of ``against``, on the images both have (paired by file).

    One row per (model, opponent): ``metric`` is ``"win"``, ``method`` the opponent; ``tie`` holds the
    share of exact ties. The interval resamples images (bootstrap of the per-image win indicator).
    """
    _check_unique(frame)
    rows = []
    for model, group in sorted(frame.groupby("model", sort=False), key=lambda item: item[0]):
        mine = group[group["method"] == method].set_index("file")["change"]
        if mine.empty:
            continue
        for other in against:
            theirs = group[group["method"] == other].set_index("file")["change"]
            paired = pd.concat([mine.rename("a"), theirs.rename("b")], axis=1, join="inner").dropna()
            wins = 100.0 * (paired["a"] < paired["b"]).to_numpy(dtype=np.float64)
            row = _row(model, other, str(group.loc[group["method"] == method, "params_key"].iloc[0]), "win",
                       wins, "win", paper_model, n_boot, seed)
            row["tie"] = float(100.0 * (paired["a"] == paired["b"]).mean()) if len(paired) else float("nan")
            row["name"] = f"{_paper_names().get(method, method)} vs {_paper_names().get(other, other)}"
            rows.append(row)
    return pd.DataFrame(rows, columns=_COLUMNS + ["tie"])


def mean_curves(frame: pd.DataFrame, kind: str = "insertion") -> pd.DataFrame:
    """Mean insertion or deletion curve per (model, method) (Fig. 3): columns model, method, fraction, score.

    ``fraction`` is the share of pixels inserted/deleted (0..1 over the n+1 frames).
    """
    if kind not in ("insertion", "deletion"):
        raise TableError(f"kind must be 'insertion' or 'deletion', got {kind!r}")
    column = f"{kind}_curve"
    if column not in frame.columns:
        raise TableError(f"the frame has no {column} column: read the store with curves=True")
    _check_unique(frame)
    rows = []
    for (model, method), group in frame.groupby(["model", "method"], sort=False):
        curves = [np.asarray(c, dtype=np.float64) for c in group[column] if c is not None and len(c)]
        if not curves:
            continue
        lengths = {len(c) for c in curves}
        if len(lengths) > 1:
            raise TableError(f"{model}/{method}: curves of different lengths {sorted(lengths)} (mixed input sizes?)")
        mean = np.mean(np.stack(curves), axis=0)
        fractions = np.linspace(0.0, 1.0, len(mean))
        rows.extend({"model": model, "method": method, "fraction": f, "score": s, "n": len(curves)}
                    for f, s in zip(fractions, mean))
    result = pd.DataFrame(rows, columns=["model", "method", "fraction", "score", "n"])
    return result


def all_tables(frame: pd.DataFrame, *, n_boot: int = 10000, seed: int = 0,
               paper_model: str | None = None) -> dict[str, pd.DataFrame]:
    """Every table the frame has data for: keys ``table_i``, ``table_ii``, ``win``, ``table_iii``."""
    tables: dict[str, pd.DataFrame] = {}
    options = {"n_boot": n_boot, "seed": seed, "paper_model": paper_model}
    if frame[["insertion_auc", "deletion_auc"]].notna().any().any():
        tables["table_i"] = table_i(frame, **options)
    if frame["drop"].notna().any():
        tables["table_ii"] = table_ii(frame, **options)
        methods = set(frame["method"])
        if "iscam" in methods and methods & {"sscam", "scorecam"}:
            against = [m for m in ("sscam", "scorecam") if m in methods]
            tables["win"] = win_table(frame, against=against, **options)
    if frame["pointing"].notna().any():
        tables["table_iii"] = table_iii(frame, **options)
    return tables


def format_table(table: pd.DataFrame, *, title: str | None = None, digits: int = 2) -> str:
    """A long table as text: one line per (model, method), per metric ``ours [low, high] (paper p)``."""
    if table.empty:
        return (title + "\n" if title else "") + "(no rows)"
    lines = [title] if title else []
    metrics = list(dict.fromkeys(table["metric"]))
    cells: list[list[str]] = []
    header = ["model", "method", "n"] + [_METRIC_LABELS.get(m, "Win %" if m == "win" else m) for m in metrics]
    for (model, name), group in table.groupby(["model", "name"], sort=False):
        row = [str(model), str(name), str(int(group["n"].max()))]
        for metric in metrics:
            found = group[group["metric"] == metric]
            if found.empty:
                row.append("")
                continue
            item = found.iloc[0]
            text = f"{item['ours']:.{digits}f} [{item['low']:.{digits}f}, {item['high']:.{digits}f}]"
            if int(item.get("skipped", 0) or 0):  # an n smaller than the images' must say so
                text += f" n={int(item['n'])}, {int(item['skipped'])} skipped"
            if np.isfinite(item["paper"]):
                text += f" (paper {item['paper']:.{digits}f}"
                text += ")" if item["paper_model"] == model else f", {item['paper_model']})"
            row.append(text)
        cells.append(row)
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Display tables of the book: a long table beside the paper, costs, variants, map similarity
# --------------------------------------------------------------------------------------------------

_STAT_LABELS = ("ours", "95 % CI", "paper", "Δ")
_DISPLAY_LABELS = {"road_morf": "ROAD MoRF % ↓", "road_lerf": "ROAD LeRF % ↑", "road_gap": "ROAD gap % ↑",
                   "insertion": "Insertion AUC % ↑", "deletion": "Deletion AUC % ↓",
                   "average_drop": "Average Drop % ↓", "increase": "Increase in Confidence % ↑",
                   "win": "Win % ↑", "pointing": "Pointing game % ↑"}


def _number(value: float, digits: int, *, signed: bool = False) -> str:
    if value is None or not np.isfinite(float(value)):
        return "–"
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def paper_comparison(table: pd.DataFrame, *, digits: int = 2, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A long table as a wide display table: one row per (model, method), and per metric the columns
    *ours*, *95 % CI*, *paper* and *Δ* (ours - paper). ``labels`` names the models (default: the registry's
    labels); when the paper did not use the model, the label names the CNN whose published values are shown.
    A metric whose n is smaller than the images' says how many were skipped in its *ours* cell."""
    from .models import model_label

    if table.empty:
        raise TableError("the table is empty: the store has no rows for these methods")
    metrics = list(dict.fromkeys(table["metric"]))
    rows: dict[tuple[str, str], dict[tuple[str, str], str]] = {}
    for record in table.itertuples(index=False):
        paper_model = str(record.paper_model)
        label = (labels or {}).get(record.model, model_label(record.model))
        if paper_model != record.model:
            label += f" — paper: {model_label(paper_model)}"
        cells = rows.setdefault((label, str(record.name)), {})
        metric = _DISPLAY_LABELS.get(record.metric, record.metric)
        ours = _number(record.ours, digits)
        if int(getattr(record, "skipped", 0) or 0):
            ours += f" (n={int(record.n)}, {int(record.skipped)} skipped)"
        cells[(metric, "ours")] = ours
        cells[(metric, "95 % CI")] = f"[{_number(record.low, digits)}, {_number(record.high, digits)}]"
        cells[(metric, "paper")] = _number(record.paper, digits)
        cells[(metric, "Δ")] = _number(record.diff, digits, signed=True)
    columns = pd.MultiIndex.from_tuples(
        [(_DISPLAY_LABELS.get(m, m), stat) for m in metrics for stat in _STAT_LABELS], names=["metric", ""]
    )
    index = pd.MultiIndex.from_tuples(list(rows), names=["model", "method"])
    return pd.DataFrame([[cells.get(c, "") for c in columns] for cells in rows.values()], index=index,
                        columns=columns)


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds and forward passes per image of each (model, method, parameters) of ``frame``: the map's, the
    metrics' and their total, with the ratio of the map's cost to Score-CAM's. Columns: model, method, name,
    params_key, images, map_seconds, metric_seconds, seconds, forwards, metric_forwards, total_forwards,
    relative_seconds, relative_forwards (map cost / Score-CAM's map cost)."""
    names = _paper_names()
    rows = []
    for (model, method, pkey), group in frame.groupby(["model", "method", "params_key"], sort=False):
        map_s, metric_s = float(group["method_seconds"].mean()), float(group["metric_seconds"].mean())
        forwards, metric_f = float(group["forward_count"].mean()), float(group["metric_forward_count"].mean())
        rows.append({"model": model, "method": method, "name": names.get(method, method), "params_key": pkey,
                     "images": len(group), "map_seconds": map_s, "metric_seconds": metric_s,
                     "seconds": map_s + metric_s, "forwards": forwards, "metric_forwards": metric_f,
                     "total_forwards": forwards + metric_f})
    table = pd.DataFrame(rows)
    if table.empty:
        raise TableError("no rows to cost")
    table = table.iloc[sorted(range(len(table)), key=lambda i: (table["model"].iloc[i],
                                                                _method_rank(table["method"].iloc[i])))]
    for column, source in (("relative_seconds", "map_seconds"), ("relative_forwards", "forwards")):
        reference = table[table["method"] == "scorecam"].groupby("model")[source].first()
        table[column] = [value / reference.get(model, float("nan"))
                         for value, model in zip(table[source], table["model"])]
    return table.reset_index(drop=True)


def variant_table(sets: Mapping[str, Any], *, n_boot: int = 10000, seed: int = 0,
                  column: str = "variant") -> pd.DataFrame:
    """Tables I-III of each set of a variant (label -> :class:`Selection` or frame), long, with a ``column``
    holding the label and ``change`` = ours - the first set's value (the same images in every set)."""
    parts = []
    for label, chosen in sets.items():
        frame = chosen.frame if isinstance(chosen, Selection) else chosen
        for make in (table_i, table_ii, table_iii):
            parts.append(make(frame, n_boot=n_boot, seed=seed).assign(**{column: label}))
    long = pd.concat(parts, ignore_index=True)
    first = next(iter(sets))
    base = long[long[column] == first].set_index(["model", "method", "metric"])["ours"]
    keys = list(zip(long["model"], long["method"], long["metric"]))
    long["change"] = [ours - base.get(key, float("nan")) for ours, key in zip(long["ours"], keys)]
    return long


def map_similarity(maps: Mapping[Any, Any], files: Sequence[str], *, reference: Any,
                   model: str = "") -> pd.DataFrame:
    """How much the maps change across a variant's sets: per image and set, the Pearson correlation with the
    ``reference`` set's map and the mean absolute difference (maps in [0, 1]). ``maps``: set -> tensor
    ``[len(files), H, W]``. Columns: model, N (the set), file, correlation, mean_abs_diff (per image: what
    :func:`iscam.claims.evaluate` reads)."""
    import torch

    ref = torch.as_tensor(maps[reference]).flatten(1).double()
    rows = []
    for key, value in maps.items():
        other = torch.as_tensor(value).flatten(1).double()
        a = ref - ref.mean(1, keepdim=True)
        b = other - other.mean(1, keepdim=True)
        denominator = a.norm(dim=1) * b.norm(dim=1)
        # two constant maps agree (1); a constant map against a varying one has no correlation (NaN)
        both_flat = (a.norm(dim=1) == 0) & (b.norm(dim=1) == 0)
        correlation = torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp_min(1e-300),
                                  torch.where(both_flat, 1.0, float("nan")))
        difference = (other - ref).abs().mean(1)
        for i, file in enumerate(files):
            rows.append({"model": model, "N": key, "file": file, "correlation": float(correlation[i]),
                         "mean_abs_diff": float(difference[i])})
    return pd.DataFrame(rows, columns=["model", "N", "file", "correlation", "mean_abs_diff"])
