"""The paper's quantitative claims, listed once: wording, source and the comparison each makes.

:data:`CLAIMS` quotes each claim of the IS-CAM paper (arXiv:2010.03023) with the table or section it comes
from and the comparison it makes (metric, IS-CAM against which methods, in which direction); its numbers
are read from :data:`iscam.tables.PAPER_VALUES`, never copied. :func:`images_needed` is the simple power
estimate (normal approximation, 80 % power, two-sided 5 %) a claim's verdict reports when the images at
hand do not resolve it.

The claims are about VGG-16, the paper's model (``Claim.model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

from .methods import PAPER_NAMES
from .tables import PAPER_VALUES

__all__ = [
    "CHAPTERS",
    "CLAIMS",
    "POWER",
    "Claim",
    "ClaimError",
    "images_needed",
]

#: The book chapters a claim can link to (Jupyter Book doc names).
CHAPTERS: tuple[str, ...] = ("chapters/03-insertion-deletion", "chapters/04-confidence",
                             "chapters/05-pointing-game", "chapters/06-effect-of-n")
#: The power of the sample-size estimate (:func:`images_needed`).
POWER: float = 0.80

Kind = Literal["methods", "win", "n_metrics", "n_maps"]
Direction = Literal["higher", "lower", "equal", "changes", "at_least"]

# The store column behind each metric name of iscam.tables / PAPER_VALUES (the same mapping as the
# table functions of iscam.tables).
_METRIC_COLUMNS: dict[str, str] = {"insertion": "insertion_auc", "deletion": "deletion_auc",
                                   "average_drop": "drop", "increase": "increase", "pointing": "pointing"}


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
          where=_TABLE_I, chapter="chapters/03-insertion-deletion", kind="methods", metrics=("insertion",),
          direction="equal", against=("scorecam",), margin=1.0),
    Claim(id="insertion-above-gradient",
          summary="insertion AUC above the three gradient CAMs'",
          quote=("We attain improved performance in comparison to previous CAM-based methods.",
                 "Average AUC scores of the Insertion curve(the higher, the better)"),
          where=_TABLE_I, chapter="chapters/03-insertion-deletion", kind="methods", metrics=("insertion",),
          direction="higher", against=("gradcam", "gradcampp", "smoothgradcampp")),
    Claim(id="deletion-ties-scorecam",
          summary="deletion AUC ties Score-CAM's",
          quote=("Deletion curve(the lower, the better)", "Score-CAM 48.22 9.92", "IS-CAM 48.13 9.92"),
          where=_TABLE_I, chapter="chapters/03-insertion-deletion", kind="methods", metrics=("deletion",),
          direction="equal", against=("scorecam",), margin=1.0),
    Claim(id="drop-below-scorecam-sscam",
          summary="Average Drop below Score-CAM's and SS-CAM's",
          quote=(_OVERALL, "it fails to do so in Average Drop and Inc% using VGG-16",
                 "Average Drop (the lower, the better)"),
          where=_TABLE_II, chapter="chapters/04-confidence", kind="methods", metrics=("average_drop",),
          direction="lower", against=("scorecam", "sscam")),
    Claim(id="increase-above-scorecam-sscam",
          summary="Increase in Confidence above Score-CAM's, SS-CAM's",
          quote=(_OVERALL, "it fails to do so in Average Drop and Inc% using VGG-16"),
          where=_TABLE_II, chapter="chapters/04-confidence", kind="methods", metrics=("increase",),
          direction="higher", against=("scorecam", "sscam")),
    Claim(id="win-vs-scorecam",
          summary="wins more often than loses vs Score-CAM",
          quote=(("when compared to Score-CAM, we get 52.35% using VGG-16(higher is better); which indicates "
                  "that IS-CAM performs better with respect to this metric."),),
          where=_WIN, chapter="chapters/04-confidence", kind="win", metrics=("win",),
          direction="higher", against=("scorecam",)),
    Claim(id="win-vs-sscam",
          summary="wins more often than loses vs SS-CAM",
          quote=("When our approach is compared to SS-CAM, we get 59.25%",
                 "which indicates that IS-CAM performs better with respect to this metric."),
          where=_WIN, chapter="chapters/04-confidence", kind="win", metrics=("win",),
          direction="higher", against=("sscam",)),
    Claim(id="pointing-highest",
          summary="highest energy pointing game of the six",
          quote=("It also achieves the highest value for the VGG-16 variant.",),
          where="Table III; section IV.C", chapter="chapters/05-pointing-game", kind="methods",
          metrics=("pointing",), direction="higher",
          against=("gradcam", "gradcampp", "smoothgradcampp", "scorecam", "sscam")),
    Claim(id="n-barely-changes-maps",
          summary="N barely changes the maps",
          quote=(("the increase or decrease of the value N , does not have a significant impact on the "
                  "visual attribution map produced."),),
          where=_CONCLUSION_N, chapter="chapters/06-effect-of-n", kind="n_maps", metrics=("map_correlation",),
          direction="at_least", floor=0.9),
    Claim(id="n-changes-metrics",
          summary="N changes the metrics",
          quote=("The effect of N is quite evident quantitatively as demonstrated in our experiments.",),
          where=_CONCLUSION_N, chapter="chapters/06-effect-of-n", kind="n_metrics",
          metrics=("insertion", "deletion", "average_drop", "increase", "pointing"),
          direction="changes", combine="any", margin=1.0),
)


# --------------------------------------------------------------------------------------------------
# Power estimate
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
