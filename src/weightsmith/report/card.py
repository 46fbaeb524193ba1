"""A Hugging Face model card (README.md) from an artifact's lineage and result files.

`render_card(facts)` returns (the card's text, its metadata). The YAML front matter is made by
huggingface_hub's own `ModelCardData` (license, base_model, tags, datasets, pipeline_tag,
library_name, and a `model-index` holding the eval results), so the Hub reads what it wrote.
The body has a section each for training data and method, evaluation (every value with its
interval and method), red-team attack success and over-refusal, the bias audit, limitations
and the lineage. Every number comes from `facts`, which the card command read from files.

Not here: finding and checking the files (`weightsmith.commands.card`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith.report.interval_names import method_line

#: Lineage kinds that change weights, as words for the card's summary line.
SHAPING = {"finetune": "fine-tuned", "distill": "distilled from a teacher", "dpo": "aligned with DPO",
           "kto": "aligned with KTO", "reward": "trained as a reward model", "grpo": "reinforced with GRPO",
           "merge": "merged", "quantize": "quantized", "export": "exported"}  # fmt: skip


@dataclass
class CardFacts:
    """What the card says: the artifact, its checked lineage tree and the result files' data."""

    name: str
    artifact: Path
    lineage: dict[str, Any] | None
    eval: dict[str, Any] | None
    redteam: dict[str, Any] | None
    bias: dict[str, Any] | None
    license: str | None


