"""iscam.claims: the paper's claims, judged on store frames built so that each verdict is known in advance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iscam import claims, tables
from iscam.models import default_target_layer
from iscam.store import ROW_COLUMNS, ResultsStore, params_key

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "iscam-paper.txt"
RUN_PARAMS = params_key({"N": 10, "schedule": "authors"})
GRADIENT = ("gradcam", "gradcampp", "smoothgradcampp")
BOOT = {"n_boot": 400, "seed": 0}


def _rows(method: str, values: dict[str, np.ndarray], *, model: str = "vgg16",
          params: str = "{}") -> pd.DataFrame:
    """Store rows of one method: ``values`` holds o (-> drop, increase, change; y = 0.5), ins, dele, point."""
    n = len(values["o"])
    y = np.full(n, 0.5)
    o = np.asarray(values["o"], dtype=np.float64)
    frame = pd.DataFrame({
        "file": [f"img{i:03d}.JPEG" for i in range(n)], "model": model, "weights": "default",
        "resize": "crop", "layer": default_target_layer(model), "precision": "fp32", "method": method,
        "params_key": params,
        "metrics_key": "{}", "index": np.arange(n), "label": 0, "target": 0, "correct": True, "y": y, "o": o,
        "drop": np.maximum(0.0, y - o) / y, "increase": (o > y).astype(np.float64), "change": y - o,
        "insertion_auc": values.get("ins", np.full(n, 0.5)),
        "deletion_auc": values.get("dele", np.full(n, 0.1)),
        "pointing": values.get("point", np.full(n, 0.4)), "insertion_curve": [[0.0, 1.0]] * n,
        "deletion_curve": [[1.0, 0.0]] * n, "method_seconds": 0.0, "metric_seconds": 0.0, "forward_count": 1,
        "metric_forward_count": 0, "rank": 0, "pointing_skip": "", "map": [[0.0]] * n, "map_shape": [[1, 1]] * n,
        "iscam_version": "test", "algorithm_version": 1, "metrics_version": 1, "torch_version": "test",
        "weights_id": "test",
    })
    assert set(ROW_COLUMNS) == set(frame.columns)
    return frame


def _store(per_method: dict[str, dict[str, np.ndarray]], **options: str) -> pd.DataFrame:
    return pd.concat([_rows(method, values, params=RUN_PARAMS if method == "iscam" else "{}", **options)
                      for method, values in per_method.items()], ignore_index=True)


N_IMAGES = 20
_RNG = np.random.default_rng(0)
BASE = _RNG.uniform(0.3, 0.6, N_IMAGES)  # per-image insertion AUC of IS-CAM
DELETION = _RNG.uniform(0.05, 0.2, N_IMAGES)
POINT = _RNG.uniform(0.3, 0.5, N_IMAGES)
JITTER = _RNG.uniform(-0.002, 0.002, N_IMAGES)  # 0.2 points at most: well inside the 1-point margin
SPREAD = _RNG.uniform(0.0, 0.05, N_IMAGES)


def _true_world() -> pd.DataFrame:
    """Every claim holds by construction: each per-image difference has the claimed sign (or |.| <= 0.2)."""
    point = POINT.copy()
    point[3] = np.nan  # boxes outside the frame: left out of the pointing pairs
    per = {"iscam": {"o": 0.6 + SPREAD, "ins": BASE, "dele": DELETION, "point": point + 0.05}}
    for name in GRADIENT:
        per[name] = {"o": 0.4 - SPREAD, "ins": BASE - 0.05 - SPREAD, "point": POINT}
    for name in ("scorecam", "sscam"):
        per[name] = {"o": 0.3 - SPREAD, "ins": BASE + JITTER, "dele": DELETION - JITTER,
                     "point": POINT + 0.01}
    per["random"] = {"o": 0.1 + SPREAD}
    return _store(per)


def _false_world() -> pd.DataFrame:
    """Every claim fails by construction; pointing fails on one opponent only (Score-CAM)."""
    per = {"iscam": {"o": 0.2 - SPREAD, "ins": BASE, "dele": DELETION + 0.05, "point": POINT}}
    for name in GRADIENT:
        per[name] = {"o": 0.4 + SPREAD, "ins": BASE + 0.05 + SPREAD, "point": POINT - 0.02}
    for name in ("scorecam", "sscam"):
        per[name] = {"o": 0.6 + SPREAD, "ins": BASE + 0.05, "dele": DELETION, "point": POINT - 0.02}
    per["scorecam"]["point"] = POINT + 0.03
    return _store(per)


def _only(claim_id: str) -> list[claims.Claim]:
    return [c for c in claims.CLAIMS if c.id == claim_id]


def _row(table: pd.DataFrame, claim: str, model: str = "vgg16") -> pd.Series:
    found = table[(table["claim"] == claim) & (table["model"] == model)]
    assert len(found) == 1, (claim, model, table)
    return found.iloc[0]


STORE_CLAIMS = [c.id for c in claims.CLAIMS if c.kind in ("methods", "win")]
N_CLAIMS = {"n-barely-changes-maps", "n-changes-metrics"}


def test_the_registry_covers_the_issues_claims_and_every_claim_is_tested_here() -> None:
    ids = [c.id for c in claims.CLAIMS]
    assert len(set(ids)) == len(ids)
    assert set(ids) == set(STORE_CLAIMS) | N_CLAIMS  # the tests below judge each of them
    assert {c.chapter for c in claims.CLAIMS} == set(claims.CHAPTERS)
    assert all(c.model == "vgg16" for c in claims.CLAIMS)


def test_paper_numbers_come_from_paper_values() -> None:
    by_id = {c.id: c for c in claims.CLAIMS}
    assert by_id["insertion-close-scorecam"].paper == {"iscam": 48.13, "scorecam": 48.22}
    assert by_id["deletion-ties-scorecam"].paper == {"iscam": 9.92, "scorecam": 9.92}
    assert by_id["drop-below-scorecam-sscam"].paper == {"iscam": 63.30, "scorecam": 66.03, "sscam": 79.15}
    assert by_id["increase-above-scorecam-sscam"].paper == {"iscam": 52.35, "scorecam": 51.85, "sscam": 51.30}
    assert by_id["win-vs-scorecam"].paper == {"scorecam": 52.35}
    assert by_id["win-vs-sscam"].paper == {"sscam": 59.25}
    assert by_id["n-changes-metrics"].paper == {}
    table_of = {"win": "win", "insertion": "table_i", "deletion": "table_i", "average_drop": "table_ii",
                "increase": "table_ii", "pointing": "table_iii"}
    for claim in claims.CLAIMS:  # the numbers are PAPER_VALUES' own (no copy that could drift)
        for model in tables.PAPER_MODELS:
            for method, value in claim.paper_values(model).items():
                table = table_of[claim.metrics[0]]
                assert value == tables.PAPER_VALUES[table][model][claim.metrics[0]][method]
    assert by_id["drop-below-scorecam-sscam"].paper_values("resnet18")["iscam"] == 64.85
    assert by_id["insertion-above-gradient"].paper_values("resnet18") == {}  # Table I is VGG-16 only


def test_the_papers_own_vgg16_numbers_read_the_way_the_registry_says() -> None:
    for claim in claims.CLAIMS:
        paper = claim.paper
        if claim.kind == "win":
            assert all(value > 50.0 for value in paper.values())
        elif claim.kind == "methods":
            mine = paper[claim.method]
            for other in claim.against:
                if claim.direction == "higher":
                    assert mine > paper[other], claim.id
                elif claim.direction == "lower":
                    assert mine < paper[other], claim.id
                else:
                    assert abs(mine - paper[other]) <= claim.margin, claim.id


@pytest.mark.skipif(not PAPER.is_file(), reason="paper text not available")
def test_every_quote_is_the_papers_wording() -> None:
    text = " ".join(PAPER.read_text(encoding="utf-8").split())
    for claim in claims.CLAIMS:
        assert claim.quote
        for passage in claim.quote:
            assert passage in text, (claim.id, passage)


def test_images_needed_is_the_normal_approximation() -> None:
    # (z_0.975 + z_0.80)^2 = (1.959964 + 0.841621)^2 = 7.848879; x sd^2 / d^2
    assert claims.images_needed(2.0, 1.0) == 32.0  # 31.40 rounded up
    assert claims.images_needed(1.0, 1.0) == 8.0  # 7.85
    assert claims.images_needed(1.0, 0.5, power=0.5) == 16.0  # z_0.5 = 0: 1.96^2 * 4 = 15.37
    assert claims.images_needed(1.0, 0.0) == math.inf
    assert math.isnan(claims.images_needed(math.nan, 1.0))
    with pytest.raises(claims.ClaimError, match="level and power"):
        claims.images_needed(1.0, 1.0, power=1.0)


def test_claims_true_by_construction_are_supported() -> None:
    frame = _true_world()
    table = claims.evaluate(frame, **BOOT)
    assert list(table["model"].unique()) == ["vgg16"] and len(table) == len(claims.CLAIMS)
    for claim in STORE_CLAIMS:
        row = _row(table, claim)
        assert (row["status"], row["verdict"]) == ("supported", "supported"), row.to_dict()
        assert math.isnan(row["n_needed"]) and row["claim_model"] == "vgg16" and row["paper_model"] == "vgg16"
    # the weakest of the three gradient pairs is shown; its difference is the plain mean, in points
    above = _row(table, "insertion-above-gradient")
    assert above["pairs"] == 3 and above["diff"] == pytest.approx(100 * (0.05 + SPREAD).mean())
    assert above["ours"] - above["ours_against"] == pytest.approx(above["diff"])
    assert above["paper"] == 48.13 and above["paper_against"] in (45.25, 44.94, 42.68)
    close = _row(table, "insertion-close-scorecam")
    assert close["diff"] == pytest.approx(-100 * JITTER.mean())
    assert -1.0 <= close["low"] <= close["high"] <= 1.0
    assert close["margin"] == 1.0 and close["level"] == 0.95
    assert _row(table, "pointing-highest")["n"] == N_IMAGES - 1  # the NaN image is left out of every pair
    win = _row(table, "win-vs-sscam")
    assert (win["ours"], win["ours_against"], win["diff"]) == (100.0, 0.0, 100.0) and win["paper"] == 59.25
    for claim in N_CLAIMS:
        assert _row(table, claim)["status"] == "not evaluated"
    assert _row(table, "n-changes-metrics")["verdict"] == "not evaluated: no N sweep in the store"
    assert _row(table, "n-barely-changes-maps")["verdict"] == (
        "not evaluated: no map similarities of an N sweep given")


def test_verdicts_from_a_results_store_on_disk(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "true")
    store.write_part(_true_world())
    table = claims.evaluate(store.read(curves=False), **BOOT)
    assert set(table.loc[table["claim"].isin(STORE_CLAIMS), "status"]) == {"supported"}
    assert claims.evaluate(ResultsStore(tmp_path / "empty").read(curves=False), **BOOT).empty


def test_a_missing_method_leaves_its_claims_not_evaluated_unless_another_pair_contradicts() -> None:
    frame = _true_world()
    table = claims.evaluate(frame[frame["method"] != "sscam"], **BOOT)
    assert _row(table, "win-vs-sscam")["verdict"] == "not evaluated: no sscam rows for vgg16"
    assert _row(table, "drop-below-scorecam-sscam")["verdict"] == "not evaluated: no sscam rows for vgg16"
    assert _row(table, "win-vs-scorecam")["status"] == "supported"
    false = _false_world()
    table = claims.evaluate(false[false["method"] != "sscam"], **BOOT)
    assert _row(table, "drop-below-scorecam-sscam")["status"] == "contradicted"  # Score-CAM's pair decides


def test_claims_false_by_construction_are_contradicted() -> None:
    table = claims.evaluate(_false_world(), **BOOT)
    for claim in STORE_CLAIMS:
        row = _row(table, claim)
        assert (row["status"], row["verdict"]) == ("contradicted", "contradicted"), row.to_dict()
    # one opponent above IS-CAM is enough to contradict "the highest"; the row names it
    highest = _row(table, "pointing-highest")
    assert highest["opponent"] == "Score-CAM" and highest["diff"] == pytest.approx(-3.0)
    assert highest["paper_against"] == 43.07
    # "close"/"ties" are contradicted when the whole interval lies beyond the 1-point margin
    assert _row(table, "insertion-close-scorecam")["high"] == pytest.approx(-5.0)
    assert _row(table, "deletion-ties-scorecam")["low"] == pytest.approx(5.0)
    # with a 6-point margin the 5-point deletion gap counts as a tie
    wide = claims.evaluate(_false_world(), margin=6.0, **BOOT)
    assert _row(wide, "deletion-ties-scorecam")["status"] == "supported"


def test_a_tiny_n_is_not_resolved_and_says_how_many_images_would_resolve_it() -> None:
    # 4 images, insertion differences 0, 2, 0, 2 points against each gradient method: mean 1, sd^2 = 4/3,
    # so n = 7.848879 * 4/3 = 10.47 -> 11 images (80 % power, two-sided 5 %).
    ins = np.array([0.50, 0.50, 0.40, 0.40])
    per = {"iscam": {"o": np.full(4, 0.4), "ins": ins + np.array([0.0, 0.02, 0.0, 0.02])}}
    for name in GRADIENT:
        per[name] = {"o": np.full(4, 0.4), "ins": ins}
    table = claims.evaluate(_store(per), claims=_only("insertion-above-gradient"), **BOOT)
    row = _row(table, "insertion-above-gradient")
    assert row["status"] == "not resolved" and row["verdict"] == "not resolved at 4 images"
    assert row["n_needed"] == 11.0 and row["resolves_as"] == "supported" and row["diff"] == pytest.approx(1.0)
    assert "not resolved at 4 images (~11 would support it)" in claims.format_claims(table)
    # deletion 1, 2, 1, 2 points above Score-CAM: mean 1.5 is beyond the 1-point tie margin, sd^2 = 1/3, so
    # contradicting the tie needs 7.848879 * (1/3) / 0.5^2 = 10.47 -> 11 images
    ties = {"iscam": {"o": np.full(4, 0.4), "dele": np.array([0.11, 0.12, 0.11, 0.12])},
            "scorecam": {"o": np.full(4, 0.4), "dele": np.full(4, 0.1)}}
    row = _row(claims.evaluate(_store(ties), claims=_only("deletion-ties-scorecam"), **BOOT),
               "deletion-ties-scorecam")
    assert (row["status"], row["n_needed"], row["resolves_as"]) == ("not resolved", 11.0, "contradicted")
    # all four differences positive: the bootstrap interval excludes 0, yet 4 images never resolve a claim
    per["iscam"]["ins"] = ins + 0.02
    row = _row(claims.evaluate(_store(per), **BOOT), "insertion-above-gradient")
    assert row["low"] > 0 and row["status"] == "not resolved" and "fewer than 10 images" in row["note"]


def test_several_opponents_need_every_pair() -> None:
    frame = _true_world()
    noisy = frame["method"] == "gradcampp"  # one pair now straddles 0: 2 supported + 1 unresolved
    frame.loc[noisy, "insertion_auc"] = BASE + np.where(np.arange(N_IMAGES) % 2 == 0, 0.01, -0.01)
    pairs = claims.pairwise(frame, **BOOT)
    mine = pairs[pairs["claim"] == "insertion-above-gradient"].set_index("opponent")["status"]
    assert mine.to_dict() == {"Grad-CAM": "supported", "Grad-CAM++": "not resolved",
                              "Smooth Grad-CAM++": "supported"}
    row = _row(claims.combine(pairs), "insertion-above-gradient")
    assert row["status"] == "not resolved" and row["opponent"] == "Grad-CAM++"
    assert row["n_needed"] > 1e6  # its mean difference is 0 up to rounding: out of reach


def test_win_is_the_win_table_s_win_and_the_interval_is_win_minus_loss() -> None:
    frame = _true_world()
    # IS-CAM now loses on images 0-1, ties on 2-4 and wins on the other 15 against Score-CAM
    change = frame.loc[frame["method"] == "scorecam", "change"].to_numpy()
    mine = change - 0.1
    mine[:2] = change[:2] + 0.1
    mine[2:5] = change[2:5]
    frame.loc[frame["method"] == "iscam", "change"] = mine
    row = _row(claims.evaluate(frame, **BOOT), "win-vs-scorecam")
    expected = tables.win_table(frame, against=("scorecam",), n_boot=10)["ours"].iloc[0]
    assert row["ours"] == pytest.approx(expected) == pytest.approx(100 * 15 / 20)
    assert row["ours_against"] == pytest.approx(10.0) and row["diff"] == pytest.approx(75.0 - 10.0)
    assert row["status"] == "supported" and "ties 15.0 %" in row["note"]
    # 12 wins, 5 losses, 3 ties: win % 60 > 50, but the signed outcome (+100 / -100 / 0 per image) has mean 35
    # and sd^2 = (17e4 - 20 * 35^2) / 19 = 7657.9: not resolved; 7.848879 * 7657.9 / 35^2 = 49.07 -> 50 images
    mine[2:5] = change[2:5] + 0.1
    mine[5:8] = change[5:8]
    frame.loc[frame["method"] == "iscam", "change"] = mine
    row = _row(claims.evaluate(frame, **BOOT), "win-vs-scorecam")
    assert (row["ours"], row["ours_against"], row["status"]) == (60.0, 25.0, "not resolved")
    signs = np.r_[np.full(12, 100.0), np.full(5, -100.0), np.zeros(3)]
    assert row["n_needed"] == claims.images_needed(float(np.std(signs, ddof=1)), 35.0) == 50.0


def test_our_estimates_are_the_tables_values() -> None:
    frame = _true_world()
    pairs = claims.pairwise(frame, **BOOT)
    table_i = tables.table_i(frame, n_boot=10).set_index(["method", "metric"])["ours"]
    table_ii = tables.table_ii(frame, n_boot=10).set_index(["method", "metric"])["ours"]
    close = pairs[pairs["claim"] == "insertion-close-scorecam"].iloc[0]
    assert close["ours"] == pytest.approx(table_i[("iscam", "insertion")])
    assert close["ours_against"] == pytest.approx(table_i[("scorecam", "insertion")])
    drop = pairs[(pairs["claim"] == "drop-below-scorecam-sscam") & (pairs["opponent"] == "SS-CAM")].iloc[0]
    assert (drop["ours"], drop["ours_against"]) == pytest.approx(
        (table_ii[("iscam", "average_drop")], table_ii[("sscam", "average_drop")]))


def _sweep(shift: dict[int, float]) -> pd.DataFrame:
    """IS-CAM rows at other N: the run's metrics with insertion shifted by ``shift[N]``."""
    run = _true_world()
    run = run[run["method"] == "iscam"]
    parts = []
    for value, delta in shift.items():
        part = run.assign(params_key=params_key({"N": value, "schedule": "authors"}))
        part["insertion_auc"] = part["insertion_auc"] + delta + SPREAD / 10
        parts.append(part)
    return pd.concat([run, *parts], ignore_index=True)  # the run's own rows may come along


