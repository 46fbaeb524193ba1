"""How the inspect commands show themselves: a short table of the strongest findings, and where
the JSON and HTML went.

Not here: the commands (`weightsmith.commands.inspect`), the HTML (`weightsmith.report.inspect_report`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from weightsmith.cli import eval as eval_out
from weightsmith.cli.command import Ref


def _written(result: dict, console: Console) -> None:
    written = result.get("written")
    if written:
        console.print(f"report: {written['report']}  data: {written['json']}", markup=False, highlight=False)


def _header(result: dict, console: Console) -> None:
    console.print(
        f"{result['model']}  weights sha256 {result['model_sha256'][:16]}…", markup=False, highlight=False
    )


def print_lens(result: dict, console: Console) -> None:
    _header(result, console)
    table = Table(title=f"logit lens at the last position (following {result['target'][-1]!r})")
    for col in ("stream", "top token", "p(top)", "p(target)", "rank"):
        table.add_column(col, justify="left" if col in ("stream", "top token") else "right")
    for layer, tops, probs, ranks in zip(
        result["layers"], result["top"], result["target_prob"], result["target_rank"], strict=True
    ):
        table.add_row(
            layer,
            repr(tops[-1][0]["token"]),
            f"{tops[-1][0]['prob']:.3f}",
            f"{probs[-1]:.3f}",
            str(ranks[-1]),
        )
    console.print(table)
    _written(result, console)


def _strongest(
    values: list[list[float]], rows: str, cols: list[str], n: int = 5
) -> list[tuple[str, str, float]]:
    cells = [(f"{rows} {i}", cols[j], v) for i, row in enumerate(values) for j, v in enumerate(row) if v == v]
    return sorted(cells, key=lambda c: -abs(c[2]))[:n]


def print_patch(result: dict, console: Console) -> None:
    _header(result, console)
    console.print(
        f"answer {result['answer']!r} vs {result['wrong']!r}: clean {result['clean_metric']:.3f}, "
        f"corrupted {result['corrupt_metric']:.3f}", markup=False, highlight=False,
    )  # fmt: skip
    for key, cols in (("by_position", result["tokens"]), ("by_head", None)):
        if key not in result:
            continue
        r = result[key]
        names = [repr(t) for t in cols] if cols else [f"head {h}" for h in range(len(r["values"][0]))]
        table = Table(title=f"strongest patches of {r['hook']} (1 = restores the clean answer)")
        for col in ("layer", "where", "restored"):
            table.add_column(col, justify="right" if col == "restored" else "left")
        for layer, where, v in _strongest(r["normalized"], "layer", names):
            table.add_row(layer, where, f"{v:.3f}")
        console.print(table)
    _written(result, console)


def print_attribute(result: dict, console: Console) -> None:
    _header(result, console)
    d = result["direct"]
    console.print(
        f"logit of {result['target']!r}: {result['logit']:.3f} (parts sum to {d['total']:.3f})",
        markup=False,
        highlight=False,
    )
    table = Table(title="strongest direct contributions")
    table.add_column("component")
    table.add_column("logit", justify="right")
    parts = [("embedding", d["embed"])] + [(f"layer {i} attention", v) for i, v in enumerate(d["attn"])]
    parts += [(f"layer {i} MLP", v) for i, v in enumerate(d["mlp"])]
    parts += [(f"layer {i} head {h}", v) for i, row in enumerate(d["heads"]) for h, v in enumerate(row)]
    for name, v in sorted(parts, key=lambda p: -abs(p[1]))[:8]:
        table.add_row(name, f"{v:+.3f}")
    console.print(table)
    ig = result["integrated_gradients"]
    tokens = Table(
        title=f"integrated gradients ({ig['steps']} steps; completeness error {ig['completeness_error']:.2g})"
    )
    tokens.add_column("token")
    tokens.add_column("attribution", justify="right")
    for tok, v in zip(result["tokens"], ig["scores"], strict=True):
        tokens.add_row(repr(tok), f"{v:+.3f}")
    console.print(tokens)
    _written(result, console)


def print_attention(result: dict, console: Console) -> None:
    _header(result, console)
    console.print(
        f"{len(result['patterns'])} layers x {len(result['patterns'][0])} heads over {len(result['tokens'])} tokens",
        markup=False,
        highlight=False,
    )
    _written(result, console)


def print_direction(result: dict, console: Console) -> None:
    _header(result, console)
    meta: dict[str, Any] = result["metadata"]
    console.print(
        f"wrote {result['out']}: {meta['positive_count']} positive vs {meta['negative_count']} negative prompts, "
        f"recommended layer {result['layer']} (norm {result['norms'][result['layer']]:.3f})", markup=False, highlight=False,
    )  # fmt: skip
    selection = result.get("selection")
    scale = (selection or {}).get("chosen", {}).get("scale") or 1
    add = f"--steer {result['out']}:layer={result['layer']}:scale={scale}"
    if selection is not None:
        _print_selection(selection, console)
        if "chosen" in selection.get("addition", {}):
            add = f"--steer {result['out']}:add"
    console.print(f"steer with: --steer {result['out']}:ablate  or  {add}", markup=False, highlight=False)


def _print_addition(addition: dict, console: Console) -> None:
    if "skipped" in addition:
        console.print(f"addition: not chosen ({addition['skipped']})", markup=False, highlight=False)
        return
    table = Table(
        title=f"addition on harmless validation prompts, judged by the refusal patterns ({addition['tokens']} tokens; "
        f"refusal openings {addition['openings']}; plain: {addition['plain']['refused']}/{addition['plain']['n']} refused)"
    )
    for col in ("layer", "position", "scale", "refused", "valid text"):
        table.add_column(col, justify="right")
    for t in addition["trials"]:
        table.add_row(
            *(str(t[k]) for k in ("layer", "position", "scale")),
            f"{t['refused']}/{t['n']}",
            f"{t['valid']}/{t['n']}",
        )
    console.print(table)
    c = addition["chosen"]
    console.print(
        f"addition chosen: layer {c['layer']}, position {c['position']}, scale {c['scale']}: {c['refused']}/{c['n']} "
        f"refused{'' if addition['reached'] else ' (short of the target ' + str(addition['target']) + ')'}",
        markup=False,
        highlight=False,
    )


def _print_selection(selection: dict, console: Console) -> None:
    plain = selection["plain"]
    table = Table(
        title=f"candidate directions, best first (refusal score: log-odds of {selection['refusal_tokens']}; "
        f"plain: harmful {plain['harmful']:.2f}, harmless {plain['harmless']:.2f})"
    )
    for col in ("layer", "position", "ablated (harmful)", "added (harmless)", "KL", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right")
    for c in selection["candidates"][:8]:
        cells = [f"{c[k]:.3f}" if c[k] is not None else "-" for k in ("ablate", "add", "kl")]
        table.add_row(str(c["layer"]), str(c["position"]), *cells, c["verdict"])
    console.print(table)
    chosen = selection["chosen"]
    console.print(
        f"chosen: layer {chosen['layer']}, position {chosen['position']}; steering scale {chosen['scale']} "
        "(chosen on the validation prompts)",
        markup=False,
        highlight=False,
    )
    if "addition" in selection:
        _print_addition(selection["addition"], console)


def make_progress(cfg: Any) -> Any:
    """Bars (a line every ~10% off a terminal) for the long steps: patching's layers, a direction's prompts."""
    return None if cfg.json else eval_out.ProgressBars(eval_out.stderr_console())


#: The `inspect` subcommands for cli/main.py: (config, help, example, run, printer).
COMMANDS = {
    "logit-lens": (
        Ref("weightsmith.commands.inspect:LensConfig"),
        "each layer's residual stream read through the final norm and LM head",
        'weightsmith inspect logit-lens smollm2-135m-instruct --prompt "The Eiffel Tower is in the city of" '
        "--out reports/lens",
        Ref("weightsmith.commands.inspect:run_lens"),
        print_lens,
    ),
    "patch": (
        Ref("weightsmith.commands.inspect:PatchConfig"),
        "activation patching: which layer, position and head carry a clean/corrupted difference",
        'weightsmith inspect patch smollm2-135m-instruct --clean "The Eiffel Tower is in" '
        '--corrupt "The Colosseum is in" --out reports/patch',
        Ref("weightsmith.commands.inspect:run_patch"),
        print_patch,
    ),
    "attribute": (
        Ref("weightsmith.commands.inspect:AttributeConfig"),
        "direct logit attribution per layer and head; integrated gradients per input token",
        'weightsmith inspect attribute smollm2-135m-instruct --prompt "The Eiffel Tower is in the city of" '
        '--target " Paris" --out reports/attr',
        Ref("weightsmith.commands.inspect:run_attribute"),
        print_attribute,
    ),
    "attention": (
        Ref("weightsmith.commands.inspect:AttentionConfig"),
        "every layer's and head's attention pattern over a prompt",
        'weightsmith inspect attention smollm2-135m-instruct --prompt "Once upon a time" --out reports/attn',
        Ref("weightsmith.commands.inspect:run_attention"),
        print_attention,
    ),
    "direction": (
        Ref("weightsmith.commands.inspect:DirectionConfig"),
        "a difference-of-means direction from two prompt sets (e.g. the refusal direction)",
        "weightsmith inspect direction smollm2-135m-instruct --positive builtin:harmful "
        "--negative builtin:benign --split train --out dirs/refusal.safetensors\n"
        "  weightsmith generate smollm2-135m-instruct --chat --steer dirs/refusal.safetensors:ablate",
        Ref("weightsmith.commands.inspect:run_direction"),
        print_direction,
    ),
}
