"""The inspect commands: logit lens, activation patching, attribution, attention and directions,
each writing JSON and an HTML heatmap with what is needed to reproduce it.

Every result carries the model's name, its weights fingerprint (sha256 over every tensor,
weightsmith.models.fingerprint), the prompts, the parameters and the code version. Inputs are
checked before the model runs: empty prompts, unknown targets, prompt sets, layers.

Not here: the analyses (weightsmith.inspect), the HTML (weightsmith.report.inspect_report),
printing (weightsmith.cli.inspect).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from weightsmith import __version__
from weightsmith.commands.loading import LoadOptions, load_status, model_label
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.files import write_json_atomic
from weightsmith.inspect import InspectError, run_hooked
from weightsmith.inspect.addition import AddOptions, NoRefusals, select_addition
from weightsmith.inspect.attribution import attention_patterns, integrated_gradients
from weightsmith.inspect.directions import check_layer, difference_of_means, prompts_digest, write_direction
from weightsmith.inspect.lens import direct_logit_attribution, logit_lens
from weightsmith.inspect.patching import STREAMS, logit_difference, patch
from weightsmith.inspect.selection import PromptSets, SelectOptions, select_direction, validation_split
from weightsmith.inspect.trace import encode
from weightsmith.llm import LLM
from weightsmith.models.fingerprint import model_fingerprint
from weightsmith.report import inspect_report
from weightsmith.safety.probes import load_packs
from weightsmith.safety.split import SplitOptions, select_split

#: A prompt-set text file is read up to this size (one prompt per line).
MAX_PROMPT_FILE_BYTES = 8 << 20


@dataclass(kw_only=True)
class InspectOptions(LoadOptions):
    out: str | None = opt(None, "folder for the result JSON and the HTML report")
    json: bool = opt(False, "print the result as JSON")


@dataclass(kw_only=True)
class LensConfig(InspectOptions):
    """The logit lens: each layer's stream read through the final norm and LM head."""

    prompt: str = opt(help="text to read (no chat template)", short="-p")
    target: str | None = opt(
        None, "follow this token (text, e.g. ' Paris') at every position instead of the prediction"
    )
    top_k: int = opt(5, "most likely tokens kept per layer and position")


@dataclass(kw_only=True)
class PatchConfig(InspectOptions):
    """Activation patching: clean activations put into the corrupted run, one at a time."""

    clean: str = opt(help="the clean prompt")
    corrupt: str = opt(help="the corrupted prompt (same number of tokens)")
    answer: str | None = opt(
        None, "the clean answer token (default: the model's prediction on the clean prompt)"
    )
    wrong: str | None = opt(
        None, "the corrupted answer token (default: the prediction on the corrupted prompt)"
    )
    by: Literal["position", "head", "both"] = opt("both", "patch layer x position, layer x head, or both")
    stream: str = opt("resid_pre", f"stream patched by position: {', '.join(STREAMS)}")


@dataclass(kw_only=True)
class AttributeConfig(InspectOptions):
    """Direct logit attribution per layer and head, and integrated gradients per input token."""

    prompt: str = opt(help="the prompt (no chat template)", short="-p")
    target: str | None = opt(None, "the token to explain (default: the model's prediction)")
    contrast: str | None = opt(None, "explain target minus this token's logit")
    steps: int = opt(32, "integration steps (Gauss-Legendre) for integrated gradients")


@dataclass(kw_only=True)
class AttentionConfig(InspectOptions):
    """Every layer's and head's attention pattern over a prompt."""

    prompt: str = opt(help="the prompt (no chat template)", short="-p")


@dataclass(kw_only=True)
class DirectionConfig(LoadOptions):
    """A difference-of-means direction from two prompt sets, saved as safetensors."""

    positive: list[str] = opt(
        help="prompt set: builtin:NAME or a pack file/folder (probe prompts), or a .txt file (one per line)"
    )
    negative: list[str] = opt(help="the other prompt set, same forms")
    out: str = opt(help="the .safetensors file to write")
    layer: int | None = opt(None, "layer to recommend in the file (default: the most separating one)")
    selection: SelectOptions = opt(default_factory=SelectOptions, flatten=True)  # --select, --positions...
    addition: AddOptions = opt(default_factory=AddOptions, flatten=True)  # --add-scales, --add-target...
    raw: bool = opt(False, "use the prompts as they are, not as a user turn of the chat template")
    probe_split: SplitOptions = opt(default_factory=SplitOptions, flatten=True)
    limit: int | None = opt(None, "at most this many prompts from each set")
    json: bool = opt(False, "print the result as JSON")


