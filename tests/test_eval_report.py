"""The evaluation HTML report: complete, escaped, self-contained, written atomically."""

from __future__ import annotations

import base64
import re

import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.eval.stats import ALPHA, compare_runs
from weightsmith.report.eval_report import write_eval_report

EVIL = "<script>alert('x')</script>"


def _run(label: str, acc: float, ppl: float) -> dict:
    return {
        "results": {
            "arc_easy": {"alias": "arc_easy", "acc,none": acc, "acc_stderr,none": 0.02, "acc_norm,none": acc},
            EVIL: {"alias": EVIL, "exact_match,strict": acc / 2, "exact_match_stderr,strict": 0.01},
            "wikitext": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"},
        },
        "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, EVIL: {"exact_match": True}},
        "config": {"model": "smollm2-135m", "adapter": f"{label}-adapter", "limit": 40, "num_fewshot": 0},
        "date": 1700000000.0,
        "weightsmith": {"label": label},
    }


def _samples(correct_upto: int) -> dict:
    return {
        "arc_easy": [{"doc_id": i, "metrics": {"acc,none": float(i < correct_upto)}} for i in range(40)],
        "wikitext": [
            {"doc_id": i, "metrics": {"word_perplexity,none": [-2.0 - i / 40, 10]}} for i in range(40)
        ],
    }


@pytest.fixture
def report(tmp_path):
    runs = [_run("base", 0.5, 30.0), _run("tuned", 0.9, 25.0)]
    cmp = compare_runs(runs, [_samples(20), _samples(36)], iters=500)
    defs = {"acc": "Fraction of documents answered correctly.", "word_perplexity": "exp(-LL / words)"}
    path = tmp_path / "out" / "report.html"
    write_eval_report(path, runs, cmp, defs, alpha=ALPHA)
    return path, path.read_text(encoding="utf-8"), cmp


def test_report_has_every_task_metric_label_and_definition(report):
    path, html, cmp = report
    assert html.startswith("<!DOCTYPE html>")
    for text in (
        "arc_easy",
        "wikitext",
        "acc_norm",
        "word_perplexity",
        "exact_match (strict)",
        "base",
        "tuned",
    ):
        assert text in html
    assert "Fraction of documents answered correctly." in html
    assert "exp(-LL / words)" in html
    assert "base-adapter" in html and "2023-11-14" in html  # metadata, lm-eval timestamp as a date
    assert "0.5 ± 0.02" in html
    assert "mcnemar" in html and "paired_bootstrap" in html
    # Each comparison row names its interval, and the note says what the methods are.
    assert "95% Newcombe paired" in html and "95% paired bootstrap" in html
    assert "Newcombe's hybrid score interval for paired proportions" in html
    assert 'class="up"' in html  # tuned answers 16 more arc_easy documents: significant at 0.05
    assert cmp["rows"][0]["better"]["tuned"] is True


def test_report_escapes_data_and_needs_nothing_external(report):
    _, html, _ = report
    assert EVIL not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_report_embeds_a_png_chart(report):
    _, html, _ = report
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert m, "no embedded chart"
    png = base64.b64decode(m.group(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_report_without_comparison(tmp_path):
    path = tmp_path / "r.html"
    run = _run("only", 0.7, 12.0)
    run["results"]["a$x_{$b"] = {"acc,none": 0.3}  # would be broken mathtext in the chart
    write_eval_report(path, [run], None, {}, alpha=ALPHA)
    html = path.read_text(encoding="utf-8")
    assert "Comparison" not in html and "only" in html and "data:image/png;base64," in html
    assert "a$x_{$b" in html


def test_report_is_written_atomically(report, monkeypatch):
    path, html, cmp = report
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no temp file left
    import weightsmith.files as files

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(WeightsmithError, match="No space left"):
        write_eval_report(path, [_run("other", 0.1, 99.0)], None, {}, alpha=ALPHA)
    assert path.read_text(encoding="utf-8") == html  # the old report is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
