"""How lineage, card and reproduce show themselves, and their entries in the command table.

The lineage tree is printed as a rich Tree: one line per artifact (kind, id, folder, when,
which weightsmith), one per input (role, what, sha256, status) with the input's own artifact
under it. Not here: the commands (`weightsmith.commands.lineage`, `.card`, `.reproduce`).
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from weightsmith.cli.command import Command
from weightsmith.commands import card, reproduce, ui
from weightsmith.commands import lineage as lineage_cmd

#: Input states as people read them (status -> words, style).
STATUS = {
    "ok": ("ok", "green"),
    "changed": ("CHANGED", "bold red"),
    "missing": ("MISSING", "bold red"),
    "outside": ("not checked: outside --root", "yellow"),
    "builtin": ("built in", "dim"),
    "endpoint": ("endpoint", "dim"),
    "unrecorded": ("not found when recorded", "yellow"),
}


def _short(sha: Any) -> str:
    return str(sha)[:12] if sha else "-"


def _artifact_label(node: dict[str, Any]) -> Text:
    git = node.get("git") or {}
    commit = f" @ {git['commit'][:10]}{'+changes' if git.get('dirty') else ''}" if git.get("commit") else ""
    label = Text()
    label.append(f"{node['kind']} ", style="bold")
    label.append(f"{node['id'][:12]}  {node['artifact']}")
    label.append(f"  ({node.get('finished')}, weightsmith {node.get('weightsmith')}{commit})", style="dim")
    bad = [o for o in node["outputs"] if o["status"] != "ok"]
    outputs = f"{len(node['outputs'])} output files"
    if bad:
        label.append(f"\n{outputs}; ", style="dim")
        label.append(", ".join(f"{o['path']} {STATUS[o['status']][0]}" for o in bad), style="bold red")
    else:
        label.append(f"\n{outputs}, as recorded", style="dim")
    return label


def _add(tree: Tree, node: dict[str, Any]) -> None:
    for entry in node["inputs"]:
        words, style = STATUS.get(entry["status"], (entry["status"], ""))
        line = Text(f"{entry['role']}: ", style="bold")
        line.append(f"{entry.get('spec')}  sha256 {_short(entry.get('sha256'))}  ")
        line.append(words, style=style)
        if entry.get("now"):
            line.append(f" (now {_short(entry['now'])})", style=style)
        branch = tree.add(line)
        parent = entry.get("parent")
        if parent is None:
            continue
        if parent.get("error"):
            branch.add(Text(parent["error"], style="bold red"))
        elif parent.get("shown_above"):
            branch.add(Text(f"{parent['kind']} {parent['id'][:12]} (shown above)", style="dim"))
        else:
            _add(branch.add(_artifact_label(parent)), parent)


def print_lineage(result: dict[str, Any], console: Console) -> None:
    root = result["tree"]
    tree = Tree(_artifact_label(root))
    _add(tree, root)
    console.print(tree)
    problems = result["problems"]
    if problems:
        console.print(Text(f"{len(problems)} problem(s):", style="bold red"))
        for p in problems:
            console.print(f"  {p}", markup=False, highlight=False)
    else:
        console.print(f"{result['artifacts']} artifact(s); every recorded hash still matches")


COMMANDS: dict[str, Command] = {
    "lineage": Command(
        lineage_cmd.LineageConfig,
        "show where an artifact came from, back to the base weights, every hash checked again",
        "weightsmith lineage runs/aligned\n"
        "  weightsmith lineage exports/support.gguf --json\n"
        "  weightsmith lineage runs/aligned --root . --root ~/data     # also check inputs under ~/data",
        lineage_cmd.run_lineage,
        lambda result, console, cfg: print_lineage(result, console),
    ),
}


def print_card(result: dict[str, Any], console: Console) -> None:
    meta = result["metadata"]
    results = sum(len(m.get("results", [])) for m in meta.get("model-index") or [])
    console.print(f"wrote {result['out']} (license {meta.get('license')}, base model {meta.get('base_model')}, "
                  f"{results} eval result(s) in model-index)", markup=False, highlight=False)  # fmt: skip


COMMANDS["card"] = Command(
    card.CardConfig,
    "write a Hugging Face model card from an artifact's lineage and its eval, red-team and bias results",
    "weightsmith card runs/aligned --eval reports/eval --redteam reports/rt --bias reports/bias \\\n"
    "      --out runs/aligned/README.md",
    card.run_card,
    lambda result, console, cfg: print_card(result, console),
)


def print_reproduce(result: dict[str, Any], console: Console) -> None:
    console.print(f"re-ran {result['kind']} ({result['original']}) into {result['reproduced']}",
                  markup=False, highlight=False)  # fmt: skip
    for o in result["outputs"]:
        style = "green" if o["status"] == "identical" else "bold red"
        console.print(Text(f"  {o['path']}: ").append(o["status"], style=style))
    console.print(f"{result['identical']} of {len(result['outputs'])} outputs bit-identical")
    for m in result["metrics"]:
        console.print(
            f"  {m['name']}: {m['original']:.6g} -> {m['reproduced']:.6g} (delta {m['delta']:+.3g})",
            markup=False, highlight=False,
        )  # fmt: skip


COMMANDS["reproduce"] = Command(
    reproduce.ReproduceConfig,
    "re-run the command recorded in an artifact's lineage into a fresh place; compare outputs and metrics",
    "weightsmith reproduce runs/aligned\n  weightsmith reproduce reports/eval --out /tmp/eval-again --json",
    reproduce.run_reproduce,
    lambda result, console, cfg: print_reproduce(result, console),
)


COMMANDS["ui"] = Command(
    ui.UiConfig,
    "a local web page of the store, runs (loss curves), reports, lineage and arena; chat with --allow-run",
    "weightsmith ui --port 8020\n  weightsmith ui --workspace ~/projects/support --allow-run\n"
    "  weightsmith ui --host 0.0.0.0 --api-key-file ~/.ui-key",
    ui.run_ui,
    lambda result, console, cfg: None,
    lambda cfg: (
        lambda url: print(
            f"weightsmith ui on {url}{'' if cfg.allow_run else ' (read-only)'} (Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )
    ),
)
