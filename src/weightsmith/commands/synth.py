"""The synth commands: synthetic training data from a model in this process or an endpoint.

`synth self-instruct | evolve | grounded | answer` each read and check their inputs (seed file,
data file, documents, prompts, templates, decontamination tasks) before any model loads, then
run the recipe step by step (synth.pipeline), then write OUT/{train,validation}.jsonl,
funnel.json, lineage.json and report.html. OUT/config.yaml holds the settings; rerunning the
same command continues OUT from its last finished step (OUT/work/), another command there is
refused unless `--overwrite`.

Not here: the recipes, filters and files (weightsmith.synth), the HTML (report.synth_report),
progress lines (cli.synth).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith import __version__
from weightsmith.commands.loading import DEFAULT_MODEL, load_model, load_status
from weightsmith.config import config_to_dict, dump_config_yaml, opt, read_yaml
from weightsmith.endpoints import is_endpoint, split_endpoint
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.lineage import write_lineage

#: What a synth run writes in OUT (all that --overwrite removes).
OUTPUTS = ("config.yaml", "train.jsonl", "validation.jsonl", "funnel.json", "lineage.json", "report.html")


@dataclass(kw_only=True)
class SynthOptions:
    """Settings every recipe shares."""

    model: str = opt(
        DEFAULT_MODEL, "generating model (name, HF directory, .gguf) or endpoint http://host:8000/v1#MODEL"
    )
    random_seed: int = opt(0, "seed of every sampled request and choice (same seed, same data)")
    temperature: float = opt(0.7, "sampling temperature (0: greedy)")
    top_p: float = opt(0.95, "nucleus sampling mass")
    max_tokens: int = opt(256, "most tokens per generated answer")
    batch_size: int = opt(32, "requests generated together (in process) or proposed per step")
    stop: list[str] = opt(
        default_factory=list, help="stop a reply when this text appears (repeatable)", split=False
    )
    concurrency: int = opt(8, "requests in flight to each endpoint")
    timeout: float = opt(120.0, "seconds an endpoint request may take")
    api_key_env: str = opt("WEIGHTSMITH_API_KEY", "environment variable holding the endpoints' API key")
    templates: str | None = opt(None, "folder of prompt templates (NAME.txt) replacing the shipped ones")
    judge: str | None = opt(
        None, "judge model or endpoint URL#MODEL: keep examples it scores >= --judge-threshold"
    )
    judge_threshold: int = opt(3, "lowest judge score kept (scale 1-5)")
    decontaminate: list[str] = opt(
        default_factory=lambda: ["builtin"],
        help="eval tasks whose documents must not leak: builtin (every built-in suite), task files, none",
    )
    ngram: int = opt(13, "an example sharing an n-gram of this many words with an eval document is dropped")
    rouge_threshold: float = opt(0.7, "drop instructions with ROUGE-L >= this against one already accepted")
    min_instruction_words: int = opt(3, "fewest words in an instruction")
    max_instruction_words: int = opt(150, "most words in an instruction")
    max_answer_words: int = opt(1000, "most words in an answer")
    answer_pattern: str | None = opt(
        None, "keep only answers this regular expression finds (Python re.search on the stripped answer)"
    )
    valid_fraction: float = opt(0.05, "share of the examples written to validation.jsonl")
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")

    def check(self) -> None:
        for name in ("max_tokens", "batch_size", "concurrency", "ngram", "min_instruction_words"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.rouge_threshold <= 1:
            raise UsageError(f"--rouge-threshold must be in (0, 1], got {self.rouge_threshold}")
        if not 0 <= self.valid_fraction < 1:
            raise UsageError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("--temperature must be 0 or more and --top-p in (0, 1]")
        if not 1 <= self.judge_threshold <= 5:
            raise UsageError(f"--judge-threshold must be 1 to 5, got {self.judge_threshold}")
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise UsageError(
                    f"--answer-pattern {self.answer_pattern!r}: not a regular expression ({e})"
                ) from None


@dataclass(kw_only=True)
class _SynthRun:
    """What every recipe takes: the output folder, the generation and filter options, and how to start."""

    out: str = opt(help="output folder")
    common: SynthOptions = opt(default_factory=SynthOptions, flatten=True)
    overwrite: bool = opt(False, "start afresh when OUT holds a synth run")
    json: bool = opt(False, "print the result as JSON")

    def __post_init__(self) -> None:
        self.common.check()


@dataclass(kw_only=True)
class SelfInstructConfig(_SynthRun):
    """Self-instruct: new instructions from your seed examples and the ones made so far, then answers."""

    seed: str = opt(help="seed examples: JSONL with instruction (or prompt, or chat messages), or .txt lines")
    n: int = opt(100, "examples to keep")
    seed_examples: int = opt(3, "seed instructions shown per request")
    generated_examples: int = opt(2, "instructions made so far shown per request")
    max_steps: int | None = opt(None, "give up after this many steps (default: 10x the steps n needs, +10)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1 or self.seed_examples < 1 or self.generated_examples < 0:
            raise UsageError("--n and --seed-examples must be at least 1, --generated-examples 0 or more")


@dataclass(kw_only=True)
class EvolveConfig(_SynthRun):
    """Evolve: rewrite instructions deeper, broader or more concrete (round after round), then answer them."""

    data: str = opt(help="instructions to evolve: JSONL (instruction, prompt or chat messages) or .txt lines")
    rounds: int = opt(1, "rounds of rewriting; round r rewrites what round r-1 kept")
    operations: list[str] = opt(
        default_factory=lambda: ["deepen", "broaden", "concretise"], help="rewrites to choose from per item"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from weightsmith.synth.recipes import check_operations

        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        check_operations(self.operations)


@dataclass(kw_only=True)
class GroundedConfig(_SynthRun):
    """Grounded Q&A: questions about chunks of your documents (.txt, .md, .jsonl), answered from each chunk."""

    docs: str = opt(
        help='folder (or file) of .txt, .md and .jsonl documents (JSONL: a "text" field per line)'
    )
    questions_per_chunk: int = opt(2, "questions asked per chunk")
    chunk_tokens: int = opt(256, "tokens per chunk (the model's tokens; words for an endpoint)")
    overlap: int = opt(32, "tokens a chunk shares with the one before")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.questions_per_chunk < 1 or self.chunk_tokens < 1 or not 0 <= self.overlap < self.chunk_tokens:
            raise UsageError(
                "--questions-per-chunk and --chunk-tokens must be at least 1, --overlap in [0, chunk-tokens)"
            )


@dataclass(kw_only=True)
class AnswerConfig(_SynthRun):
    """Answer: distil a teacher's answers to your prompts."""

    prompts: str = opt(help="prompts: JSONL (prompt, instruction or chat messages) or .txt, one per line")


