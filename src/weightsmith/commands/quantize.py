"""The `quantize` command: int8 / int4 weight-only quantization to a reloadable directory.

Loads the model on CPU in fp32, replaces its projections by Int8Linear / Int4Linear
(weightsmith.quant.weight_only), writes an HF-style directory with the quantized
tensors (weightsmith.checkpoint.quantized), and with `--check` compares the quantized
model with the original: word perplexity on the bundled text sample and greedy-token
agreement on a few prompts. Not here: the arithmetic, the file layout, GGUF export.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from weightsmith.config import opt
from weightsmith.errors import ConfigError
from weightsmith.lineage import write_lineage

#: --to -> bits.
TARGETS = {"int8": 8, "int4": 4}

#: Short prompts for the greedy agreement check (plain text; the sample is not chat).
CHECK_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
    "The three primary colors are",
    "def fibonacci(n):",
    "The best way to learn a new language is",
    "Water boils at",
    "In 1969, the first humans",
]
CHECK_TOKENS = 32


@dataclass(kw_only=True)
class QuantizeConfig:
    """Quantize a model's weights to int8 (per channel) or int4 (group-wise) and save it."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    to: str = opt(help="target weight type", choices=list(TARGETS))
    group_size: int | None = opt(None, "int4 group size: 32, 64 or 128 (default 32); not used for int8")
    out: str = opt(help="output directory (HF-style, loadable with weightsmith.load)")
    lm_head: bool = opt(False, "also quantize the LM head (unties it from the embedding)")
    lm_head_bits: int | None = opt(
        None, "quantize the LM head to 8 or 4 bits whatever --to is (implies --lm-head); "
        "--to int4 --lm-head-bits 8 is the mix of GGUF Q4_0/Q4_1 files"
    )  # fmt: skip
    imatrix: str | None = opt(
        None, "int4: an importance matrix file (`weightsmith imatrix`) to weigh each group's fit by"
    )
    check: bool = opt(False, "compare with the original: perplexity on a text sample and greedy agreement")
    overwrite: bool = opt(False, "replace an existing output directory")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    json: bool = opt(False, "print the result as JSON")


def check_quantize_args(cfg: QuantizeConfig) -> tuple[int, int | None, Path]:
    """Reject bad flags before any model is loaded; returns (bits, group_size, out)."""
    from weightsmith.checkpoint.save import check_out_dir
    from weightsmith.quant.weight_only import check_quant_args

    if cfg.to not in TARGETS:
        raise ConfigError(f"--to {cfg.to!r} is not supported; use int8 or int4")
    bits = TARGETS[cfg.to]
    if bits == 8 and cfg.group_size is not None:
        raise ConfigError("--group-size applies to int4 only; int8 uses one scale per output channel")
    group = check_quant_args(bits, cfg.group_size)
    if cfg.lm_head_bits is not None and cfg.lm_head_bits not in (8, 4):
        raise ConfigError(f"--lm-head-bits {cfg.lm_head_bits} is not supported; use 8 or 4")
    out = Path(cfg.out).expanduser()
    check_out_dir(out, overwrite=cfg.overwrite)  # before the model loads
    return bits, group, out