def test_n_changes_the_metrics_needs_a_sweep() -> None:
    only = _only("n-changes-metrics")
    frame = _true_world()
    row = _row(claims.evaluate(frame, sweep=_sweep({5: 0.03, 15: 0.0}), claims=only, **BOOT),
               "n-changes-metrics")
    assert row["status"] == "supported" and row["pairs"] == 10  # 2 values of N x 5 metrics
    assert row["level"] == pytest.approx(1 - 0.05 / 10)  # Bonferroni over the ten pairs
    assert row["opponent"] == "N=5 vs N=10" and row["metric"] == "insertion"
    assert row["diff"] == pytest.approx(3.0 + 10 * SPREAD.mean())
    # the same metrics at every N: each interval is exactly [0, 0], inside the band -> contradicted
    same = _sweep({5: 0.0, 15: 0.0}).assign(insertion_auc=lambda d: np.tile(BASE, 3))
    assert _row(claims.evaluate(frame, sweep=same, claims=only, **BOOT), "n-changes-metrics")["status"] == (
        "contradicted")
    # rows at other N but another schedule are not the run's method: nothing to compare with
    other = _sweep({5: 0.03}).assign(params_key=params_key({"N": 5, "schedule": "paper"}))
    row = _row(claims.evaluate(frame, sweep=other, claims=only, **BOOT), "n-changes-metrics")
    assert row["status"] == "not evaluated" and "at an N other than the run's N=10" in row["verdict"]