def _nodes(tree: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every artifact of the lineage tree, the artifact itself first (each once)."""
    out, todo, seen = [], [tree] if tree else [], set()
    while todo:
        node = todo.pop(0)
        if node.get("id") in seen or "inputs" not in node:
            continue
        seen.add(node["id"])
        out.append(node)
        todo += [i["parent"] for i in node["inputs"] if i.get("parent")]
    return out


def _leaves(nodes: list[dict[str, Any]], roles: tuple[str, ...]) -> list[dict[str, Any]]:
    """Inputs of these roles that no recorded artifact produced (the base weights, the user's data)."""
    found: dict[str, dict[str, Any]] = {}
    for node in nodes:
        for entry in node["inputs"]:
            if entry["role"] in roles and not entry.get("parent"):
                found.setdefault(str(entry.get("sha256") or entry.get("spec")), entry)
    return list(found.values())


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(low: Any, high: Any, scale: float = 100.0, unit: str = "%") -> str:
    if low is None or high is None:
        return "–"
    return f"[{scale * low:.1f}, {scale * high:.1f}]{unit}" if unit else f"[{low:.4g}, {high:.4g}]"


def _metadata(facts: CardFacts, nodes: list[dict[str, Any]], records: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    bases = _leaves(nodes, ("model",))
    base = bases[0] if bases else None
    model = (base or {}).get("model_facts") or {}
    license_id = facts.license or (model.get("license") or "").lower() or None
    results = [
        EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                   metric_value=value, metric_name=f"{metric} ({filt})")
        for (task, metric, filt), value in records.items()
    ]  # fmt: skip
    artifact = facts.artifact
    library = "peft" if (artifact / "adapter_config.json").is_file() else "transformers"
    if artifact.suffix == ".gguf":
        library = "gguf"
    return ModelCardData(
        model_name=facts.name,
        license=license_id or "other",
        license_name=None if license_id else "unknown",
        base_model=model.get("hf_repo") or (Path(str(base["spec"])).name if base else None),
        datasets=[Path(str(d["spec"])).name for d in _leaves(nodes, ("data", "valid"))] or None,
        tags=["weightsmith", *sorted({n["kind"] for n in nodes})],
        pipeline_tag="text-generation",
        library_name=library,
        eval_results=results or None,
    )


def eval_records(run: dict[str, Any] | None) -> dict[tuple[str, str, str], float]:
    """(task, metric, filter) -> value of every numeric metric in a results.json (not stderrs)."""
    out: dict[tuple[str, str, str], float] = {}
    for task, values in ((run or {}).get("results") or {}).items():
        for key, value in values.items():
            if "stderr" in key or "," not in key or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                metric, filt = key.split(",", 1)
                out[(task, metric, filt)] = value
    return out


#: Training metrics a card names (the record keeps them all: timings, learning rate, ...).
HEADLINE = ("steps", "loss", "val_loss", "val_ppl", "reward_accuracy", "reward_margin", "val_reward_accuracy",
            "reward", "val_reward", "val_kd", "val_nll", "val_teacher_nll")  # fmt: skip


def _settings(config: dict[str, Any]) -> str:
    """The training settings a reader needs to redo a run: loop and LoRA, as recorded."""
    train, lora = config.get("train") or {}, config.get("lora") or {}
    keys = [("lr", train), ("epochs", train), ("max_steps", train), ("batch_size", train), ("seed", train),
            ("loss", config), ("beta", config), ("reward", config), ("num_generations", config),
            ("teacher", config), ("kd_ratio", config), ("on_policy", config)]  # fmt: skip
    parts = [f"{k} {' + '.join(map(str, d[k])) if isinstance(d[k], list) else d[k]}" for k, d in keys
             if d.get(k) is not None]  # fmt: skip
    if config.get("method") in ("lora", "qlora") and lora:
        kind = "DoRA" if lora.get("dora") else "LoRA"
        parts.append(f"{kind} rank {lora.get('rank')}, alpha {lora.get('alpha')}")
    return f" ({', '.join(parts)})" if parts else ""


def _training(nodes: list[dict[str, Any]]) -> str:
    steps = [n for n in reversed(nodes) if n["kind"] in SHAPING]
    if not steps:
        return "No training run is recorded in this artifact's lineage.\n"
    lines = []
    for n in steps:
        data = [i for i in n["inputs"] if i["role"] in ("data", "valid")]
        what = ", ".join(f"`{i['spec']}` (sha256 `{str(i.get('sha256'))[:12]}`)" for i in data)
        metrics = ", ".join(
            f"{k} {v:.4g}" for k, v in n["metrics"].items() if k in HEADLINE and isinstance(v, (int, float))
        )
        config = n.get("config") or {}
        method = f" ({config['method']})" if config.get("method") else ""
        if n["kind"] == "merge":
            method = _merge_words(n, config)
        lines.append(f"- **{n['kind']}**{method}" + (f" on {what}" if what else "") + _settings(config) +
                     (f"; final {metrics}" if metrics else "") + f" — lineage id `{n['id'][:12]}`")  # fmt: skip
    return "\n".join(lines) + "\n"


def _merge_words(node: dict[str, Any], config: dict[str, Any]) -> str:
    """How a merge was made: an adapter folded in, or which forks by which method and settings."""
    forks = [f"`{i['spec']}`" for i in node["inputs"] if i["role"] == "forks"]
    if not forks:
        return " (an adapter folded into the model)"
    keys = ["weights", "density", "t", "scale", "normalize", "rank"]
    if "dare" in str(config.get("method")):
        keys.append("seed")
    unset = (None, [], "auto", 1.0)
    shown = [f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k in keys
             if (v := config.get(k)) not in unset]  # fmt: skip
    written = " as a LoRA adapter" if config.get("as_adapter") else ""
    settings = f"; {'; '.join(shown)}" if shown else ""
    return f" ({config.get('method')} of {', '.join(forks)}{written}{settings})"


def _evaluation(run: dict[str, Any] | None) -> str:
    if run is None:
        return "No evaluation was given (`weightsmith card --eval DIR`).\n"
    meta = run.get("weightsmith", {})
    rows = [
        "| task | metric | value | 95% interval | documents | interval method |",
        "|---|---|---|---|---|---|",
    ]
    for (task, metric, filt), value in eval_records(run).items():
        ci = run.get("intervals", {}).get(f"{task}/{metric},{filt}")
        interval = _ci(ci["ci_low"], ci["ci_high"], 1.0, "") if ci else "–"
        n = ci["n"] if ci else (run.get("n-samples", {}).get(task) or {}).get("effective", "–")
        rows.append(f"| {task} | {metric} ({filt}) | {value:.4g} | {interval} | {n} | {method_line(ci)} |")
    head = (f"Evaluated model: `{meta.get('label')}` (weights sha256 `{str(meta.get('model_hash'))[:12]}`, "
            f"{meta.get('device')}, weightsmith {meta.get('version')}).\n\n")  # fmt: skip
    return head + "\n".join(rows) + "\n"


def _redteam(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "No red-team run was given (`weightsmith card --redteam DIR`).\n"
    probes = summary.get("probes", {})
    rows = ["| configuration | guard | attack success | 95% interval | over-refusal | 95% interval |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for c in summary.get("configs", []):
        asr, ref = c.get("asr") or {}, c.get("over_refusal") or {}
        rows.append(
            f"| {c.get('config')} | {c.get('guard') or '–'} | {_pct(asr.get('rate'))} ({asr.get('k')}/{asr.get('n')}) "
            f"| {_ci(asr.get('ci_low'), asr.get('ci_high'))} | {_pct(ref.get('rate'))} ({ref.get('k')}/{ref.get('n')}) "
            f"| {_ci(ref.get('ci_low'), ref.get('ci_high'))} |"
        )
    head = (f"{probes.get('attack')} attack probes ({', '.join(probes.get('transforms', []))}) and "
            f"{probes.get('benign')} benign probes from packs {', '.join(probes.get('packs', []))}; "
            f"detectors: {', '.join(map(str, summary.get('detectors') or []))}; intervals: "
            f"{method_line(summary.get('interval'))}.\n\n")  # fmt: skip
    return head + "\n".join(rows) + "\n"


def _bias(results: dict[str, Any] | None) -> str:
    if results is None:
        return "No bias audit was given (`weightsmith card --bias DIR`).\n"
    parts = []
    rows = [
        "| task | lexicon | affected documents | flip rate | largest gap | 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for s in results.get("counterfactual", []):
        gap = s.get("max_gap") or {}
        ci = gap.get("ci") or [None, None]
        size = f"{gap['gap']:.4g} ({' vs '.join(gap.get('groups', []))})" if "gap" in gap else "–"
        rows.append(f"| {s['task']} | {s['lexicon']} | {s.get('n_affected')}/{s.get('n_docs')} | "
                    f"{_pct(s.get('flip_rate'))} | {size} | {_ci(ci[0], ci[1], 1.0, '')} |")  # fmt: skip
    if len(rows) > 2:
        parts.append("Counterfactual swaps of group terms in the task prompts:\n\n" + "\n".join(rows) + "\n")
    pairs = results.get("pairs")
    if pairs:
        ci = pairs.get("pct_stereotype_ci") or [None, None]
        parts.append(
            f"Stereotype pairs: the model prefers the stereotyped sentence in {_pct(pairs.get('pct_stereotype'))} "
            f"of {pairs.get('n')} pairs, {method_line(pairs.get('interval'))} interval {_ci(ci[0], ci[1])} "
            "(50% is no preference).\n"
        )
    return "\n".join(parts) or "The audit holds no results.\n"


def _limitations(facts: CardFacts, nodes: list[dict[str, Any]], base_license: bool) -> str:
    lines = ["- It inherits the limitations and biases of its base model and of its training data."]
    docs = [ci["n"] for ci in ((facts.eval or {}).get("intervals") or {}).values()]
    if docs:
        lines.append(
            f"- Evaluated on at most {max(docs)} documents per task: read the intervals, not only the values."
        )
    if facts.redteam is not None:
        n = facts.redteam.get("probes", {})
        lines.append(
            f"- Red-teamed with {n.get('attack')} attack probes only; an attack not in the packs is untested."
        )
    if not base_license:
        lines.append("- The base model's license is not recorded: check it before you publish this model.")
    if facts.lineage is None:
        lines.append("- No lineage record: where these weights came from cannot be checked.")
    elif facts.lineage["problems"]:
        lines.append(f"- Its lineage check found {len(facts.lineage['problems'])} problem(s) (below).")
    return "\n".join(lines) + "\n"


def _lineage_text(lineage: dict[str, Any] | None) -> str:
    if lineage is None:
        return "This artifact has no lineage record.\n"
    out = []

    def walk(node: dict[str, Any], depth: int) -> None:
        pad = "  " * depth
        out.append(f"{pad}{node['kind']} {node['id'][:12]}  {node.get('artifact', '')}")
        for i in node.get("inputs", []):
            out.append(
                f"{pad}  <- {i['role']}: {i.get('spec')}  sha256 {str(i.get('sha256'))[:12]}  {i['status']}"
            )
            if i.get("parent") and "inputs" in i["parent"]:
                walk(i["parent"], depth + 2)

    walk(lineage["tree"], 0)
    problems = (
        "".join(f"- {p}\n" for p in lineage["problems"])
        or "Every recorded hash matched when this card was written.\n"
    )
    return "```\n" + "\n".join(out) + "\n```\n\n" + problems


def render_card(facts: CardFacts) -> tuple[str, dict[str, Any]]:
    """(the card's text, its metadata as a dict)."""
    nodes = _nodes((facts.lineage or {}).get("tree"))
    data = _metadata(facts, nodes, eval_records(facts.eval))
    kinds = [SHAPING[n["kind"]] for n in reversed(nodes) if n["kind"] in SHAPING]
    summary = (
        f"`{facts.name}` was made with weightsmith" + (f": {', then '.join(kinds)}" if kinds else "") + "."
    )
    base = f" Base model: `{data.base_model}`." if data.base_model else ""
    body = "\n".join([
        f"# {facts.name}\n", summary + base + "\n",
        "## Training data and method\n", _training(nodes),
        "## Evaluation\n", _evaluation(facts.eval),
        "## Red-team and over-refusal\n", _redteam(facts.redteam),
        "## Bias audit\n", _bias(facts.bias),
        "## Limitations\n", _limitations(facts, nodes, data.license != "other"),
        "## Lineage\n", _lineage_text(facts.lineage),
    ])  # fmt: skip
    return f"---\n{data.to_yaml()}\n---\n\n{body}", data.to_dict()
