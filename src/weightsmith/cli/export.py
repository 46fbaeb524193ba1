"""How export and imatrix show themselves: a line naming the file, its size and what it holds.

Not here: the command (`weightsmith.commands.export`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def print_export(result: dict[str, Any], console: Console) -> None:
    if result.get("format") == "gguf-lora":
        _print_adapter(result, console)
        return
    if result.get("format") == "gguf-control-vector":
        layers = ", ".join(str(i) for i in result["layers"])
        console.print(
            f"wrote {result['path']} (llama.cpp control vector for {result['model_hint']}: direction.N for layer "
            f"output{'s' if len(result['layers']) > 1 else ''} {layers}); use: llama-cli --control-vector {result['path']}"
        )
        return
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


def _print_adapter(result: dict[str, Any], console: Console) -> None:
    ranks = "/".join(str(r) for r in result["ranks"])
    scale = "scales in B, alpha 0" if result["scales_in_b"] else f"alpha {result['alpha']:g}"
    console.print(
        f"wrote {result['path']} ({result['bytes'] / 1e6:,.2f} MB, LoRA adapter for {result['architecture']}: "
        f"{result['modules']} matrices, rank {ranks}, {scale})"
        + (f" and {result['modelfile']}" if result["modelfile"] else "")
    )
    if not result["modelfile"]:
        console.print(
            "no Modelfile: the base is not a GGUF file. Export it too (weightsmith export MODEL --out base.gguf), "
            "then run llama.cpp with -m base.gguf --lora ADAPTER.gguf, or add `ADAPTER ./ADAPTER.gguf` to its Modelfile"
        )


def print_imatrix(result: dict[str, Any], console: Console) -> None:
    console.print(
        f"wrote {result['path']}: {result['entries']} matrices over {result['chunks']} chunks of "
        f"{result['chunk_size']} tokens ({result['tokens']:,} of the text's {result['text_tokens']:,})"
    )