def _load(cfg: LoadOptions, progress: Any) -> tuple[LLM, dict[str, Any]]:
    llm = cfg.load(load_status(progress))
    info = {
        "model": model_label(cfg.model, cfg.adapter),
        "model_sha256": model_fingerprint(llm.model),
        "weightsmith": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("json",)},
    }
    return llm, info


def token_id(llm: LLM, text: str, what: str) -> int:
    """The first token of `text` (with no special tokens); empty -> one line."""
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InspectError(f"--{what} {text!r} has no tokens; give some text, e.g. ' Paris'")
    return ids[0]


def predicted(llm: LLM, ids: list[int]) -> int:
    """The model's most likely next token after `ids`."""
    logits, _ = run_hooked(llm.model, torch.tensor([ids]))
    return int(logits[0, -1].argmax())


def _words(llm: LLM, ids: Sequence[int]) -> list[str]:
    return [llm.tokenizer.decode([int(i)]) for i in ids]


def _ticker(progress: Any, label: str) -> Any:
    """`progress(label)`: a `tick(done, total)` for one long step, when someone listens."""
    return progress(label) if progress else None


def _finish(kind: str, cfg: Any, result: dict[str, Any]) -> dict[str, Any]:
    if cfg.out:
        out = Path(cfg.out)
        write_json_atomic(out / f"{kind}.json", result)
        inspect_report.write(kind, result, out / f"{kind}.html")
        result["written"] = {"json": str(out / f"{kind}.json"), "report": str(out / f"{kind}.html")}
    return result


def _check_prompt(text: str, flag: str) -> None:
    if not text or not text.strip():
        raise InspectError(f"--{flag} is empty; give the text to inspect")


def run_lens(cfg: LensConfig, progress: Any = None) -> dict[str, Any]:
    _check_prompt(cfg.prompt, "prompt")
    if cfg.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {cfg.top_k}")
    llm, info = _load(cfg, progress)
    ids = encode(llm.tokenizer, cfg.prompt)
    target = token_id(llm, cfg.target, "target") if cfg.target else None
    lens = logit_lens(llm.model, ids, top_k=cfg.top_k, target=target)
    result = {
        **info, "kind": "logit-lens", "prompt": cfg.prompt, "tokens": _words(llm, ids), "layers": lens.layers,
        "target": _words(llm, lens.target_ids.tolist()), "target_prob": lens.target_probs.tolist(),
        "target_rank": lens.target_ranks.tolist(),
        "top": [[[{"token": w, "prob": round(float(p), 6)} for w, p in zip(_words(llm, i.tolist()), ps, strict=True)]
                 for i, ps in zip(row_ids, row_ps, strict=True)]
                for row_ids, row_ps in zip(lens.top_ids, lens.top_probs, strict=True)],
    }  # fmt: skip
    return _finish("logit-lens", cfg, result)


def run_patch(cfg: PatchConfig, progress: Any = None) -> dict[str, Any]:
    _check_prompt(cfg.clean, "clean")
    _check_prompt(cfg.corrupt, "corrupt")
    if cfg.stream not in STREAMS:
        raise UsageError(f"--stream must be one of {', '.join(STREAMS)}, got {cfg.stream!r}")
    llm, info = _load(cfg, progress)
    clean, corrupt = (
        encode(llm.tokenizer, cfg.clean, "clean prompt"),
        encode(llm.tokenizer, cfg.corrupt, "corrupted prompt"),
    )
    if len(clean) != len(corrupt):
        raise InspectError(
            f"--clean has {len(clean)} tokens and --corrupt {len(corrupt)}; patching pairs positions, "
            "so reword them to the same token count"
        )
    answer = token_id(llm, cfg.answer, "answer") if cfg.answer else predicted(llm, clean)
    wrong = token_id(llm, cfg.wrong, "wrong") if cfg.wrong else predicted(llm, corrupt)
    if answer == wrong:
        raise InspectError(
            f"the clean and corrupted prompts have the same answer {llm.tokenizer.decode([answer])!r}; "
            "give --answer and --wrong, or a corruption that changes the answer"
        )
    metric = logit_difference(answer, wrong)
    result: dict[str, Any] = {
        **info, "kind": "patch", "clean": cfg.clean, "corrupt": cfg.corrupt, "tokens": _words(llm, clean),
        "corrupt_tokens": _words(llm, corrupt), "answer": _words(llm, [answer])[0], "wrong": _words(llm, [wrong])[0],
        "metric": "logit[answer] - logit[wrong] at the last position; normalized = (patched - corrupt) / (clean - corrupt)",
    }  # fmt: skip
    for by in ("position", "head") if cfg.by == "both" else (cfg.by,):
        r = patch(
            llm.model,
            clean,
            corrupt,
            metric,
            by=by,
            stream=cfg.stream,
            progress=_ticker(progress, f"patch by {by}"),
        )
        result["clean_metric"], result["corrupt_metric"] = r.clean_metric, r.corrupt_metric
        result[f"by_{by}"] = {
            "hook": r.hook,
            "values": r.values.tolist(),
            "normalized": r.normalized.tolist(),
        }
    return _finish("patch", cfg, result)


