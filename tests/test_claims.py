"""iscam.claims: the registry of the paper's claims and the power estimate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from iscam import claims, tables

PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "iscam-paper.txt"
STORE_CLAIMS = [c.id for c in claims.CLAIMS if c.kind in ("methods", "win")]
N_CLAIMS = {"n-barely-changes-maps", "n-changes-metrics"}


def test_the_registry_covers_the_issues_claims() -> None:
    ids = [c.id for c in claims.CLAIMS]
    assert len(set(ids)) == len(ids)
    assert set(ids) == set(STORE_CLAIMS) | N_CLAIMS
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