def _similarity(values: dict[int, np.ndarray]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"N": value, "correlation": corr, "file": [f"img{i:03d}.JPEG"
                                                                              for i in range(len(corr))]})
                      for value, corr in values.items()], ignore_index=True)


def test_n_barely_changes_the_maps_reads_per_image_correlations() -> None:
    only = _only("n-barely-changes-maps")
    frame = _true_world()
    high = np.linspace(0.95, 0.99, 12)
    similar = _similarity({5: high, 10: np.ones(12), 15: high - 0.02})
    row = _row(claims.evaluate(frame, similarity=similar, claims=only, **BOOT), "n-barely-changes-maps")
    assert row["status"] == "supported" and row["pairs"] == 2  # the run's own N=10 is not a comparison
    assert row["opponent"] == "N=15 vs N=10" and row["ours"] == pytest.approx(0.95)  # the weakest N
    assert row["diff"] == pytest.approx(0.95 - 0.9)
    low = _similarity({5: high, 15: np.linspace(0.5, 0.6, 12)})
    assert _row(claims.evaluate(frame, similarity=low, claims=only, **BOOT), "n-barely-changes-maps")[
        "status"] == "contradicted"
    assert _row(claims.evaluate(frame, similarity=low, floor=0.4, claims=only, **BOOT),
                "n-barely-changes-maps")["status"] == "supported"
    means = pd.DataFrame({"N": [5, 10, 15], "correlation": [0.97, 1.0, 0.96], "images": 8})
    row = _row(claims.evaluate(frame, similarity=means, claims=only, **BOOT), "n-barely-changes-maps")
    assert row["status"] == "not evaluated" and "means over images" in row["verdict"]
    with pytest.raises(claims.ClaimError, match="not finite values in"):
        claims.evaluate(frame, similarity=similar.assign(correlation=np.nan), **BOOT)


