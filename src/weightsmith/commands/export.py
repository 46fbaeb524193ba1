"""The `export` command: write a model in another runtime's format (GGUF for llama.cpp/Ollama).

The conversion lives in `weightsmith.checkpoint.gguf_write`; this module checks the request,
loads the model on CPU in fp32 with plain (training) weight layout, and returns what it wrote.
Not here: LoRA adapters (merge them first with `weightsmith merge`), other formats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from weightsmith.checkpoint.gguf_write import QUANTS, check_export_args, export_gguf
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.lineage import write_lineage


@dataclass(kw_only=True)
class ExportConfig:
    """Export a model as a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    format: str = opt("gguf", "output format", choices=["gguf"])
    quant: str = opt("f16", "storage type of the weight matrices", choices=list(QUANTS))
    out: str = opt(help="output file (NAME.gguf); a Modelfile is written in the same directory")
    imatrix: str | None = opt(
        None,
        "importance matrix file (`weightsmith imatrix`, or llama-imatrix's) to weigh the quantizer's fits",
    )
    overwrite: bool = opt(False, "replace an existing output file")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    json: bool = opt(False, "print the result as JSON")


def run_export(cfg: ExportConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.checkpoint.pull import resolve

    # Refuse a bad --out before resolving, which may download the model.
    out = check_export_args(cfg.out, cfg.quant, overwrite=cfg.overwrite)
    imatrix = None
    if cfg.imatrix is not None:  # a bad file stops before the model loads
        from weightsmith.checkpoint.imatrix import read_imatrix

        if cfg.quant in ("f32", "f16", "q8_0"):
            raise UsageError(
                f"--imatrix has no effect on --quant {cfg.quant} (its steps are fine enough); drop it, "
                "or choose a type of 6 bits or fewer such as q4_k_m"
            )
        imatrix = read_imatrix(cfg.imatrix)
    path = resolve(cfg.model)
    started = time.time()
    tick = progress(f"export {cfg.quant}") if progress else None  # ticks a tensor at a time
    result = export_gguf(
        path, out, cfg.quant, overwrite=cfg.overwrite, allow_pickle=cfg.allow_pickle, on_tensor=tick,
        imatrix=imatrix,
    )  # fmt: skip
    modelfile = [m for m in [result.get("modelfile")] if m]
    write_lineage(
        out, kind="export", config=cfg, started=started, extra_outputs=modelfile,
        inputs={"model": cfg.model, **({"imatrix": cfg.imatrix} if cfg.imatrix else {})},
        metrics={"quant": cfg.quant, "bytes": out.stat().st_size},
    )  # fmt: skip
    return {"model": cfg.model, **result}
