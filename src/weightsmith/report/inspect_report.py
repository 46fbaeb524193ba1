"""HTML reports for the inspect commands: heatmaps (matplotlib, embedded PNG) and the provenance
table every result carries (model, weights sha256, prompts, parameters, code version).

`write(kind, result, path)` renders one result of weightsmith.commands.inspect. Not here: the
analyses (weightsmith.inspect), the page frame and figure helpers (report/html.py).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.report.html import figure_png, fmt, image, new_figure, plain, write_page

#: Cells get their text written in them only up to this many columns.
MAX_ANNOTATED_COLUMNS = 20


def _provenance(result: dict[str, Any]) -> str:
    rows = [("model", result.get("model")), ("weights sha256", result.get("model_sha256")),
            ("weightsmith", result.get("weightsmith")), ("created", result.get("created"))]  # fmt: skip
    for key in ("prompt", "clean", "corrupt", "target", "contrast", "answer", "wrong"):
        if result.get(key) is not None:
            rows.append((key, result[key]))
    body = "".join(f"<tr><th>{escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    params = escape(json.dumps(result.get("parameters", {}), indent=1, default=str))
    return f"<h2>Provenance</h2><table>{body}</table><details><summary>parameters</summary><pre>{params}</pre></details>"


def _heatmap(
    values: list[list[float]], rows: list[str], cols: list[str], title: str, *,
    diverging: bool = False, labels: list[list[str]] | None = None,
) -> str:  # fmt: skip
    import numpy as np

    data = np.array(values, dtype=float)
    fig = new_figure(max(4.0, 0.55 * len(cols) + 2.5), max(2.5, 0.28 * len(rows) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    if diverging:
        bound = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, cmap="RdBu", vmin=-bound or -1, vmax=bound or 1, aspect="auto")
    else:
        im = ax.imshow(data, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(cols)), [plain(c) for c in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [plain(r) for r in rows], fontsize=7)
    if labels is not None and len(cols) <= MAX_ANNOTATED_COLUMNS:
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                ax.text(
                    j, i, plain(repr(text)[1:-1])[:8], ha="center", va="center", fontsize=5, color="white"
                )
    ax.set_title(plain(title), fontsize=9)
    return image(figure_png(fig), title)


def _tokens(result: dict[str, Any]) -> list[str]:
    return [f"{i}:{t!r}"[:14] for i, t in enumerate(result["tokens"])]


def _lens(result: dict[str, Any]) -> list[str]:
    tops = [[cell[0]["token"] if cell else "" for cell in row] for row in result["top"]]
    return [
        "<p>Each row reads one point of the residual stream through the final norm and LM head "
        "(nostalgebraist's logit lens); colour: the probability of the token the model finally predicts at "
        "that position (or --target); text: each cell's most likely token.</p>",
        _heatmap(result["target_prob"], result["layers"], _tokens(result), "logit lens", labels=tops),
    ]


def _patch(result: dict[str, Any]) -> list[str]:
    parts = [f"<p>Metric: {escape(result['metric'])}. Clean {fmt(result['clean_metric'])}, corrupted "
             f"{fmt(result['corrupt_metric'])}. 1 = the patch restores the clean behaviour.</p>"]  # fmt: skip
    n_layers = len(result.get("by_position", result.get("by_head", {})).get("values", []))
    layers = [f"layer {i}" for i in range(n_layers)]
    if "by_position" in result:
        r = result["by_position"]
        parts.append(
            _heatmap(r["normalized"], layers, _tokens(result), f"patched {r['hook']}", diverging=True)
        )
    if "by_head" in result:
        r = result["by_head"]
        heads = [f"head {h}" for h in range(len(r["values"][0]))]
        parts.append(_heatmap(r["normalized"], layers, heads, f"patched {r['hook']}", diverging=True))
    return parts


def _attribute(result: dict[str, Any]) -> list[str]:
    d, ig = result["direct"], result["integrated_gradients"]
    layers = [f"layer {i}" for i in range(len(d["attn"]))]
    heads = [f"head {h}" for h in range(len(d["heads"][0]))]
    ig_rows = "".join(
        f"<tr><td>{escape(t)}</td><td class='num'>{fmt(s)}</td></tr>"
        for t, s in zip(_tokens(result), ig["scores"], strict=True)
    )
    return [
        f"<p>Logit {fmt(result['logit'])} = embedding {fmt(d['embed'])} + attention {fmt(sum(d['attn']))} + "
        f"MLPs {fmt(sum(d['mlp']))} + bias {fmt(d['bias'])} ({escape(d['method'])}).</p>",
        _heatmap(
            [[a, m] for a, m in zip(d["attn"], d["mlp"], strict=True)],
            layers,
            ["attention", "MLP"],
            "direct logit attribution per layer",
            diverging=True,
        ),  # fmt: skip
        _heatmap(d["heads"], layers, heads, "direct logit attribution per head", diverging=True),
        f"<h2>Integrated gradients</h2><p>{ig['steps']} steps ({escape(ig['quadrature'])}), baseline: "
        f"{escape(ig['baseline'])}; completeness error {fmt(ig['completeness_error'])}.</p>",
        f"<table><tr><th>token</th><th>attribution</th></tr>{ig_rows}</table>",
    ]


def _attention(result: dict[str, Any]) -> list[str]:
    import numpy as np

    toks = _tokens(result)
    parts = [
        "<p>Each layer's pattern averaged over heads (rows: queries, columns: keys); every head is in the JSON.</p>"
    ]
    for i, layer in enumerate(result["patterns"]):
        parts.append(_heatmap(np.array(layer).mean(0).tolist(), toks, toks, f"layer {i}, mean over heads"))
    return parts


SECTIONS = {"logit-lens": _lens, "patch": _patch, "attribute": _attribute, "attention": _attention}


def write(kind: str, result: dict[str, Any], path: Path) -> None:
    """The report for one inspect result, written atomically to `path`."""
    write_page(
        Path(path),
        f"weightsmith inspect {kind}: {result.get('model', '')}",
        [*SECTIONS[kind](result), _provenance(result)],
    )
