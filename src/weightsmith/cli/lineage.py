"""How lineage, card and reproduce show themselves, and their entries in the command table.

The lineage tree is printed as a rich Tree: one line per artifact (kind, id, folder, when,
which weightsmith), one per input (role, what, sha256, status) with the input's own artifact
under it. Not here: the commands (`weightsmith.commands.lineage`, `.card`, `.reproduce`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from weightsmith.cli.command import Command
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