def run_attribute(cfg: AttributeConfig, progress: Any = None) -> dict[str, Any]:
    _check_prompt(cfg.prompt, "prompt")
    if cfg.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {cfg.steps}")
    llm, info = _load(cfg, progress)
    ids = encode(llm.tokenizer, cfg.prompt)
    target = token_id(llm, cfg.target, "target") if cfg.target else predicted(llm, ids)
    contrast = token_id(llm, cfg.contrast, "contrast") if cfg.contrast else None
    dla = direct_logit_attribution(llm.model, ids, target, contrast=contrast)
    ig = integrated_gradients(llm.model, ids, target, contrast=contrast, steps=cfg.steps)
    result = {
        **info, "kind": "attribute", "prompt": cfg.prompt, "tokens": _words(llm, ids),
        "target": _words(llm, [target])[0], "contrast": _words(llm, [contrast])[0] if contrast is not None else None,
        "logit": dla.logit,
        "direct": {"embed": dla.embed, "attn": dla.attn.tolist(), "mlp": dla.mlp.tolist(), "heads": dla.heads.tolist(),
                   "bias": dla.bias, "total": dla.total(),
                   "method": "final norm scale frozen at its value on the real stream (exact decomposition)"},
        "integrated_gradients": {"scores": ig.scores.tolist(), "steps": cfg.steps, "baseline": "mean token embedding",
                                 "output": ig.output, "baseline_output": ig.baseline_output,
                                 "completeness_error": ig.completeness_error, "quadrature": "Gauss-Legendre"},
    }  # fmt: skip
    return _finish("attribute", cfg, result)


def run_attention(cfg: AttentionConfig, progress: Any = None) -> dict[str, Any]:
    _check_prompt(cfg.prompt, "prompt")
    llm, info = _load(cfg, progress)
    ids = encode(llm.tokenizer, cfg.prompt)
    patterns = attention_patterns(llm.model, ids)
    result = {**info, "kind": "attention", "prompt": cfg.prompt, "tokens": _words(llm, ids),
              "patterns": [[[[round(float(v), 5) for v in row] for row in head] for head in layer] for layer in patterns]}  # fmt: skip
    return _finish("attention", cfg, result)