def _start(cfg: Any, out: Path) -> None:
    """Write config.yaml, or check OUT's run has these settings; --overwrite clears OUT's run."""
    saved = out / "config.yaml"
    now = json.loads(json.dumps(config_to_dict(cfg)))
    if saved.exists() and not cfg.overwrite:
        try:
            before = json.loads(json.dumps(read_yaml(saved)))
        except WeightsmithError:
            before = {}
        a, b = _leaves(now), _leaves(before)
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            raise UsageError(
                f"{out} holds a synth run with other settings ({', '.join(differ)}); "
                "use another --out, or --overwrite to start afresh"
            )
        return
    if out.exists() and cfg.overwrite:
        shutil.rmtree(out / "work", ignore_errors=True)
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dump_config_yaml(cfg, saved)


def _leaves(data: dict, skip: tuple[str, ...] = ("json", "overwrite")) -> dict[str, Any]:
    """Settings by flag name (flattened groups' fields under their own names)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, skip))
        elif key not in skip:
            out[key.replace("_", "-")] = value
    return out


def run_self_instruct(cfg: SelfInstructConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.synth.recipes import SelfInstruct, read_prompt_rows

    seeds = read_prompt_rows(Path(cfg.seed), "--seed")
    c = cfg.common

    def recipe(prompts: Any, llm: Any) -> Any:
        return SelfInstruct(seeds, prompts, n=cfg.n, batch=c.batch_size, seed=c.random_seed,
                            seed_examples=cfg.seed_examples, generated_examples=cfg.generated_examples,
                            max_steps=cfg.max_steps)  # fmt: skip

    return _run(
        cfg,
        ("self_instruct", "answer"),
        recipe,
        [Path(cfg.seed)],
        [r["instruction"] for r in seeds],
        progress,
    )


def run_evolve(cfg: EvolveConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.synth.recipes import Evolve, read_prompt_rows

    rows = read_prompt_rows(Path(cfg.data), "--data")
    c = cfg.common
    names = tuple(f"evolve_{op}" for op in dict.fromkeys(cfg.operations)) + ("answer",)

    def recipe(prompts: Any, llm: Any) -> Any:
        return Evolve(rows, prompts, rounds=cfg.rounds, operations=cfg.operations, batch=c.batch_size,
                      seed=c.random_seed)  # fmt: skip

    return _run(cfg, names, recipe, [Path(cfg.data)], [r["instruction"] for r in rows], progress)


def run_answer(cfg: AnswerConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.synth.recipes import Answer, read_prompt_rows

    rows = read_prompt_rows(Path(cfg.prompts), "--prompts")

    def recipe(prompts: Any, llm: Any) -> Any:
        return Answer(rows, prompts, batch=cfg.common.batch_size)

    return _run(cfg, ("answer",), recipe, [Path(cfg.prompts)], [r["instruction"] for r in rows], progress)


def run_grounded(cfg: GroundedConfig, progress: Any = None) -> dict[str, Any]:
    from weightsmith.synth.docs import chunk_text, read_docs, tokenizer_spans, word_spans
    from weightsmith.synth.recipes import Grounded

    docs = read_docs(Path(cfg.docs))
    if not docs.texts:
        why = (
            "; ".join(f"{s['file']}: {s['reason']}" for s in docs.skipped[:3])
            or "no .txt, .md or .jsonl files"
        )
        raise UsageError(f"--docs {cfg.docs}: no readable document ({why})")
    files = sorted(
        {Path(cfg.docs) / t.file for t in docs.texts} if Path(cfg.docs).is_dir() else {Path(cfg.docs)}
    )

    def recipe(prompts: Any, llm: Any) -> Any:
        spans = word_spans if llm is None else tokenizer_spans(llm.tokenizer)
        chunks = [ch for t in docs.texts for ch in chunk_text(t, spans, cfg.chunk_tokens, cfg.overlap)]
        return Grounded(chunks, prompts, questions=cfg.questions_per_chunk, batch=cfg.common.batch_size)

    extra = {"skipped_documents": docs.skipped, "documents": {"files": docs.files, "texts": len(docs.texts)}}
    return _run(cfg, ("grounded_question", "grounded_answer"), recipe, files, [t.text for t in docs.texts], progress,
                extra)  # fmt: skip


def _run(cfg: Any, templates: tuple[str, ...], make_recipe: Callable[[Any, Any], Any], inputs: list[Path],
         reference: list[str], progress: Any, extra: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything checked, then the model, then the steps, then the files."""
    from weightsmith.synth.filters import Limits, load_contamination
    from weightsmith.synth.pipeline import Pipeline, rebuild_index
    from weightsmith.synth.prompts import load_prompts
    from weightsmith.synth.store import WorkStore

    c: SynthOptions = cfg.common
    prompts = load_prompts(c.templates, templates + (("judge",) if c.judge else ()))
    contamination = load_contamination(c.decontaminate, c.ngram)
    judge_cfg = _judge_config(c, prompts)
    out = Path(cfg.out)
    _start(cfg, out)
    store = WorkStore(out)
    generator, llm = _generator(c, progress)
    recipe = make_recipe(prompts, llm)
    say = getattr(progress, "line", None) or (lambda text: None)
    say(f"{recipe.name}: {generator.identity.get('model')} -> {out} (step {store.state.step + 1})")
    pipeline = Pipeline(
        recipe, generator, Limits(c.min_instruction_words, c.max_instruction_words, 1, c.max_answer_words,
                                  re.compile(c.answer_pattern) if c.answer_pattern is not None else None),
        rebuild_index(c.rouge_threshold, reference, recipe, store), contamination, c.random_seed,
        judge=_judge(c, judge_cfg, llm, progress), progress=getattr(progress, "step", None),
    )  # fmt: skip
    pipeline.run(store)
    return _finish(cfg, out, store, recipe, generator, pipeline, prompts, inputs, contamination, extra or {})


