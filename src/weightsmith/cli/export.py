"""How export and imatrix show themselves: a line naming the file, its size and what it holds.

Not here: the command (`weightsmith.commands.export`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def print_export(result: dict[str, Any], console: Console) -> None:
    types = ", ".join(f"{n} {c}" for n, c in result["tensors"].items())
    console.print(
        f"wrote {result['path']} ({result['bytes'] / 1e6:,.1f} MB, {result['architecture']}, "
        f"tensors {types}) and {result['modelfile']}"
    )
    weighed = result.get("imatrix")
    if weighed:
        without = weighed["without"]
        console.print(
            f"importance matrix: weighed {weighed['weighted']} matrices"
            + (
                f"; {len(without)} had no entry ({', '.join(without[:3])}{' ...' if len(without) > 3 else ''})"
                if without
                else ""
            )
        )


def print_imatrix(result: dict[str, Any], console: Console) -> None:
    console.print(
        f"wrote {result['path']}: {result['entries']} matrices over {result['chunks']} chunks of "
        f"{result['chunk_size']} tokens ({result['tokens']:,} of the text's {result['text_tokens']:,})"
    )
