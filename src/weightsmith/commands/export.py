"""The `export` command: write a model in another runtime's format (GGUF for llama.cpp/Ollama).

The conversion lives in `weightsmith.checkpoint.gguf_write`; this module checks the request,
loads the model on CPU in fp32 with plain (training) weight layout, and returns what it wrote.
With `--adapter DIR` it writes the LoRA adapter alone as llama.cpp's GGUF adapter file
(weightsmith.lora.gguf_files), checked against the base model's config and shapes (no base
weights are read), and, where the base is a GGUF file, an Ollama Modelfile with FROM the base
and ADAPTER the file. Not here: other formats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.checkpoint.gguf_write import QUANTS, check_export_args, export_gguf
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.files import write_text_atomic
from weightsmith.lineage import write_lineage


@dataclass(kw_only=True)
class ExportConfig:
    """Export a model as a GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    adapter: str | None = opt(
        None,
        "LoRA adapter folder (finetune's output, or PEFT's) to write alone as llama.cpp's GGUF adapter "
        "(f32 or f16), for MODEL as its base",
    )
    steer: list[str] = opt(
        default_factory=list,
        help="a direction to write as llama.cpp's control vector (--control-vector) instead of the model: "
        "FILE:layer=L:scale=S or FILE:add on a direction file of MODEL's (repeatable; the additions sum)",
        split=False,
    )
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
    _check_steer_args(cfg)
    imatrix = None
    if cfg.imatrix is not None:  # a bad file stops before the model loads
        from weightsmith.checkpoint.imatrix import read_imatrix

        if cfg.quant in ("f32", "f16", "q8_0"):
            raise UsageError(
                f"--imatrix has no effect on --quant {cfg.quant} (its steps are fine enough); drop it, "
                "or choose a type of 6 bits or fewer such as q4_k_m"
            )
        if cfg.adapter is not None or cfg.steer:
            raise UsageError(
                "--imatrix weighs a quantizer's fits; an adapter or control vector is written unquantized, "
                "drop --imatrix"
            )
        imatrix = read_imatrix(cfg.imatrix)
    if cfg.steer:
        return _export_control_vector(cfg, out, resolve(cfg.model))
    if cfg.adapter is not None:
        folder = _check_adapter_args(cfg)  # before resolving, which may download the model
        return _export_adapter(cfg, out, folder, resolve(cfg.model))
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


def _check_adapter_args(cfg: ExportConfig) -> Path:
    from weightsmith.lora.gguf_files import ADAPTER_QUANTS

    if cfg.quant not in ADAPTER_QUANTS:
        raise UsageError(
            f"--quant {cfg.quant}: an adapter is written as {' or '.join(ADAPTER_QUANTS)} (it is small); "
            "quantize the base model with its own export"
        )
    folder = Path(cfg.adapter)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise UsageError(
            f"--adapter {cfg.adapter}: not a folder; pass a LoRA adapter folder (finetune's --out)"
        )
    return folder


def _export_adapter(cfg: ExportConfig, out: Path, folder: Path, base: Path) -> dict[str, Any]:
    """`--adapter`: the adapter as a GGUF LoRA file, and a Modelfile where the base is a GGUF file."""
    import torch

    from weightsmith.checkpoint.load import read_without_weights
    from weightsmith.checkpoint.modelfile import modelfile_path, modelfile_text
    from weightsmith.lora.files import read_adapter, write_gguf_adapter_file
    from weightsmith.models import CausalLM

    started = time.time()
    config, tokenizer, generation = read_without_weights(base)
    with torch.device("meta"):  # the base's shapes, no weights: the adapter is checked as `load_adapter` does
        skeleton = CausalLM(config)
    read_adapter(skeleton, folder)
    is_gguf = base.is_file()
    body = modelfile_text(out.name, tokenizer, generation, base=str(base.resolve())) if is_gguf else None
    result = write_gguf_adapter_file(folder, config, out, cfg.quant)
    modelfile = None
    if body is not None:
        modelfile = modelfile_path(out)
        write_text_atomic(modelfile, body)
    write_lineage(
        out, kind="export", config=cfg, started=started, extra_outputs=[modelfile] if modelfile else [],
        inputs={"model": cfg.model, "adapter": cfg.adapter},
        metrics={"quant": cfg.quant, "bytes": out.stat().st_size},
    )  # fmt: skip
    return {
        "model": cfg.model,
        "adapter": cfg.adapter,
        **result,
        "modelfile": str(modelfile) if modelfile else None,
    }


def _check_steer_args(cfg: ExportConfig) -> None:
    from weightsmith.inspect.steering import parse_steer

    if cfg.steer and cfg.adapter is not None:
        raise UsageError(
            "--steer writes a control vector and --adapter an adapter; export them one at a time"
        )
    for spec in cfg.steer:
        path = parse_steer(spec).path
        if not path.is_file():
            raise UsageError(f"--steer {spec}: no direction file at {path}")


def _export_control_vector(cfg: ExportConfig, out: Path, base: Path) -> dict[str, Any]:
    """`--steer`: the specs' additions as one llama.cpp control vector file (inspect/control_vectors.py)."""
    from weightsmith.checkpoint.gguf_write import ARCHITECTURES
    from weightsmith.inspect.control_vectors import write_control_vector
    from weightsmith.inspect.steering import additions, parse_steer, read_steer_file
    from weightsmith.llm import load
    from weightsmith.models.fingerprint import model_fingerprint

    started = time.time()
    llm = load(
        base, device="cpu", dtype="fp32", auto_pull=False
    )  # as `--steer` loads it: the same fingerprint
    config, fingerprint = llm.model.config, model_fingerprint(llm.model)
    n = config.num_hidden_layers
    pairs = []
    for spec in map(parse_steer, cfg.steer):
        direction = read_steer_file(
            spec.path, hidden_size=config.hidden_size, num_layers=n, fingerprint=fingerprint
        )
        pairs += [(layer, vector * scale) for layer, vector, scale in additions(spec, direction, n)]
    hint = ARCHITECTURES.get(config.model_type, config.model_type)
    result = write_control_vector(out, pairs, num_layers=n, model_hint=hint)
    write_lineage(
        out, kind="export", config=cfg, started=started, inputs={"model": cfg.model, "steer": list(cfg.steer)},
        metrics={"bytes": result["bytes"]},
    )  # fmt: skip
    return {"model": cfg.model, "format": "gguf-control-vector", "model_hint": hint, **result}