def _generator(c: SynthOptions, progress: Any) -> tuple[Any, Any]:
    from weightsmith.synth.generation import Sampling, make_generator

    loaded: dict[str, Any] = {}

    def load(spec: str) -> Any:
        loaded["llm"] = load_model(spec, device=c.device, dtype=c.dtype, progress=load_status(progress))
        return loaded["llm"]

    sampling = Sampling(c.temperature, c.top_p, c.max_tokens, tuple(c.stop))
    gen = make_generator(c.model, sampling, load=load, batch_size=c.batch_size, concurrency=c.concurrency,
                         timeout=c.timeout, api_key=os.environ.get(c.api_key_env) or None)  # fmt: skip
    return gen, loaded.get("llm")


def _judge_config(c: SynthOptions, prompts: Any) -> Any:
    if c.judge is None:
        return None
    from weightsmith.eval.judge import JudgeConfig

    return JudgeConfig(model=c.judge, rubric=prompts.texts["judge"], scale=(1, 5), pass_threshold=c.judge_threshold,
                       max_tokens=32, source=str(prompts.files["judge"]))  # fmt: skip


def _judge(c: SynthOptions, judge_cfg: Any, llm: Any, progress: Any) -> Any:
    if judge_cfg is None:
        return None
    from weightsmith.synth.generation import LocalGenerator, Sampling, make_generator
    from weightsmith.synth.pipeline import Judge

    greedy = Sampling(0.0, 1.0, judge_cfg.max_tokens)
    if llm is not None and not is_endpoint(c.judge) and c.judge == c.model:
        return Judge(LocalGenerator(llm, greedy, batch_size=c.batch_size), judge_cfg)
    if is_endpoint(c.judge):
        split_endpoint(c.judge, "--judge")
    gen = make_generator(
        c.judge, greedy, load=lambda spec: load_model(spec, device=c.device, dtype=c.dtype, progress=load_status(progress)),
        batch_size=c.batch_size, concurrency=c.concurrency, timeout=c.timeout,
        api_key=os.environ.get(c.api_key_env) or None,
    )  # fmt: skip
    return Judge(gen, judge_cfg)