def test_flags_mark_the_claims_resting_on_a_flagged_method() -> None:
    table = claims.evaluate(_true_world(), flags={"gradcam"}, **BOOT)
    flagged = table.set_index("claim")["flagged"].to_dict()
    assert flagged["insertion-above-gradient"] == ("gradcam",) and flagged["pointing-highest"] == ("gradcam",)
    assert flagged["insertion-close-scorecam"] == () and flagged["win-vs-sscam"] == ()
    assert "! rests on Grad-CAM" in claims.format_claims(table)
    assert claims.claims_display(table).set_index("claim").loc["pointing-highest", "flagged"] == "Grad-CAM"
    with pytest.raises(claims.ClaimError, match="unknown method"):
        claims.evaluate(_true_world(), flags={"gradcma"}, **BOOT)
    with pytest.raises(claims.ClaimError, match="collection of method names"):
        claims.evaluate(_true_world(), flags="gradcam", **BOOT)


def test_other_models_get_the_same_comparisons_and_say_whose_numbers_are_shown() -> None:
    both = pd.concat([_true_world(), _true_world().assign(model="resnet18"),
                      _true_world().assign(model="mobilenet_v1_coral_tiny")], ignore_index=True)
    table = claims.evaluate(both, **BOOT)
    assert len(table) == 3 * len(claims.CLAIMS)
    assert list(table["model"].unique()) == ["mobilenet_v1_coral_tiny", "resnet18", "vgg16"]
    coral = _row(table, "drop-below-scorecam-sscam", "mobilenet_v1_coral_tiny")
    assert coral["status"] == "supported" and coral["paper_model"] == "vgg16" and coral["paper"] == 63.30
    assert "the paper makes this claim for vgg16" in coral["note"]
    resnet = _row(table, "drop-below-scorecam-sscam", "resnet18")
    assert resnet["paper_model"] == "resnet18" and resnet["paper"] == 64.85
    assert _row(table, "insertion-close-scorecam", "resnet18")["paper_model"] == "vgg16"  # no Table I for it
    assert _row(table, "insertion-close-scorecam")["note"] == ""
    display = claims.claims_display(table)
    assert list(display["claim"]) == [c.id for c in claims.CLAIMS]  # one line per claim
    assert list(display.columns) == ["claim", "summary", "quote", "where", "paper", "mobilenet_v1_coral_tiny",
                                     "resnet18", "vgg16", "flagged", "chapter"]
    line = display.set_index("claim").loc["drop-below-scorecam-sscam"]
    assert line["chapter"] == "notebooks/04-confidence"
    assert line["paper"] == "IS-CAM 63.30, Score-CAM 66.03, SS-CAM 79.15"
    assert display.set_index("claim").loc["win-vs-sscam", "paper"] == "Win % vs SS-CAM 59.25"
    assert display.set_index("claim").loc["n-changes-metrics", "paper"] == "-"
    assert line["resnet18"].startswith("supported -- ")