def read_prompt_set(spec: str, split: SplitOptions, limit: int | None, flag: str) -> list[str]:
    """Prompts from builtin:NAME, a pack file or folder (the probes' user prompts), or a .txt file."""
    path = Path(spec)
    if path.suffix == ".txt":
        if not path.is_file():
            raise UsageError(f"--{flag} {spec}: no such file")
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise UsageError(f"--{flag} {spec}: larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        probes = [p for p in load_packs([spec]) if p.transform == "none"]
        prompts = [p.prompt_text() for p in select_split(probes, split.split, split.heldout_fraction)]
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise InspectError(
            f"--{flag} {spec} gives no prompts (split {split.split!r}); give a set with at least one"
        )
    return prompts


def run_direction(cfg: DirectionConfig, progress: Any = None) -> dict[str, Any]:
    if not cfg.out.endswith(".safetensors"):
        raise UsageError(f"--out {cfg.out}: a direction file ends in .safetensors")
    sets = {}
    for flag in ("positive", "negative"):
        specs = getattr(cfg, flag)
        if not specs:
            raise InspectError(f"--{flag} is empty; give builtin:NAME, a pack or a .txt file")
        sets[flag] = [p for spec in specs for p in read_prompt_set(spec, cfg.probe_split, cfg.limit, flag)]
    if cfg.selection.select and cfg.layer is not None:
        raise UsageError("give --layer or --select, not both: --select chooses the layer")
    llm, info = _load(cfg, progress)
    check_layer(cfg.layer, len(llm.model.model.layers))
    if cfg.selection.select:
        return _finish_direction(cfg, info, *_selected(cfg, llm, sets, progress))
    tick = _ticker(progress, "prompts")
    n = len(sets["positive"]) + len(sets["negative"])
    done = [0]

    def count(i: int, total: int) -> None:  # one tick over both sets
        done[0] += 1
        if tick is not None:
            tick(done[0], n)

    direction = difference_of_means(
        llm.model, llm.tokenizer, sets["positive"], sets["negative"], chat=not cfg.raw, layer=cfg.layer,
        progress=count,
    )  # fmt: skip
    return _finish_direction(cfg, info, direction, None)


def _selected(cfg: DirectionConfig, llm: LLM, sets: dict[str, list[str]], progress: Any) -> tuple[Any, dict]:
    """The direction chosen on validation prompts (selection.py), and its report."""
    fraction = cfg.selection.validation_fraction
    (harmful_fit, harmful_val), (harmless_fit, harmless_val) = (
        validation_split(sets[k], fraction) for k in ("positive", "negative")
    )
    prompts = PromptSets(harmful_fit, harmless_fit, harmful_val, harmless_val)
    chosen = select_direction(
        llm.model, llm.tokenizer, prompts, cfg.selection, chat=not cfg.raw,
        progress=_ticker(progress, "candidates"),
    )  # fmt: skip
    chosen.direction.meta.update(
        positive_count=str(len(harmful_fit)), negative_count=str(len(harmless_fit)),
        positive_sha256=prompts_digest(harmful_fit), negative_sha256=prompts_digest(harmless_fit),
        chat_template=str(not cfg.raw and bool(llm.tokenizer.chat_template)).lower(),
    )  # fmt: skip
    if cfg.addition.add_select:
        chosen.report["addition"] = _addition(cfg, llm, chosen, progress)
    return chosen.direction, chosen.report


def _addition(cfg: DirectionConfig, llm: LLM, chosen: Any, progress: Any) -> dict[str, Any]:
    """The addition chosen by generation (addition.py), judged by the red team's refusal
    patterns; stored in the direction file. A model that never refuses: the reason, no addition."""
    from weightsmith.safety.detectors import RefusalPatterns

    patterns = RefusalPatterns()
    try:
        report = select_addition(
            llm.engine, chosen.vectors, chosen.positions, chosen.layers, chosen.rows,
            lambda text: patterns.match(text) is not None, cfg.addition, _ticker(progress, "addition screen"),
            _ticker(progress, "addition trials"),
        )  # fmt: skip
    except NoRefusals as e:
        return {"skipped": str(e)}
    pick = report["chosen"]
    chosen.direction.add_vectors = chosen.vectors[chosen.positions.index(pick["position"])].clone()
    chosen.direction.meta["recommended_add"] = json.dumps(pick)
    chosen.direction.meta["addition"] = json.dumps(report, separators=(",", ":"))
    return report


def _finish_direction(
    cfg: DirectionConfig, info: dict, direction: Any, selection: dict | None
) -> dict[str, Any]:
    provenance = {
        "model": info["model"], "model_sha256": info["model_sha256"], "weightsmith": __version__,
        "positive": ",".join(cfg.positive), "negative": ",".join(cfg.negative),
        "split": cfg.probe_split.split, "heldout_fraction": str(cfg.probe_split.heldout_fraction),
    }  # fmt: skip
    meta = write_direction(Path(cfg.out), direction, provenance)
    norms = direction.vectors.norm(dim=-1).tolist()
    result = {
        **info,
        "kind": "direction",
        "out": cfg.out,
        "layer": direction.layer,
        "norms": norms,
        "metadata": meta,
    }
    if selection is not None:
        result["selection"] = selection
    return result
