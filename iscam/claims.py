"""The paper's quantitative claims, listed once, with a verdict computed from a results store.

:data:`CLAIMS` quotes each claim of the IS-CAM paper (arXiv:2010.03023) with the table or section it comes
from and the comparison it makes; its numbers are read from :data:`iscam.tables.PAPER_VALUES`.
:func:`evaluate` checks every claim on every model of a store frame (narrowed to one parameter set per
method with :func:`iscam.tables.select`), :func:`format_claims` prints the result for the terminal and
:func:`claims_display` shapes it for the book. :func:`pairwise` and :func:`combine` are the two halves of
:func:`evaluate`, for readers who want every pairwise comparison behind a verdict.

How a claim is judged (the paper reports bare means, so every rule below is ours):

- **The difference.** Each claim rests on per-image differences, paired by file on the images both sides
  have a finite value for: IS-CAM minus the other method, in percentage points of the table's metric
  (``100 x`` the store's per-image value, as in :mod:`iscam.tables`). Its interval is the 95 % percentile
  bootstrap of the mean difference, :func:`iscam.stats.paired_bootstrap_diff`, seeded.
- **Directional claims** ("higher", "lower"): *supported* when the interval excludes 0 in the claimed
  direction, *contradicted* when it excludes 0 the other way, otherwise *not resolved at n images*.
- **Equivalence claims** ("close to", "ties": direction ``"equal"``): *supported* when the whole interval
  lies within ``±margin`` points (default 1 point of AUC), *contradicted* when it lies wholly outside that
  band (the two differ by more than the margin), otherwise not resolved.
- **Win %.** The paper's Win % of IS-CAM over B is the share of images where IS-CAM's confidence change
  ``Y - O`` is strictly smaller (:func:`iscam.metrics.win_rate`; the paper reads "higher is better").
  We read the claim as *IS-CAM wins more often than it loses*: the per-image sign
  ``[IS-CAM wins] - [IS-CAM loses]`` (ties count 0, so they are excluded from the comparison) has a
  positive mean, i.e. win % - loss % > 0. ``ours`` is the win %, ``ours_against`` the loss %.
- **Claims over several opponents** ("above the gradient methods", "the highest") combine pairwise
  comparisons (``combine="all"``): *supported* only if every pair is supported, *contradicted* if any pair
  is contradicted, otherwise not resolved. No multiplicity correction is needed: a conjunction of tests at
  level 5 % is itself a level-5 % test (intersection-union). The row shows the weakest pair.
- **"N changes the metrics"** (``combine="any"``) is supported if any (metric, N) pair -- IS-CAM at N
  against IS-CAM at the run's N -- excludes 0 either way, with Bonferroni-corrected intervals (level
  ``1 - 0.05 / pairs``), and contradicted when every pair's interval contains 0 and lies within ``±margin``
  points (no change larger than the margin). The row shows the strongest pair.
- **"N barely changes the maps"** needs per-image map correlations with the map at the run's N (Pearson, as
  the effect-of-N chapter computes them): supported when, for every N, the interval of the mean correlation
  lies above ``floor`` (default 0.9), contradicted when it lies below for some N.
- **Too few images.** A bootstrap interval from fewer than ``min_images`` (default 10) images is never
  taken as resolving a claim: the percentile bootstrap is far too narrow there (2 images already give an
  interval that excludes 0 whenever both differences share a sign).
- **Images needed.** For an unresolved claim, ``n_needed`` is a simple power estimate: the normal
  approximation ``n = ((z_{1-alpha/2} + z_{0.80}) * sd / d)^2`` (:func:`images_needed`) with the observed
  sd of the per-image differences and ``d`` the distance of the observed mean difference from the bound it
  must clear (0 for a directional claim, ``±margin`` for an equivalence, ``floor`` for the maps), for 80 %
  power at two-sided 5 % (Bonferroni-corrected where the intervals are), never below ``min_images``. It
  assumes the observed mean and sd are the true ones, so it is an order of magnitude, not a promise. A
  multi-pair claim needs every pair (``all``: the largest pair count to support, the smallest to
  contradict) or one pair (``any``: the reverse). ``inf`` means the observed mean sits exactly on the bound.

The claims are about VGG-16, the paper's model. Other models (the offline profiles' MobileNets, ResNet-18,
SqueezeNet) get the same comparisons; ``claim_model`` names the paper's model, ``paper_model`` whose published
numbers the row shows (the row's model where the paper reports it, else VGG-16, as in :mod:`iscam.tables`)
and ``note`` says when the row is not the paper's model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .methods import PAPER_NAMES
from .metrics import win_rate
from .stats import paired_bootstrap_diff
from .tables import PAPER_VALUES, _check_unique

__all__ = [
    "CHAPTERS",
    "CLAIMS",
    "POWER",
    "Claim",
    "ClaimError",
    "claims_display",
    "combine",
    "evaluate",
    "format_claims",
    "images_needed",
    "pairwise",
]

#: The book chapters a claim can link to (Jupyter Book doc names).
CHAPTERS: tuple[str, ...] = ("notebooks/03-insertion-deletion", "notebooks/04-confidence",
                             "notebooks/05-pointing-game", "notebooks/06-effect-of-n")
#: The power of the sample-size estimate (:func:`images_needed`).
POWER: float = 0.80

Kind = Literal["methods", "win", "n_metrics", "n_maps"]
Direction = Literal["higher", "lower", "equal", "changes", "at_least"]

# The store column behind each metric name of iscam.tables / PAPER_VALUES (the same mapping as the
# table functions of iscam.tables; tests/test_claims.py checks the two agree).
_METRIC_COLUMNS: dict[str, str] = {"insertion": "insertion_auc", "deletion": "deletion_auc",
                                   "average_drop": "drop", "increase": "increase", "pointing": "pointing"}
_SETUP_COLUMNS: tuple[str, ...] = ("metrics_key", "layer", "precision", "weights", "resize")
_FRAME_COLUMNS: tuple[str, ...] = ("file", "model", "method", "params_key", *_SETUP_COLUMNS,
                                   *_METRIC_COLUMNS.values(), "change")


class ClaimError(ValueError):
    """Input the claims cannot be checked on (missing columns, ambiguous rows, bad options)."""


@dataclass(frozen=True)
class Claim:
    """One quantitative claim of the paper and the comparison that checks it.

    ``summary``: our short wording, IS-CAM being the subject ("insertion AUC close to Score-CAM's").
    ``quote``: the paper's words, verbatim up to line breaks (one or more passages). ``where``: the table or
    section. ``kind``: ``"methods"`` (a metric of ``method`` against each of ``against``), ``"win"`` (Win %
    against each of ``against``), ``"n_metrics"`` (``metrics`` of ``method`` at other N against the run's N)
    or ``"n_maps"`` (map correlation with the run's N). ``direction``: what the claim says of
    ``method - opponent`` (``"higher"``, ``"lower"``, ``"equal"`` within ``±margin``, ``"changes"``, or
    ``"at_least"`` ``floor``). ``combine``: ``"all"`` pairs must hold, or ``"any"``. ``model``: the CNN the
    paper makes the claim for.
    """

    id: str
    summary: str
    quote: tuple[str, ...]
    where: str
    chapter: str
    kind: Kind
    metrics: tuple[str, ...]
    direction: Direction
    method: str = "iscam"
    against: tuple[str, ...] = ()
    combine: Literal["all", "any"] = "all"
    margin: float | None = None
    floor: float | None = None
    model: str = "vgg16"

    def __post_init__(self) -> None:
        if self.chapter not in CHAPTERS:
            raise ClaimError(f"claim {self.id!r}: chapter {self.chapter!r} is not one of "
                             f"{', '.join(CHAPTERS)}")
        if self.kind not in ("methods", "win", "n_metrics", "n_maps"):
            raise ClaimError(f"claim {self.id!r}: unknown kind {self.kind!r}")
        if self.direction not in ("higher", "lower", "equal", "changes", "at_least"):
            raise ClaimError(f"claim {self.id!r}: unknown direction {self.direction!r}")
        if self.combine not in ("all", "any"):
            raise ClaimError(f"claim {self.id!r}: combine must be 'all' or 'any', got {self.combine!r}")
        known = set(_METRIC_COLUMNS) | {"win", "map_correlation"}
        if not self.metrics or set(self.metrics) - known:
            raise ClaimError(f"claim {self.id!r}: metrics {self.metrics!r} must be among {sorted(known)}")
        for name in (self.method, *self.against):
            if name not in PAPER_NAMES:
                raise ClaimError(f"claim {self.id!r}: unknown method {name!r}; valid: "
                                 f"{', '.join(PAPER_NAMES)}")
        if self.kind in ("methods", "win") and not self.against:
            raise ClaimError(f"claim {self.id!r}: a {self.kind!r} claim needs the methods it compares "
                             "against")
        if self.direction in ("equal", "changes") and not _positive(self.margin):
            raise ClaimError(f"claim {self.id!r}: direction {self.direction!r} needs a margin > 0, got "
                             f"{self.margin!r}")
        if self.direction == "at_least" and (self.floor is None or not math.isfinite(self.floor)):
            raise ClaimError(f"claim {self.id!r}: direction 'at_least' needs a finite floor, got "
                             f"{self.floor!r}")

    def paper_values(self, model: str | None = None) -> dict[str, float]:
        """The published numbers behind the claim for ``model`` (default: the claim's), from
        :data:`iscam.tables.PAPER_VALUES`: method -> value (for Win %, opponent -> Win % of IS-CAM over it).
        Empty where the paper reports none (the N claims, or a model the table does not have)."""
        table = _paper_table(self.metrics[0]) if self.kind in ("methods", "win") else None
        if table is None:
            return {}
        values = PAPER_VALUES[table].get(model or self.model, {}).get(self.metrics[0], {})
        names = self.against if self.kind == "win" else (self.method, *self.against)
        return {name: float(values[name]) for name in names if name in values}

    @property
    def paper(self) -> dict[str, float]:
        """The published numbers for the paper's model (see :meth:`paper_values`)."""
        return self.paper_values()


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _paper_table(metric: str) -> str | None:
    """The key of :data:`PAPER_VALUES` that holds ``metric`` (None when the paper reports no such number)."""
    for table, models in PAPER_VALUES.items():
        if any(metric in metrics for metrics in models.values()):
            return table
    return None


_TABLE_I = "Table I; section IV.B"
_TABLE_II = "Table II; section IV.B"
_CONCLUSION_N = "Section V"
_WIN = "Section IV.B, item 3 (Win %)"
_OVERALL = ("The AUC scores, Average Drop and Increase in Confidence indicate that IS-CAM performs better on "
            "an overall perspective.")

#: The paper's quantitative claims (VGG-16 unless ``model`` says otherwise), in the paper's order.
CLAIMS: tuple[Claim, ...] = (
    Claim(id="insertion-close-scorecam",
          summary="insertion AUC close to Score-CAM's",
          quote=("Average AUC scores of the Insertion curve(the higher, the better)", "Score-CAM 48.22 9.92",
                 "IS-CAM 48.13 9.92",
                 "IS-CAM does well in both perspectives which shows its profound versatility."),
          where=_TABLE_I, chapter="notebooks/03-insertion-deletion", kind="methods", metrics=("insertion",),
          direction="equal", against=("scorecam",), margin=1.0),
    Claim(id="insertion-above-gradient",
          summary="insertion AUC above the three gradient CAMs'",
          quote=("We attain improved performance in comparison to previous CAM-based methods.",
                 "Average AUC scores of the Insertion curve(the higher, the better)"),
          where=_TABLE_I, chapter="notebooks/03-insertion-deletion", kind="methods", metrics=("insertion",),
          direction="higher", against=("gradcam", "gradcampp", "smoothgradcampp")),
    Claim(id="deletion-ties-scorecam",
          summary="deletion AUC ties Score-CAM's",
          quote=("Deletion curve(the lower, the better)", "Score-CAM 48.22 9.92", "IS-CAM 48.13 9.92"),
          where=_TABLE_I, chapter="notebooks/03-insertion-deletion", kind="methods", metrics=("deletion",),
          direction="equal", against=("scorecam",), margin=1.0),
    Claim(id="drop-below-scorecam-sscam",
          summary="Average Drop below Score-CAM's and SS-CAM's",
          quote=(_OVERALL, "it fails to do so in Average Drop and Inc% using VGG-16",
                 "Average Drop (the lower, the better)"),
          where=_TABLE_II, chapter="notebooks/04-confidence", kind="methods", metrics=("average_drop",),
          direction="lower", against=("scorecam", "sscam")),
    Claim(id="increase-above-scorecam-sscam",
          summary="Increase in Confidence above Score-CAM's, SS-CAM's",
          quote=(_OVERALL, "it fails to do so in Average Drop and Inc% using VGG-16"),
          where=_TABLE_II, chapter="notebooks/04-confidence", kind="methods", metrics=("increase",),
          direction="higher", against=("scorecam", "sscam")),
    Claim(id="win-vs-scorecam",
          summary="wins more often than loses vs Score-CAM",
          quote=(("when compared to Score-CAM, we get 52.35% using VGG-16(higher is better); which indicates "
                  "that IS-CAM performs better with respect to this metric."),),
          where=_WIN, chapter="notebooks/04-confidence", kind="win", metrics=("win",),
          direction="higher", against=("scorecam",)),
    Claim(id="win-vs-sscam",
          summary="wins more often than loses vs SS-CAM",
          quote=("When our approach is compared to SS-CAM, we get 59.25%",
                 "which indicates that IS-CAM performs better with respect to this metric."),
          where=_WIN, chapter="notebooks/04-confidence", kind="win", metrics=("win",),
          direction="higher", against=("sscam",)),
    Claim(id="pointing-highest",
          summary="highest energy pointing game of the six",
          quote=("It also achieves the highest value for the VGG-16 variant.",),
          where="Table III; section IV.C", chapter="notebooks/05-pointing-game", kind="methods",
          metrics=("pointing",), direction="higher",
          against=("gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam")),
    Claim(id="n-barely-changes-maps",
          summary="N barely changes the maps",
          quote=(("the increase or decrease of the value N , does not have a significant impact on the "
                  "visual attribution map produced."),),
          where=_CONCLUSION_N, chapter="notebooks/06-effect-of-n", kind="n_maps", metrics=("map_correlation",),
          direction="at_least", floor=0.9),
    Claim(id="n-changes-metrics",
          summary="N changes the metrics",
          quote=("The effect of N is quite evident quantitatively as demonstrated in our experiments.",),
          where=_CONCLUSION_N, chapter="notebooks/06-effect-of-n", kind="n_metrics",
          metrics=("insertion", "deletion", "average_drop", "increase", "pointing"),
          direction="changes", combine="any", margin=1.0),
)


# --------------------------------------------------------------------------------------------------
# Power estimate and the verdict of one pair
# --------------------------------------------------------------------------------------------------

def images_needed(sd: float, distance: float, *, level: float = 0.95, power: float = POWER) -> float:
    """Images for a two-sided test at ``1 - level`` to clear a bound ``distance`` away with ``power``.

    Normal approximation with a known sd: ``n = ((z_{(1+level)/2} + z_power) * sd / distance)^2``, rounded
    up; e.g. sd 2, distance 1 at 95 % / 80 %: ``(1.95996 + 0.84162)^2 * 4 = 31.4`` -> 32 images.
    ``math.inf`` when ``distance`` is 0 (the observed mean sits on the bound), NaN when ``sd`` is NaN.
    """
    if not 0.0 < level < 1.0 or not 0.0 < power < 1.0:
        raise ClaimError(f"level and power must lie strictly between 0 and 1, got {level!r} and {power!r}")
    if math.isnan(sd) or math.isnan(distance):
        return math.nan
    if sd < 0 or distance < 0:
        raise ClaimError(f"sd and distance must be non-negative, got {sd!r} and {distance!r}")
    if distance == 0:
        return math.inf
    normal = NormalDist()
    z = normal.inv_cdf((1.0 + level) / 2.0) + normal.inv_cdf(power)
    return float(math.ceil((z * sd / distance) ** 2))


def _status(low: float, high: float, direction: Direction, margin: float | None) -> str:
    """The interval's verdict (before the ``min_images`` rule); ``at_least`` differences are value - floor."""
    if direction in ("higher", "at_least"):
        return "supported" if low > 0 else "contradicted" if high < 0 else "not resolved"
    if direction == "lower":
        return "supported" if high < 0 else "contradicted" if low > 0 else "not resolved"
    assert margin is not None
    if direction == "equal":
        if -margin <= low and high <= margin:
            return "supported"
        return "contradicted" if low > margin or high < -margin else "not resolved"
    # "changes": any significant change supports; an interval around 0 inside the band contradicts.
    if low > 0 or high < 0:
        return "supported"
    return "contradicted" if -margin <= low and high <= margin else "not resolved"


def _route_distances(mean: float, direction: Direction, margin: float | None) -> tuple[float, float]:
    """How far the observed mean difference is from the bound it must clear to support / to contradict
    (``inf``: that verdict is out of reach while the mean stays where it is)."""
    inf = math.inf
    if direction in ("higher", "at_least"):
        return (mean if mean > 0 else inf), (-mean if mean < 0 else inf)
    if direction == "lower":
        return (-mean if mean < 0 else inf), (mean if mean > 0 else inf)
    assert margin is not None
    if direction == "equal":
        gap = margin - abs(mean)
        return (gap if gap > 0 else inf), (-gap if gap < 0 else inf)
    # "changes": more images resolve a non-zero mean as a change; only a zero mean can end inside the band.
    return (abs(mean) if mean != 0 else inf), (margin if mean == 0 else inf)


def _strength(low: float, high: float, direction: Direction, margin: float | None) -> float:
    """How far the interval is on the claim's side of its bound (larger: stronger support)."""
    if direction in ("higher", "at_least"):
        return low
    if direction == "lower":
        return -high
    assert margin is not None
    if direction == "equal":
        return margin - max(abs(low), abs(high))
    return max(low, -high)


@dataclass(frozen=True)
class _Pair:
    """One comparison to run: ``a`` and ``b`` paired per image (``b`` a constant for the maps' floor)."""

    claim: Claim
    model: str
    opponent: str  # display label of the other side
    metric: str
    a: np.ndarray
    b: np.ndarray
    ours: float
    ours_against: float
    note: str = ""


def _judge(pair: _Pair, *, margin: float | None, level: float, n_boot: int, seed: int,
           min_images: int, power: float) -> dict[str, Any]:
    claim = pair.claim
    row: dict[str, Any] = {"claim": claim.id, "model": pair.model, "opponent": pair.opponent,
                           "metric": pair.metric, "ours": pair.ours, "ours_against": pair.ours_against,
                           "level": level, "n": int(pair.a.size), "note": pair.note}
    if pair.a.size == 0:
        return {**row, "diff": math.nan, "low": math.nan, "high": math.nan, "status": "not evaluated",
                "n_support": math.nan, "n_contradict": math.nan,
                "note": pair.note or f"no image has a value for both {claim.method} and {pair.opponent}"}
    ci = paired_bootstrap_diff(pair.a, pair.b, n_boot=n_boot, seed=seed, level=level)
    differences = pair.a - pair.b
    sd = float(np.std(differences, ddof=1)) if differences.size > 1 else math.nan
    status = _status(ci.low, ci.high, claim.direction, margin)
    if status != "not resolved" and differences.size < min_images:
        status = "not resolved"
        row["note"] = f"fewer than {min_images} images: no verdict"
    to_support, to_contradict = (
        math.inf if math.isinf(d) else max(images_needed(sd, d, level=level, power=power), float(min_images))
        for d in _route_distances(ci.estimate, claim.direction, margin))
    if status == "supported":
        to_support, to_contradict = float(differences.size), math.inf
    elif status == "contradicted":
        to_support, to_contradict = math.inf, float(differences.size)
    return {**row, "diff": ci.estimate, "low": ci.low, "high": ci.high, "status": status,
            "n_support": to_support, "n_contradict": to_contradict}


# --------------------------------------------------------------------------------------------------
# Building the pairs from the frames
# --------------------------------------------------------------------------------------------------

def _label(method: str) -> str:
    return PAPER_NAMES.get(method, method)


def _require_columns(frame: Any, columns: Sequence[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ClaimError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ClaimError(f"{name} lacks the column(s) {', '.join(missing)}")


def _by_file(rows: pd.DataFrame, column: str, where: str) -> pd.Series:
    """``column`` of ``rows`` indexed by file (non-finite values dropped); a file twice is an error."""
    if rows["file"].duplicated().any():
        twice = sorted(rows.loc[rows["file"].duplicated(), "file"].astype(str).unique())
        raise ClaimError(f"{where} has several rows for the same image ({', '.join(twice[:5])}): "
                         "narrow the frame to one parameter set per method (iscam.tables.select)")
    series = pd.Series(rows[column].to_numpy(dtype=np.float64), index=rows["file"].to_numpy())
    return series[np.isfinite(series.to_numpy())]


def _paired(first: pd.Series, second: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    both = pd.concat([first.rename("a"), second.rename("b")], axis=1, join="inner").sort_index()
    return both["a"].to_numpy(np.float64), both["b"].to_numpy(np.float64)


def _method_pairs(claim: Claim, model: str, rows: pd.DataFrame) -> list[_Pair]:
    metric = claim.metrics[0]
    column = _METRIC_COLUMNS[metric]
    present = set(rows["method"])
    mine = (_by_file(rows[rows["method"] == claim.method], column, f"{model}/{claim.method}")
            if claim.method in present else None)
    pairs = []
    for other in claim.against:
        if mine is None or other not in present:
            absent = claim.method if mine is None else other
            pairs.append(_Pair(claim, model, _label(other), metric, np.empty(0), np.empty(0), math.nan,
                               math.nan, note=f"no {absent} rows for {model}"))
            continue
        theirs = _by_file(rows[rows["method"] == other], column, f"{model}/{other}")
        a, b = _paired(100.0 * mine, 100.0 * theirs)
        pairs.append(_Pair(claim, model, _label(other), metric, a, b, _mean(a), _mean(b)))
    return pairs


def _win_pairs(claim: Claim, model: str, rows: pd.DataFrame) -> list[_Pair]:
    present = set(rows["method"])
    pairs = []
    for other in claim.against:
        if claim.method not in present or other not in present:
            absent = claim.method if claim.method not in present else other
            pairs.append(_Pair(claim, model, _label(other), "win", np.empty(0), np.empty(0), math.nan,
                               math.nan, note=f"no {absent} rows for {model}"))
            continue
        mine = _by_file(rows[rows["method"] == claim.method], "change", f"{model}/{claim.method}")
        theirs = _by_file(rows[rows["method"] == other], "change", f"{model}/{other}")
        change_mine, change_theirs = _paired(mine, theirs)
        if not change_mine.size:
            pairs.append(_Pair(claim, model, _label(other), "win", np.empty(0), np.empty(0), math.nan,
                               math.nan))
            continue
        rate = win_rate(torch.tensor(change_mine), torch.tensor(change_theirs))
        # Per image: 100 if IS-CAM wins (strictly smaller Y - O, win_rate's rule), 0 on a tie, and the loss
        # indicator on the other side, so a - b is the signed outcome and its mean is win % - loss %.
        wins = 100.0 * (change_mine < change_theirs)
        losses = 100.0 * (change_mine > change_theirs)
        pairs.append(_Pair(claim, model, _label(other), "win", wins, losses, rate.win, rate.loss,
                           note=f"ties {rate.tie:.1f} %" if rate.tie else ""))
    return pairs


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _run_n(rows: pd.DataFrame, claim: Claim, model: str) -> tuple[int, dict[str, Any]] | None:
    """The run's N and the other parameters of ``claim.method`` on ``model`` (None without its rows)."""
    mine = rows[rows["method"] == claim.method]
    if mine.empty:
        return None
    params = _params(str(mine["params_key"].iloc[0]), f"{model}/{claim.method}")
    return params.pop("N"), params


def _params(key: str, where: str) -> dict[str, Any]:
    try:
        params = json.loads(key)
    except json.JSONDecodeError as error:
        raise ClaimError(f"{where}: params_key {key!r} is not JSON ({error})") from error
    if not isinstance(params, dict) or not isinstance(params.get("N"), int):
        raise ClaimError(f"{where}: params_key {key!r} has no integer N")
    return params


def _sweep_pairs(claim: Claim, model: str, rows: pd.DataFrame, sweep: pd.DataFrame | None) -> list[_Pair]:
    def missing(note: str) -> list[_Pair]:
        return [_Pair(claim, model, "", claim.metrics[0], np.empty(0), np.empty(0), math.nan, math.nan, note)]

    if sweep is None:
        return missing("no N sweep in the store")
    run = _run_n(rows, claim, model)
    if run is None:
        return missing(f"no {claim.method} rows for {model}")
    reference, others = run
    mine = rows[rows["method"] == claim.method]
    chosen = sweep[(sweep["model"] == model) & (sweep["method"] == claim.method)]
    for column in _SETUP_COLUMNS:  # the same protocol and setup as the run's rows
        chosen = chosen[chosen[column].astype(str) == str(mine[column].iloc[0])]
    by_n: dict[int, pd.DataFrame] = {}
    for key, group in chosen.groupby("params_key", sort=False):
        params = _params(str(key), f"N sweep {model}/{claim.method}")
        value = params.pop("N")
        if params == others and value != reference:
            if value in by_n:
                raise ClaimError(f"N sweep {model}/{claim.method}: two parameter sets with N={value}")
            by_n[value] = group
    if not by_n:
        return missing(f"the N sweep has no {claim.method} rows for {model} at an N other than the run's "
                       f"N={reference} with the run's other parameters and protocol")
    pairs = []
    for value in sorted(by_n):
        for metric in claim.metrics:
            column = _METRIC_COLUMNS[metric]
            at_value = _by_file(by_n[value], column, f"N sweep {model}/{claim.method} N={value}")
            at_reference = _by_file(mine, column, f"{model}/{claim.method}")
            a, b = _paired(100.0 * at_value, 100.0 * at_reference)
            pairs.append(_Pair(claim, model, f"N={value} vs N={reference}", metric, a, b, _mean(a), _mean(b)))
    return pairs


def _similarity_pairs(claim: Claim, model: str, rows: pd.DataFrame, similarity: pd.DataFrame | None,
                      floor: float) -> list[_Pair]:
    def missing(note: str) -> list[_Pair]:
        return [_Pair(claim, model, "", "map_correlation", np.empty(0), np.empty(0), math.nan, math.nan,
                      note)]

    if similarity is None:
        return missing("no map similarities of an N sweep given")
    run = _run_n(rows, claim, model)
    if run is None:
        return missing(f"no {claim.method} rows for {model}")
    reference = run[0]
    chosen = similarity[similarity["model"] == model] if "model" in similarity.columns else similarity
    chosen = chosen[chosen["N"].astype(int) != reference]
    if chosen.empty:
        return missing(f"no map similarities for {model} at an N other than the run's N={reference}")
    if "file" not in chosen.columns and "images" in chosen.columns and (chosen["images"] > 1).any():
        return missing("the map similarities are means over images (column 'images'): pass one row per "
                       "image (columns N, correlation, file) for an interval")
    pairs = []
    for value, group in sorted(chosen.groupby(chosen["N"].astype(int)), key=lambda item: item[0]):
        if "file" in group.columns and group["file"].duplicated().any():
            raise ClaimError(f"map similarities for {model}, N={value}: an image appears twice")
        a = group["correlation"].to_numpy(np.float64)
        pairs.append(_Pair(claim, model, f"N={value} vs N={reference}", "map_correlation", a,
                           np.full_like(a, floor), _mean(a), floor))
    return pairs


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

_PAIR_COLUMNS = ["claim", "model", "opponent", "metric", "ours", "ours_against", "diff", "low", "high",
                 "level", "n", "status", "n_support", "n_contradict", "note"]


def _check_options(n_boot: int, seed: int, level: float, min_images: int, power: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ClaimError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ClaimError(f"seed must be an integer, got {seed!r}")
    if not 0.0 < level < 1.0 or not 0.0 < power < 1.0:
        raise ClaimError(f"level and power must lie strictly between 0 and 1, got {level!r} and {power!r}")
    if isinstance(min_images, bool) or not isinstance(min_images, (int, np.integer)) or min_images < 2:
        raise ClaimError(f"min_images must be an integer >= 2 (one image has no spread), got {min_images!r}")


def _check_inputs(frame: pd.DataFrame, sweep: pd.DataFrame | None, similarity: pd.DataFrame | None) -> None:
    _require_columns(frame, _FRAME_COLUMNS, "the results frame")
    _check_unique(frame)
    if sweep is not None:
        _require_columns(sweep, _FRAME_COLUMNS, "the N sweep frame")
    if similarity is not None:
        _require_columns(similarity, ("N", "correlation"), "the map-similarity frame")
        values = pd.to_numeric(similarity["correlation"], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (np.abs(values) > 1.0 + 1e-9))
        if bad.size:
            raise ClaimError(f"the map-similarity frame has {bad.size} correlation(s) that are not finite "
                             f"values in [-1, 1] (rows {bad[:10].tolist()})")
        numbers = pd.to_numeric(similarity["N"], errors="coerce").to_numpy(np.float64)
        if (~np.isfinite(numbers) | (numbers != np.round(numbers))).any():
            raise ClaimError("the map-similarity frame's column N must hold integers")
        if "model" not in similarity.columns and frame["model"].nunique() > 1:
            raise ClaimError("the map-similarity frame has no 'model' column but the results frame has "
                             f"{frame['model'].nunique()} models: say which model each row is for")


def _check_flags(flags: Collection[str] | None) -> None:
    if flags is None:
        return
    if isinstance(flags, str) or not all(isinstance(name, str) for name in flags):
        raise ClaimError(f"flags must be a collection of method names, got {flags!r}")
    unknown = sorted(set(flags) - set(PAPER_NAMES))
    if unknown:
        raise ClaimError(f"flags names unknown method(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(PAPER_NAMES)}")


def _with_options(claims: Sequence[Claim], margin: float | None, floor: float | None) -> list[Claim]:
    if margin is not None and not _positive(margin):
        raise ClaimError(f"margin must be a finite number > 0 (percentage points), got {margin!r}")
    if floor is not None and not (isinstance(floor, (int, float)) and -1.0 <= floor <= 1.0):
        raise ClaimError(f"floor must be a correlation in [-1, 1], got {floor!r}")
    chosen = []
    for claim in claims:
        if not isinstance(claim, Claim):
            raise ClaimError(f"claims must be Claim objects, got {type(claim).__name__}")
        if margin is not None and claim.margin is not None:
            claim = replace(claim, margin=float(margin))
        if floor is not None and claim.floor is not None:
            claim = replace(claim, floor=float(floor))
        chosen.append(claim)
    ids = [claim.id for claim in chosen]
    if len(set(ids)) != len(ids):
        raise ClaimError(f"claim ids must be unique, got {ids}")
    return chosen


def pairwise(frame: pd.DataFrame, *, sweep: pd.DataFrame | None = None,
             similarity: pd.DataFrame | None = None, claims: Sequence[Claim] = CLAIMS,
             margin: float | None = None, floor: float | None = None, n_boot: int = 10000, seed: int = 0,
             level: float = 0.95, min_images: int = 10, power: float = POWER) -> pd.DataFrame:
    """Every pairwise comparison behind the claims: one row per (claim, model, opponent).

    Columns: claim, model, opponent (display label: "Score-CAM", "N=5 vs N=10"), metric, ours /
    ours_against (the two sides' means in points on the paired images; Win %: win % / loss %), diff, low,
    high (the paired-bootstrap interval at ``level``; Bonferroni-corrected for ``combine="any"`` claims),
    level, n (paired images), status (supported / contradicted / not resolved / not evaluated),
    n_support / n_contradict (images at which the pair would be resolved that way, see the module
    docstring), note. Inputs and options as for :func:`evaluate`.
    """
    _check_options(n_boot, seed, level, min_images, power)
    _check_inputs(frame, sweep, similarity)
    chosen = _with_options(claims, margin, floor)
    rows: list[dict[str, Any]] = []
    planned: list[tuple[Claim, list[_Pair]]] = []
    for model in sorted(frame["model"].astype(str).unique()):
        model_rows = frame[frame["model"] == model]
        for claim in chosen:
            if claim.kind == "methods":
                pairs = _method_pairs(claim, model, model_rows)
            elif claim.kind == "win":
                pairs = _win_pairs(claim, model, model_rows)
            elif claim.kind == "n_metrics":
                pairs = _sweep_pairs(claim, model, model_rows, sweep)
            else:
                assert claim.floor is not None
                pairs = _similarity_pairs(claim, model, model_rows, similarity, claim.floor)
            planned.append((claim, pairs))
    for claim, pairs in planned:  # every input is checked above; only now the bootstraps run
        pair_level = 1.0 - (1.0 - level) / len(pairs) if claim.combine == "any" else level
        for pair in pairs:
            rows.append(_judge(pair, margin=claim.margin, level=pair_level, n_boot=n_boot, seed=seed,
                               min_images=min_images, power=power))
    return pd.DataFrame(rows, columns=_PAIR_COLUMNS)


def _aggregate(values: Sequence[float], how: str) -> float:
    """max / min of route counts; NaN (no estimate for some pair) wins over numbers."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if how == "max" else min(values)


def _verdict(status: str, n: int, note: str) -> str:
    if status == "not resolved":
        return f"not resolved at {n} image{'s' if n != 1 else ''}"
    if status == "not evaluated":
        return f"not evaluated: {note}"
    return status


_CLAIM_COLUMNS = ["claim", "model", "summary", "quote", "where", "chapter", "kind", "metric", "opponent",
                  "pairs", "ours", "ours_against", "diff", "low", "high", "level", "n", "status", "verdict",
                  "n_needed", "resolves_as", "paper", "paper_against", "paper_numbers", "paper_model",
                  "claim_model", "margin", "floor", "flagged", "note"]


# Which pair a row shows: "all" claims the lowest-ranked (weakest), "any" claims the highest (strongest).
_RANK = {status: k for k, status in enumerate(("contradicted", "not evaluated", "not resolved", "supported"))}


def combine(pairs: pd.DataFrame, *, claims: Sequence[Claim] = CLAIMS,
            flags: Collection[str] | None = None) -> pd.DataFrame:
    """One row per (claim, model) from :func:`pairwise`'s rows, by each claim's ``combine`` rule.

    ``all``: contradicted if any pair is, else not evaluated if any pair is, else supported if every pair
    is, else not resolved. ``any``: supported if any pair is, else not evaluated if any pair is, else
    contradicted if every pair is, else not resolved. The numbers shown are the deciding pair's: the
    weakest for ``all``, the strongest for ``any``. ``n_needed`` (unresolved rows only) is the smaller of
    the images needed to support and to contradict the claim, ``resolves_as`` which of the two it is.
    Columns: see :func:`evaluate`.
    ``claims`` must hold the claims ``pairs`` was computed with (same margins); ``flags`` as for
    :func:`evaluate`.
    """
    _check_flags(flags)
    _require_columns(pairs, _PAIR_COLUMNS, "the pairs frame")
    by_id = {claim.id: claim for claim in claims}
    unknown = sorted(set(pairs["claim"]) - set(by_id))
    if unknown:
        raise ClaimError(f"the pairs frame has claims that are not in claims: {', '.join(unknown)}")
    flagged_methods = set(flags or ())
    order = {claim.id: k for k, claim in enumerate(claims)}
    rows = []
    groups = pairs.groupby(["model", "claim"], sort=False)
    for model, claim_id in sorted(groups.groups, key=lambda key: (key[0], order[key[1]])):
        claim = by_id[claim_id]
        group = groups.get_group((model, claim_id)).reset_index(drop=True)
        statuses = list(group["status"])
        # "all": one contradicted pair decides; "any": one supported pair does.
        first, second = (("contradicted", "supported") if claim.combine == "all"
                         else ("supported", "contradicted"))
        if first in statuses:
            status = first
        elif "not evaluated" in statuses:
            status = "not evaluated"
        elif all(s == second for s in statuses):
            status = second
        else:
            status = "not resolved"
        strength = [(_strength(lo, hi, claim.direction, claim.margin) if np.isfinite(lo) else -math.inf)
                    for lo, hi in zip(group["low"], group["high"])]
        keys = [(_RANK[s], st) for s, st in zip(statuses, strength)]
        pick = (min if claim.combine == "all" else max)(range(len(group)), key=keys.__getitem__)
        deciding = group.iloc[pick]
        if status == "not resolved":
            support_how, contradict_how = ("max", "min") if claim.combine == "all" else ("min", "max")
            to_support = _aggregate(list(group["n_support"]), support_how)
            to_contradict = _aggregate(list(group["n_contradict"]), contradict_how)
            n_needed = min(to_support, to_contradict)
            resolves_as = ("" if not math.isfinite(n_needed)
                           else "supported" if to_support <= to_contradict else "contradicted")
        else:
            n_needed, resolves_as = math.nan, ""
        note = str(deciding["note"])
        if status == "not evaluated":
            missing = [str(n) for n, s in zip(group["note"], statuses) if s == "not evaluated"]
            note = "; ".join(dict.fromkeys(missing))
        verdict = _verdict(status, int(deciding["n"]), note)
        paper, paper_against, paper_model = _paper_columns(claim, str(model), str(deciding["opponent"]))
        if model != claim.model:
            note = "; ".join(filter(None, [note, f"the paper makes this claim for {claim.model}"]))
        methods = (claim.method, *claim.against)
        rows.append({
            "claim": claim.id, "model": model, "summary": claim.summary, "quote": " … ".join(claim.quote),
            "where": claim.where, "chapter": claim.chapter, "kind": claim.kind, "metric": deciding["metric"],
            "opponent": deciding["opponent"], "pairs": len(group), "ours": deciding["ours"],
            "ours_against": deciding["ours_against"], "diff": deciding["diff"], "low": deciding["low"],
            "high": deciding["high"], "level": deciding["level"], "n": int(deciding["n"]), "status": status,
            "verdict": verdict, "n_needed": n_needed, "resolves_as": resolves_as, "paper": paper,
            "paper_against": paper_against, "paper_numbers": _paper_numbers(claim, paper_model),
            "paper_model": paper_model, "claim_model": claim.model,
            "margin": claim.margin, "floor": claim.floor,
            "flagged": tuple(m for m in methods if m in flagged_methods), "note": note,
        })
    return pd.DataFrame(rows, columns=_CLAIM_COLUMNS)


def _paper_columns(claim: Claim, model: str, opponent: str) -> tuple[float, float, str]:
    """(the paper's value for IS-CAM's side, for the deciding opponent, the model those numbers are for)."""
    table = _paper_table(claim.metrics[0]) if claim.kind in ("methods", "win") else None
    paper_model = model if table is not None and model in PAPER_VALUES[table] else claim.model
    values = claim.paper_values(paper_model)
    names = {_label(name): name for name in claim.against}
    other = names.get(opponent)
    if claim.kind == "win":
        return values.get(other, math.nan) if other else math.nan, math.nan, paper_model
    return (values.get(claim.method, math.nan), values.get(other, math.nan) if other else math.nan,
            paper_model)


def _paper_numbers(claim: Claim, paper_model: str) -> str:
    """Every published number behind the claim for ``paper_model`` as text ("IS-CAM 48.13, Score-CAM ...")."""
    values = claim.paper_values(paper_model)
    if claim.kind == "win":
        return ", ".join(f"Win % vs {_label(name)} {value:.2f}" for name, value in values.items())
    return ", ".join(f"{_label(name)} {value:.2f}" for name, value in values.items())


def evaluate(frame: pd.DataFrame, *, sweep: pd.DataFrame | None = None,
             similarity: pd.DataFrame | None = None, flags: Collection[str] | None = None,
             claims: Sequence[Claim] = CLAIMS, margin: float | None = None, floor: float | None = None,
             n_boot: int = 10000, seed: int = 0, level: float = 0.95, min_images: int = 10,
             power: float = POWER) -> pd.DataFrame:
    """Check every claim on every model of ``frame``: one row per (claim, model), in model then claim order.

    ``frame``: :meth:`iscam.store.ResultsStore.read` narrowed with :func:`iscam.tables.select` (one
    parameter set per method and model, else :class:`iscam.tables.TableError`). ``sweep``: store rows of
    IS-CAM at several N (e.g. the whole store: rows are matched to the run's setup and other parameters;
    the run's own N comes from ``frame``); without it the N-metrics claim is *not evaluated*. ``similarity``:
    per-image map correlations with the map at the run's N, columns ``N``, ``correlation``, ``file`` (each
    row one image; without ``file`` each row still counts as one image) and ``model`` when ``frame`` has
    several models. Means over images (an ``images`` column > 1, one row per N) give no interval: that
    claim is then *not evaluated*, as it is without ``similarity``.
    ``flags``: methods the sanity checks flag (maps barely change when the weights are randomised); a claim
    resting on one lists it in ``flagged``. ``margin`` overrides every claim's equivalence margin (points),
    ``floor`` the maps' correlation floor; ``claims`` replaces the registry.

    Columns: claim, model, summary, quote (passages joined by " … "), where, chapter, kind, metric,
    opponent (the deciding pair), pairs,
    ours, ours_against, diff, low, high, level, n, status, verdict ("supported", "contradicted",
    "not resolved at n images", "not evaluated: why"), n_needed, resolves_as, paper, paper_against
    (the paper's numbers for the two sides shown), paper_numbers (all its numbers behind the claim, text),
    paper_model, claim_model, margin, floor, flagged, note. Rules: the module docstring.
    """
    _check_inputs(frame, sweep, similarity)
    _check_flags(flags)
    chosen = _with_options(claims, margin, floor)
    pairs = pairwise(frame, sweep=sweep, similarity=similarity, claims=chosen, n_boot=n_boot, seed=seed,
                     level=level, min_images=min_images, power=power)
    return combine(pairs, claims=chosen, flags=flags)


# --------------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------------

def _number(value: float, digits: int = 2, sign: bool = False) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _ours_text(row: Mapping[str, Any]) -> str:
    """``ours`` of a claims row: both sides, then the difference with its interval."""
    if row["status"] == "not evaluated" or not np.isfinite(row["diff"]):
        return "-"
    digits = 3 if row["kind"] == "n_maps" else 2
    interval = (f"{_number(row['diff'], digits, True)} [{_number(row['low'], digits, True)}, "
                f"{_number(row['high'], digits, True)}]")
    if row["kind"] == "win":
        sides = (f"win {_number(row['ours'], 1)} / loss {_number(row['ours_against'], 1)} % "
                 f"vs {row['opponent']}")
    elif row["kind"] == "n_maps":
        sides = (f"r {_number(row['ours'], digits)} ({row['opponent']}) "
                 f"vs floor {_number(row['floor'], digits)}")
    elif row["kind"] == "n_metrics":
        sides = f"{row['metric']} {row['opponent']}: {_number(row['ours'])} vs {_number(row['ours_against'])}"
    else:
        sides = f"{_number(row['ours'])} vs {row['opponent']} {_number(row['ours_against'])}"
    level = "" if abs(row["level"] - 0.95) < 1e-12 else f" ({100 * row['level']:.2f} %)"
    return f"{sides}, diff {interval}{level}"


def _paper_text(row: Mapping[str, Any]) -> str:
    if not np.isfinite(row["paper"]):
        return "-"
    suffix = "" if row["paper_model"] == row["model"] else f" ({row['paper_model']})"
    if row["kind"] == "win":
        return f"win {_number(row['paper'])} %{suffix}"
    return f"{_number(row['paper'])} vs {_number(row['paper_against'])}{suffix}"


def _verdict_text(row: Mapping[str, Any]) -> str:
    text = str(row["verdict"])
    if row["status"] == "not resolved" and math.isinf(row["n_needed"]):
        text += " (no number of images resolves it at the observed mean)"
    elif row["status"] == "not resolved" and not math.isnan(row["n_needed"]):
        verb = "support" if row["resolves_as"] == "supported" else "contradict"
        text += f" (~{int(row['n_needed'])} would {verb} it)"
    if row["flagged"]:
        text += " ! rests on " + ", ".join(_label(m) for m in row["flagged"])
    return text


_LEGEND_DIFFERENCE = (
    "difference: IS-CAM minus the other side, in points (maps: correlation minus the floor), mean over the "
    "images both have, with its 95 % paired-bootstrap interval (a higher level is Bonferroni-corrected); "
    "for several opponents the weakest pair ('all' claims) or the strongest ('any').")
_LEGEND_IMAGES = (
    "~n would support / contradict it: images at which the claim would be resolved that way, normal "
    "approximation, 80 % power, two-sided 5 %, from the observed mean and sd of the per-image differences.")
_LEGEND_MODELS = ("The paper's claims are about VGG-16; other models get the same comparisons. "
                  "'!' marks a claim resting on a method the sanity checks flag.")


def format_claims(table: pd.DataFrame) -> str:
    """:func:`evaluate`'s table as text, one line per (claim, model): id, model, short wording,
    ours (both sides, difference [interval]), paper, verdict; then the definitions the numbers rely on."""
    _require_columns(table, _CLAIM_COLUMNS, "the claims table")
    if table.empty:
        return "(no claims evaluated)"
    header = ["claim", "model", "IS-CAM's ...", "ours: difference [95 % interval]", "paper", "verdict"]
    cells = [[str(r["claim"]), str(r["model"]), str(r["summary"]), _ours_text(r), _paper_text(r),
              _verdict_text(r)] for r in table.to_dict("records")]
    widths = [max(len(row[i]) for row in [*cells, header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    lines += ["", _LEGEND_DIFFERENCE, _LEGEND_IMAGES, _LEGEND_MODELS]
    return "\n".join(lines)


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`evaluate`'s table for the book: one line per claim, one column per model.

    Columns: ``claim`` (id), ``summary`` (our short wording), ``quote`` (the paper's, passages joined by
    " … "), ``where``, ``paper`` (the paper's numbers for the claim's model), one column per model holding
    ``verdict -- ours``, ``flagged`` (methods flagged on any model) and ``chapter`` (the doc name the line
    links to, e.g. ``chapters/04-confidence``).
    """
    _require_columns(table, _CLAIM_COLUMNS, "the claims table")
    models = list(dict.fromkeys(table["model"]))
    lines = []
    for claim_id, group in table.groupby("claim", sort=False):
        first = group.iloc[0]
        # The claim's own model's numbers (VGG-16); a store without a row showing them names its model.
        with_claim_model = group[group["paper_model"] == first["claim_model"]]
        shown = with_claim_model.iloc[0] if len(with_claim_model) else first
        paper = str(shown["paper_numbers"]) or "-"
        if paper != "-" and shown["paper_model"] != first["claim_model"]:
            paper += f" ({shown['paper_model']})"
        line: dict[str, Any] = {"claim": claim_id, "summary": first["summary"], "quote": first["quote"],
                                "where": first["where"], "paper": paper}
        for model in models:
            found = group[group["model"] == model]
            if len(found):
                ours = _ours_text(found.iloc[0])
                line[model] = _verdict_text(found.iloc[0]) + ("" if ours == "-" else f" -- {ours}")
            else:
                line[model] = ""
        flagged = sorted({m for names in group["flagged"] for m in names})
        line["flagged"] = ", ".join(_label(m) for m in flagged)
        line["chapter"] = first["chapter"]
        lines.append(line)
    return pd.DataFrame(lines, columns=["claim", "summary", "quote", "where", "paper", *models, "flagged",
                                        "chapter"])