def test_format_claims_prints_one_line_per_claim_and_model() -> None:
    table = claims.evaluate(_true_world(), **BOOT)
    text = claims.format_claims(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["claim", "model", "IS-CAM's"]
    close = next(line for line in lines if line.startswith("insertion-close-scorecam "))
    row = _row(table, "insertion-close-scorecam")
    assert f"[{row['low']:+.2f}, {row['high']:+.2f}]" in close and "48.13 vs 48.22" in close
    assert close.rstrip().endswith("supported")
    assert next(line for line in lines if line.startswith("win-vs-scorecam ")).count("win 52.35 %") == 1
    starts = tuple(c.id + " " for c in claims.CLAIMS)
    assert sum(line.startswith(starts) for line in lines) == len(claims.CLAIMS)
    assert "80 % power" in text


def test_bad_input_is_refused_before_any_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_bootstrap(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bootstrap ran before the input was checked")

    monkeypatch.setattr(claims, "paired_bootstrap_diff", no_bootstrap)
    frame = _true_world()
    doubled = pd.concat([_sweep({5: 0.0}), _sweep({5: 0.0})], ignore_index=True)
    with pytest.raises(claims.ClaimError, match="several rows for the same image"):
        claims.evaluate(frame, sweep=doubled)
    with pytest.raises(claims.ClaimError, match=r"lacks the column\(s\) pointing"):
        claims.evaluate(frame.drop(columns="pointing"))
    twice = pd.concat([frame, frame.assign(params_key=params_key({"N": 15, "schedule": "authors"}))
                       [frame["method"] == "iscam"]], ignore_index=True)
    with pytest.raises(tables.TableError, match="vgg16/iscam has rows for 2 different params_key"):
        claims.evaluate(twice)
    with pytest.raises(claims.ClaimError, match="n_boot"):
        claims.evaluate(frame, n_boot=0)
    with pytest.raises(claims.ClaimError, match="margin"):
        claims.evaluate(frame, margin=0.0)
    with pytest.raises(claims.ClaimError, match="min_images"):
        claims.evaluate(frame, min_images=1)
    with pytest.raises(claims.ClaimError, match="no 'model' column"):
        claims.evaluate(pd.concat([frame, frame.assign(model="resnet18")]),
                        similarity=pd.DataFrame({"N": [5], "correlation": [0.9]}))
    with pytest.raises(claims.ClaimError, match="chapter"):
        claims.Claim(id="x", summary="x", quote=("x",), where="x", chapter="chapters/99-nowhere",
                     kind="methods", metrics=("insertion",), direction="higher", against=("scorecam",))
    with pytest.raises(claims.ClaimError, match="needs a margin"):
        claims.Claim(id="x", summary="x", quote=("x",), where="x", chapter=claims.CHAPTERS[0], kind="methods",
                     metrics=("insertion",), direction="equal", against=("scorecam",))
