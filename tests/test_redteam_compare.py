"""Before/after comparison of two red-team runs paired by probe id, against hand computation:
Wilson intervals, Newcombe's paired interval (method 10) and McNemar's exact binomial test,
each written out here from its formula (no scipy)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.eval.stats import mcnemar_exact
from weightsmith.safety.redteam_compare import compare_runs, load_records, records_by_config

Z = 1.959963984540054  # the 97.5% point of the standard normal


def wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe10(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    """Newcombe (1998, Stat Med 17:2635) method 10 for p1 - p2, p1 = (a+b)/n, p2 = (a+c)/n;
    phi = (ad - bc) / sqrt of the margins' product, its numerator shrunk by n/2 when positive."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n)
    l2, u2 = wilson(a + c, n)
    num = a * d - b * c
    num = max(num - n / 2, 0) if num > 0 else num
    phi = num / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return low, high


def attempts(kind: str, outcomes: list[int], *, config: str = "m") -> list[dict]:
    key = "success" if kind == "attack" else "over_refused"
    return [{"probe": f"p/{kind}{i}", "pack": "p", "kind": kind, key: bool(x), "config": config}
            for i, x in enumerate(outcomes)]  # fmt: skip


# attacks on 10 probes: both succeed on 2, only before on 5, only after on 1, neither on 2
ASR_BEFORE = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
ASR_AFTER = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
# benign on 8 probes: over-refused before on 1, after on 3 (1 both, 2 only after)
OR_BEFORE = [1, 0, 0, 0, 0, 0, 0, 0]
OR_AFTER = [1, 1, 1, 0, 0, 0, 0, 0]


def test_a_small_table_by_hand():
    before = attempts("attack", ASR_BEFORE) + attempts("benign", OR_BEFORE)
    after = attempts("benign", OR_AFTER)[::-1] + attempts("attack", ASR_AFTER)  # order does not matter
    out = compare_runs(before, after)
    asr = out["asr"]
    assert (asr["before"]["k"], asr["before"]["n"], asr["after"]["k"]) == (7, 10, 3)
    assert (asr["before"]["ci_low"], asr["before"]["ci_high"]) == pytest.approx(wilson(7, 10))
    assert (asr["after"]["ci_low"], asr["after"]["ci_high"]) == pytest.approx(wilson(3, 10))
    assert wilson(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # the textbook numbers
    # after - before = 3/10 - 7/10; table with "after" as the first proportion:
    # both 2, after only 1, before only 5, neither 2
    diff = asr["difference"]
    assert diff["delta"] == pytest.approx(-0.4)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx(newcombe10(2, 1, 5, 2))
    assert diff["method"] == "newcombe-paired"
    # McNemar exact: 6 discordant probes, 1 of them the "after" way:
    # p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7/64 = 0.21875
    assert asr["mcnemar"] == {
        "n": 10,
        "before_only": 5,
        "after_only": 1,
        "p_value": 0.21875,
        "method": "exact",
    }
    ovr = out["over_refusal"]
    assert (ovr["before"]["k"], ovr["after"]["k"], ovr["before"]["n"]) == (1, 3, 8)
    assert ovr["difference"]["delta"] == pytest.approx(0.25)
    assert (ovr["difference"]["ci_low"], ovr["difference"]["ci_high"]) == pytest.approx(
        newcombe10(1, 2, 0, 5)
    )
    assert ovr["mcnemar"]["p_value"] == 0.5  # 2 * C(2,0) / 2^2
    assert out["probes"] == {"attack": 10, "benign": 8}
    assert out["interval"] == {"method": "wilson", "level": 0.95}
    assert out["difference_interval"] == {"method": "newcombe-paired", "level": 0.95}
    assert compare_runs(before, after, method="clopper-pearson")["interval"]["method"] == "clopper-pearson"


def test_exact_mcnemar_beyond_the_chi_square_switch():
    # 40 discordant probes (the within-run compare switches to chi-square at 25): still exact
    expected = Fraction(2 * sum(math.comb(40, i) for i in range(11)), 2**40)
    assert mcnemar_exact(30, 10) == pytest.approx(float(expected), rel=1e-12)
    assert mcnemar_exact(10, 30) == mcnemar_exact(30, 10)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 3) == 0.25  # 2 * (1/2)^3
    assert mcnemar_exact(2000, 0) < 1e-300  # 2000 discordant probes: no overflow


def test_no_probes_of_a_kind_and_runs_on_different_probes():
    only_attacks = compare_runs(attempts("attack", [1, 0]), attempts("attack", [0, 0]))
    assert (
        only_attacks["over_refusal"]["difference"] is None and only_attacks["over_refusal"]["mcnemar"] is None
    )
    assert only_attacks["over_refusal"]["before"]["rate"] is None
    with pytest.raises(WeightsmithError, match="not on the same probes: 1 only before, 0 only after"):
        compare_runs(attempts("attack", [1, 0, 1]), attempts("attack", [0, 0]))
    twice = attempts("attack", [1, 0]) + attempts("attack", [1, 0], config="other")
    with pytest.raises(WeightsmithError, match="appears twice"):
        compare_runs(twice, twice)


def test_records_of_a_finished_run(tmp_path):
    recs = attempts("attack", ASR_BEFORE) + attempts("attack", ASR_AFTER, config="m + guard:g")
    (tmp_path / "transcripts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert list(records_by_config(tmp_path)) == ["m", "m + guard:g"]
    assert load_records(tmp_path) == recs[:10]  # the first configuration
    out = compare_runs(load_records(tmp_path), load_records(tmp_path / "transcripts.jsonl", "m + guard:g"))
    assert out["asr"]["mcnemar"]["before_only"] == 5
    with pytest.raises(UsageError, match="no configuration 'x'; the run has: m, m \\+ guard:g"):
        load_records(tmp_path, "x")
    with pytest.raises(UsageError, match="no red-team transcripts"):
        load_records(tmp_path / "nowhere")
    (tmp_path / "bad.jsonl").write_text('{"config": "m"}\nnot json\n')
    with pytest.raises(WeightsmithError, match="bad.jsonl:2"):
        load_records(tmp_path / "bad.jsonl")