def _finish(cfg: Any, out: Path, store: Any, recipe: Any, generator: Any, pipeline: Any, prompts: Any,
            inputs: list[Path], contamination: Any, extra: dict) -> dict[str, Any]:  # fmt: skip
    from weightsmith.report.synth_report import write_synth_report
    from weightsmith.synth.output import funnel, sha256_file, write_outputs

    c: SynthOptions = cfg.common
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in ("json", "overwrite")}
    lineage = {
        "weightsmith": __version__,
        "recipe": recipe.name,
        "model": generator.identity,
        "judge": None if pipeline.judge is None else {**pipeline.judge.generator.identity, "threshold": c.judge_threshold},
        "seed": c.random_seed,
        "parameters": settings,
        "prompts": prompts.hashes(),
        "inputs": [{"file": str(p), "sha256": sha256_file(p)} for p in inputs],
        "decontamination": {"ngram": c.ngram, "ngrams": len(contamination), "tasks": contamination.tasks},
    }  # fmt: skip
    funnel_data = funnel(store.state.funnel, extra.get("skipped_documents"))
    written = write_outputs(out, store.kept, c.valid_fraction, funnel_data)
    result = {"recipe": recipe.name, "out": str(out), "funnel": {**funnel_data, "train": written["train"]["examples"],
              "validation": written["validation"]["examples"]}, "lineage": lineage, **extra}  # fmt: skip
    write_synth_report(out / "report.html", result, store.kept, store.dropped)
    write_lineage(
        out, kind="synth", config=cfg, details=lineage, exclude=("work",),
        device="endpoint" if is_endpoint(c.model) else c.device,
        inputs={"model": c.model, "inputs": [str(p) for p in inputs]},
        metrics={"train": written["train"]["examples"], "validation": written["validation"]["examples"]},
    )  # fmt: skip
    result["written"] = {**written, "report": str(out / "report.html"), "lineage": str(out / "lineage.json")}
    return result