def run_quantize(cfg: QuantizeConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.checkpoint.quantized import describe, quantization_config, save_quantized
    from weightsmith.llm import load
    from weightsmith.quant.weight_only import quantize_model

    bits, group, out = check_quantize_args(cfg)
    matrix = _read_imatrix(cfg, bits)
    started = time.time()
    llm = load(cfg.model, device="cpu", dtype="fp32", allow_pickle=cfg.allow_pickle)
    before = check_model(llm) if cfg.check else None
    direct = _gguf_codes(llm, bits, group)
    importance = None
    if matrix is not None:
        from weightsmith.checkpoint.imatrix import module_importance

        importance = module_importance(matrix, llm.model, llm.checkpoint.config)
    names = quantize_model(
        llm.model, bits, group, lm_head=cfg.lm_head, head_bits=cfg.lm_head_bits, int4_codes=direct,
        importance=importance,
    )  # fmt: skip
    gen = {
        k: v for k, v in llm.checkpoint.generation_config.items() if k not in ("bos_token_id", "eos_token_id")
    }
    save_quantized(llm.model, llm.tokenizer, out, generation_config=gen, overwrite=cfg.overwrite)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result: dict[str, Any] = {
        "model": cfg.model,
        "out": str(out),
        "quantization": describe(quantization_config(llm.model)),
        "modules_quantized": len(names),
        "modules_from_gguf_blocks": sum(f"{n}.weight" in direct for n in names),
        "modules_weighted_by_imatrix": sum(
            n in (importance or {}) and f"{n}.weight" not in direct for n in names
        ),
        "bytes": size,
    }
    if before is not None:
        result["check"] = compare(before, check_model(llm))
    headline = {k: result[k] for k in ("quantization", "modules_quantized", "bytes")}
    if "check" in result:
        headline.update(
            {k: result["check"][k] for k in ("word_perplexity_quantized", "perplexity_change_pct")}
        )
    write_lineage(
        out,
        kind="quantize",
        config=cfg,
        metrics=headline,
        started=started,
        inputs={"model": cfg.model, **({"imatrix": cfg.imatrix} if cfg.imatrix else {})},
    )
    return result


def _read_imatrix(cfg: QuantizeConfig, bits: int) -> Any:
    """The --imatrix file, read (a bad one stops before the model loads), or None."""
    if cfg.imatrix is None:
        return None
    if bits != 4:
        raise ConfigError(
            f"--imatrix weighs int4 groups; --to {cfg.to} has none (drop --imatrix or use --to int4)"
        )
    from weightsmith.checkpoint.imatrix import read_imatrix

    return read_imatrix(cfg.imatrix)


def _gguf_codes(llm: Any, bits: int, group: int | None) -> dict:
    """A GGUF source's Q4_0/Q4_1 codes for int4 with groups of 32 (taken as they are);
    nothing otherwise (Q8_0's per-block scales do not fit a per-channel int8 layer)."""
    ckpt = llm.checkpoint
    if bits != 4 or group != 32 or ckpt.format != "gguf":
        return {}
    from weightsmith.checkpoint.gguf_quants import gguf_int4_layers

    return gguf_int4_layers(ckpt.path)


# -- the check ------------------------------------------------------------------


def text_sample() -> list[str]:
    """The bundled text sample's paragraphs."""
    path = resources.files("weightsmith.eval") / "suites" / "text-ppl.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def word_perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """exp(-sum log-likelihood / sum words) over `texts` (lm-eval's word_perplexity)."""
    from weightsmith.eval.scorer import Scorer

    ll = Scorer(model, tokenizer).loglikelihood_rolling(texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    return math.exp(-sum(ll) / words)


def greedy_tokens(llm: Any, prompts: list[str] = CHECK_PROMPTS, n: int = CHECK_TOKENS) -> list[list[int]]:
    from weightsmith.sampling import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [c.token_ids for c in llm.engine.generate(prompts, params)]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Fraction of positions equal overall, and before each row's first divergence."""
    total = same = prefix = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        total += n
        same += sum(i == j for i, j in zip(x, y, strict=False))
        k = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        prefix += k
    return {"overall": same / max(total, 1), "before_divergence": prefix / max(total, 1)}


def check_model(llm: Any) -> dict[str, Any]:
    return {
        "word_perplexity": word_perplexity(llm.model, llm.tokenizer, text_sample()),
        "tokens": greedy_tokens(llm),
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    p0, p1 = before["word_perplexity"], after["word_perplexity"]
    return {
        "word_perplexity_original": p0,
        "word_perplexity_quantized": p1,
        "perplexity_change_pct": 100 * (p1 / p0 - 1),
        "greedy_agreement": agreement(before["tokens"], after["tokens"]),
        "prompts": len(before["tokens"]),
        "tokens_per_prompt": CHECK_TOKENS,
    }
