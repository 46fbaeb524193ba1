"""The `weightsmith` command: parse arguments, call a command's run function, print.

Errors a user can cause become one line on stderr and exit status 1 (2 for usage
errors); `--debug` shows the traceback instead. `COMMANDS` is the whole command line:
each entry names its config class, its run function (`weightsmith.commands`), its
printer and how it shows progress; `dispatch` looks a command up there. Entries name
their configs and run functions by `Ref`, and the parser gives only the command named on the
command line its options, so a command imports its own modules alone (`--help`, `models`
and the arena's ratings start without torch).

Not here: what commands do (`weightsmith.commands`), how each prints (the other `cli`
modules), flags from config fields (`cli/args.py`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from weightsmith import __version__
from weightsmith.cli import arena as arena_out
from weightsmith.cli import arena_serve as arena_serve_out
from weightsmith.cli import audit as audit_out
from weightsmith.cli import eval as eval_out
from weightsmith.cli import export as export_out
from weightsmith.cli import guard as guard_out
from weightsmith.cli import inspect as inspect_out
from weightsmith.cli import lineage as lineage_out
from weightsmith.cli import quantize as quantize_out
from weightsmith.cli import redteam as redteam_out
from weightsmith.cli import serve as serve_out
from weightsmith.cli import store as store_out
from weightsmith.cli import synth as synth_out
from weightsmith.cli.args import add_config_arguments, config_from_args
from weightsmith.cli.command import Command, Group, Ref, Show
from weightsmith.cli.loading import with_loading
from weightsmith.errors import WeightsmithError
from weightsmith.lineage import note_command_line


def _plain(printer: Callable[[Any, Console], None]) -> Show:
    """A printer that needs only the result."""
    return lambda result, console, cfg: printer(result, console)


def _stream_text(cfg: Any) -> Callable[[str], None] | None:
    """Where generate streams its text: stdout, unless --json (then the whole result at the end)."""
    out = sys.stdout
    return None if cfg.json else (lambda s: (out.write(s), out.flush()))


def _bars(cfg: Any) -> Any:
    return None if cfg.json else eval_out.ProgressBars(eval_out.stderr_console())


def _probe_lines(cfg: Any) -> Any:
    return None if cfg.json else redteam_out.progress_lines(redteam_out.stderr_console())


def _synth(config: type, run: Callable[[Any, Any], Any], help: str, example: str) -> Command:
    return Command(config, help, example, run, _plain(synth_out.print_synth), synth_out.make_progress)


def _training(name: str, help: str, example: str) -> Command:
    """A training command: `weightsmith.commands.train`'s NameConfig and run_name, a progress bar."""
    config, run = f"{name.capitalize()}Config", f"run_{name}"
    return Command(
        Ref(f"weightsmith.commands.train:{config}"), help, example, Ref(f"weightsmith.commands.train:{run}"),
        _plain(Ref("weightsmith.cli.train:print_finetune")), lambda cfg: Ref("weightsmith.cli.train:make_reporter")(),
    )  # fmt: skip


def _listening(cfg: Any) -> Callable[[str, Any], None]:
    return lambda url, state: serve_out.print_listening(url, state, sys.stderr)


#: Every command, in the order `--help` lists them.
COMMANDS: dict[str, Command | Group] = {
    "pull": Command(
        Ref("weightsmith.commands.store:PullConfig"),
        "fetch a model into the store",
        "weightsmith pull smollm2-135m-instruct\n"
        "  weightsmith pull HuggingFaceTB/SmolLM2-135M-Instruct     # online only\n"
        "  weightsmith pull ./my-checkpoint --name mine             # register a local HF dir or .gguf",
        Ref("weightsmith.commands.store:run_pull"),
        _plain(store_out.print_pull),
    ),
    "models": Command(
        Ref("weightsmith.commands.store:ModelsConfig"),
        "list the models in the store",
        "weightsmith models --json",
        Ref("weightsmith.commands.store:run_models"),
        _plain(store_out.print_models),
    ),
    "rm": Command(
        Ref("weightsmith.commands.store:RmConfig"),
        "remove a model from the store",
        "weightsmith rm mine",
        Ref("weightsmith.commands.store:run_rm"),
        _plain(store_out.print_rm),
    ),  # fmt: skip
    "info": Command(
        Ref("weightsmith.commands.store:InfoConfig"),
        "show a model's family, size, precision, context and chat template",
        "weightsmith info smollm2-135m-instruct --template",
        Ref("weightsmith.commands.store:run_info"),
        lambda result, console, cfg: store_out.print_info(result, console, template=cfg.template),
    ),
    "generate": Command(
        Ref("weightsmith.commands.run:GenerateConfig"),
        "complete a prompt",
        'weightsmith generate smollm2-135m-instruct --prompt "Once upon a time" --temperature 0 --json\n'
        '  echo "Explain LoRA in one sentence." | weightsmith generate smollm2-135m-instruct --chat -n 64',
        Ref("weightsmith.cli.run:generate"),
        lambda result, console, cfg: sys.stdout.write("\n"),
        with_loading(_stream_text),
    ),
    "chat": Command(
        Ref("weightsmith.commands.run:ChatConfig"),
        "chat with a model (streams; /reset, /system TEXT, /exit)",
        "weightsmith chat smollm2-135m-instruct --system 'You are terse.'",
        Ref("weightsmith.cli.run:chat"),
        None,
        with_loading(),
    ),
    "finetune": _training(
        "finetune",
        "fine-tune on your JSONL data (LoRA, QLoRA or full)",
        "weightsmith finetune smollm2-135m-instruct --data support.jsonl --method lora --out runs/support\n"
        "  weightsmith finetune smollm2-135m-instruct --config finetune.yaml --train.lr 1e-4 --lora.rank 16\n"
        "  weightsmith finetune --resume runs/support          # continue from the latest checkpoint",
    ),
    "distill": _training(
        "distill",
        "distil a teacher model into a student: learn its token distributions on your data (LoRA, QLoRA or full)",
        "weightsmith distill smollm2-135m-instruct --teacher ./SmolLM2-360M-Instruct --data support.jsonl --out runs/kd\n"
        "  weightsmith distill smollm2-135m-instruct --teacher ./big --data chat.jsonl --out runs/gkd --loss jsd --kd-ratio 1\n"
        "  weightsmith distill --resume runs/kd                # continue from the latest checkpoint",
    ),
    "dpo": _training(
        "dpo",
        "align a model with preference pairs (DPO, IPO; LoRA, QLoRA or full)",
        "weightsmith dpo smollm2-135m-instruct --data pairs.jsonl --out runs/aligned --loss dpo --beta 0.1\n"
        "  weightsmith dpo smollm2-135m-instruct --data pairs.jsonl --out runs/full --method full --precompute-ref\n"
        "  weightsmith dpo --resume runs/aligned               # continue from the latest checkpoint",
    ),
    "kto": _training(
        "kto",
        "learn from completions marked good or bad, no pairs needed (KTO; LoRA, QLoRA or full)",
        "weightsmith kto smollm2-135m-instruct --data feedback.jsonl --out runs/kto --beta 0.1\n"
        "  weightsmith kto smollm2-135m-instruct --data feedback.jsonl --out runs/kto --undesirable-weight 1.3\n"
        "  weightsmith kto --resume runs/kto                   # continue from the latest checkpoint",
    ),
    "reward": _training(
        "reward",
        "train a reward model on preference pairs: a score that ranks the chosen answers higher",
        "weightsmith reward smollm2-135m-instruct --data pairs.jsonl --out runs/rm\n"
        "  weightsmith reward smollm2-135m-instruct --data pairs.jsonl --out runs/rm-full --method full\n"
        "  weightsmith reward --resume runs/rm                  # continue from the latest checkpoint",
    ),
    "grpo": _training(
        "grpo",
        "reinforce what a reward checks (GRPO): sample answers, score them, learn from the better ones",
        "weightsmith grpo smollm2-135m-instruct --data math.jsonl --out runs/rl --reward answer --reward length:0.5\n"
        "  weightsmith grpo smollm2-135m-instruct --data prompts.jsonl --out runs/json --reward json --num-generations 4\n"
        "  weightsmith grpo --resume runs/rl                   # continue from the latest checkpoint",
    ),
    "merge": Command(
        Ref("weightsmith.commands.train:MergeConfig"),
        "fold a LoRA adapter into its base model, or merge forks of it (TIES, DARE, SLERP, ...); save an HF directory",
        "weightsmith merge smollm2-135m-instruct --adapter runs/support --out models/support-merged\n"
        "  weightsmith merge smollm2-135m-instruct --fork runs/support --fork runs/aligned --method ties \\\n"
        "      --weights 1,0.5 --density 0.5 --out models/merged",
        Ref("weightsmith.commands.train:run_merge"),
        _plain(Ref("weightsmith.cli.train:print_merge")),
        with_loading(),
    ),
    "eval": Command(
        Ref("weightsmith.commands.eval:EvalConfig"),
        "evaluate a model and its forks on task files; compare and report",
        "weightsmith eval smollm2-135m-instruct --tasks builtin:arith-mc,my_tasks/qa.yaml --limit 200\n"
        "  weightsmith eval smollm2-135m-instruct --adapter runs/support --compare base \\\n"
        "      --tasks builtin:kettlebird-heldout --apply-chat-template --out reports/support",
        Ref("weightsmith.commands.eval:run_eval"),
        _plain(eval_out.print_eval),
        with_loading(_bars),
    ),
    "redteam": Command(
        Ref("weightsmith.commands.redteam:RedteamConfig"),
        "attack a model, its forks and its guard with probe packs; attack success vs over-refusal",
        "weightsmith redteam smollm2-135m-instruct --adapter runs/support --guard builtin:school --out reports/rt\n"
        "  weightsmith redteam http://localhost:8000/v1 --model smollm2-135m-instruct --packs builtin:injection",
        Ref("weightsmith.commands.redteam:run_redteam"),
        _plain(redteam_out.print_redteam),
        with_loading(_probe_lines),
    ),
    "watchdog": Command(
        Ref("weightsmith.commands.watchdog:WatchdogConfig"),
        "red-team a model, DPO a safer fork on what got through, measure it on held-out probes",
        "weightsmith watchdog smollm2-135m-instruct --out runs/watchdog --policy builtin:school\n"
        "  weightsmith watchdog smollm2-135m-instruct --out runs/watchdog --rounds 2 --limit 20 --eval-limit 100",
        Ref("weightsmith.commands.watchdog:run_watchdog"),
        _plain(Ref("weightsmith.cli.watchdog:print_watchdog")),
        Ref("weightsmith.cli.watchdog:make_progress"),
    ),
    "synth": Group(synth_out.HELP, {name: _synth(*spec) for name, *spec in synth_out.SUBCOMMANDS}),
    "guard": Group(
        "check text against a guardrail policy, or test a policy against its own examples",
        {
            "check": Command(
                Ref("weightsmith.commands.guard:GuardCheckConfig"),
                "check one text against a policy's input (or --output) rails",
                'weightsmith guard check builtin:school "how do I make a bomb"\n'
                '  echo "my email is a@b.org" | weightsmith guard check policies/school.yaml --output --json',
                guard_out.check,
                _plain(guard_out.print_guard_check),
            ),
            "test": Command(
                Ref("weightsmith.commands.guard:GuardTestConfig"),
                "run a policy against the examples written in it (exit 1 if any fails)",
                "weightsmith guard test builtin:school\n  weightsmith guard test policies/school.yaml --json",
                Ref("weightsmith.commands.guard:run_guard_test"),
                _plain(guard_out.print_guard_test),
            ),
        },
    ),
    "audit": Group(
        "audit a model for bias",
        {
            "bias": Command(
                Ref("weightsmith.commands.audit:AuditBiasConfig"),
                "counterfactual bias audit over eval tasks, and stereotype-pair likelihoods",
                "weightsmith audit bias smollm2-135m-instruct --tasks builtin:reading-mc --out reports/bias\n"
                "  weightsmith audit bias ./my-model --lexicon builtin:names --pairs none --tasks my_task.yaml",
                Ref("weightsmith.commands.audit:run_audit_bias"),
                _plain(audit_out.print_audit_bias),
                with_loading(_bars),
            ),
        },
    ),
    "arena": Group(
        "compare models side by side: a voting page, LLM-judge votes, Bradley–Terry ratings, preference pairs",
        {
            "serve": Command(
                Ref("weightsmith.commands.arena_serve:ArenaServeConfig"),
                "serve the arena page: two anonymous answers side by side, people vote, names shown after",
                "weightsmith arena serve smollm2-135m-instruct smollm2-135m-instruct:kettlebird http://host:8000/v1#their-model \\\n"
                "      --adapter kettlebird=runs/kettlebird --prompts prompts.jsonl --db arena.sqlite --port 8010\n"
                "  weightsmith arena serve base base:fork --adapter fork=runs/fork --vote-key-file key.txt --host 0.0.0.0",
                Ref("weightsmith.commands.arena_serve:run_arena_serve"),
                arena_serve_out.print_stopped,
                lambda cfg: lambda url, info: arena_serve_out.print_listening(url, info, sys.stderr),
            ),
            "judge": Command(
                Ref("weightsmith.commands.arena_judge:ArenaJudgeConfig"),
                "fill battles with judge votes: an LLM judge in both orders, or rewards scoring each answer",
                "weightsmith arena judge --db arena.sqlite --judge http://localhost:8001/v1#judge --battles 200\n"
                "  weightsmith arena judge --db arena.sqlite --judge smollm2-135m-instruct --battles 20 \\\n"
                "      --contestants smollm2-135m-instruct,smollm2-135m-instruct:kb --adapter kb=runs/kb \\\n"
                "      --prompts prompts.jsonl\n"
                "  weightsmith arena judge --db arena.sqlite --reward answer --battles 40 \\\n"
                "      --contestants smollm2-135m-instruct,smollm2-135m-instruct:kb --adapter kb=runs/kb \\\n"
                '      --prompts math.jsonl   # lines like {"prompt": "7 x 6?", "answer": 42}',
                Ref("weightsmith.commands.arena_judge:run_arena_judge"),
                _plain(arena_out.print_judge),
                _bars,
            ),
            "ratings": Command(
                Ref("weightsmith.commands.arena:ArenaRatingsConfig"),
                "Bradley–Terry ratings with bootstrap intervals; ratings.json and report.html",
                "weightsmith arena ratings --db arena.sqlite --out reports/arena --voters human --anchor base",
                Ref("weightsmith.commands.arena:run_arena_ratings"),
                _plain(arena_out.print_ratings),
            ),
            "export": Command(
                Ref("weightsmith.commands.arena:ArenaExportConfig"),
                "write preference pairs (TRL prompt/chosen/rejected) with the DB hash beside them",
                "weightsmith arena export --db arena.sqlite --out pairs.jsonl --voters human --min-votes 2",
                Ref("weightsmith.commands.arena:run_arena_export"),
                _plain(arena_out.print_export),
            ),
            "import": Command(
                Ref("weightsmith.commands.arena:ArenaImportConfig"),
                "add battles collected elsewhere (Chatbot Arena's battle format)",
                "weightsmith arena import --db arena.sqlite --battles their-battles.jsonl",
                Ref("weightsmith.commands.arena:run_arena_import"),
                _plain(arena_out.print_import),
            ),
        },
    ),
    "inspect": Group(
        "look inside a model: logit lens, activation patching, attribution, attention, directions",
        {
            name: Command(config, help, example, run, _plain(show), with_loading(inspect_out.make_progress))
            for name, (config, help, example, run, show) in inspect_out.COMMANDS.items()
        },
    ),
    "export": Command(
        Ref("weightsmith.commands.export:ExportConfig"),
        "write a model as a GGUF file for llama.cpp and Ollama (f32, f16, q8_0, q6_k, q5_k_m, q4_k_m, ...), "
        "or a LoRA adapter as llama.cpp's GGUF adapter",
        "weightsmith export smollm2-135m-instruct --quant q8_0 --out exports/smollm2-q8_0.gguf\n"
        "  weightsmith export models/support-merged --quant q4_k_m --out support.gguf --overwrite\n"
        "  ollama create support -f Modelfile                    # then, in the --out directory\n"
        "  weightsmith export smollm2-135m-instruct --adapter runs/support --out support-lora.gguf  # llama.cpp --lora",
        Ref("weightsmith.commands.export:run_export"),
        _plain(export_out.print_export),
        lambda cfg: None if cfg.json else eval_out.ProgressBars(eval_out.stderr_console(), unit="tensors"),
    ),
    "imatrix": Command(
        Ref("weightsmith.commands.imatrix:ImatrixConfig"),
        "compute an importance matrix from calibration text, for export / quantize --imatrix (llama.cpp's format)",
        "weightsmith imatrix smollm2-135m-instruct --text calibration.txt --out smol.imatrix.gguf\n"
        "  weightsmith export smollm2-135m-instruct --quant q4_k_m --imatrix smol.imatrix.gguf --out smol.gguf",
        Ref("weightsmith.commands.imatrix:run_imatrix"),
        _plain(export_out.print_imatrix),
        lambda cfg: None if cfg.json else eval_out.ProgressBars(eval_out.stderr_console(), unit="chunks"),
    ),
    "quantize": Command(
        Ref("weightsmith.commands.quantize:QuantizeConfig"),
        "quantize weights to int8 (per channel) or int4 (group-wise) and save a loadable directory",
        "weightsmith quantize smollm2-135m-instruct --to int4 --group-size 32 --out models/smol-int4 --check\n"
        "  weightsmith quantize ./my-model --to int8 --out models/my-int8 --overwrite\n"
        '  weightsmith generate models/smol-int4 --prompt "Once upon a time"',
        Ref("weightsmith.commands.quantize:run_quantize"),
        _plain(quantize_out.print_quantize),
    ),
    "serve": Command(
        Ref("weightsmith.commands.serve:ServeConfig"),
        "serve a model behind an OpenAI-compatible API (streaming, batching, adapters)",
        "weightsmith serve smollm2-135m-instruct --adapter support=runs/support --port 8000\n"
        "  weightsmith serve ./my-model --api-key-file key.txt --host 0.0.0.0 --max-batch 32",
        Ref("weightsmith.commands.serve:run_serve"),
        _plain(serve_out.print_stopped),
        _listening,
    ),
    **lineage_out.COMMANDS,
    "demo": Command(
        Ref("weightsmith.cli.demo:DemoConfig"),
        "run the main job end to end on the default model",
        "weightsmith demo\n  weightsmith demo --stages chat",
        Ref("weightsmith.cli.demo:run"),
    ),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Given `argv`, only the command it names gets its options
    (which imports that command's config alone); without, every command gets them."""
    parser = argparse.ArgumentParser(
        prog="weightsmith",
        description="Run, shape, check and ship open-weight language models on your own hardware.",
        epilog="Run `weightsmith COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = None if argv is None else [a for a in argv if not a.startswith("-")][:2]
    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, Group):
            g = sub.add_parser(name, help=cmd.help, description=cmd.help)
            inner = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for sub_name, sub_cmd in cmd.commands.items():
                full = named is None or named == [name, sub_name]
                leaves[f"{name} {sub_name}"] = _add_command(inner, sub_name, sub_cmd, full)
        else:
            leaves[name] = _add_command(sub, name, cmd, named is None or named[:1] == [name])
    parser.set_defaults(_leaves=leaves)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; options may come between or after positionals (`guard check P --output T`).

    argparse fills an optional positional with its default as soon as it meets the first
    positional before an option, so text after the option is "unrecognized". The command's
    own parser then reads its arguments again in intermixed mode, which has no such gap."""
    args = list(sys.argv[1:] if argv is None else argv)
    ns, rest = parser.parse_known_args(args)
    if not rest or ns.command is None:
        return parser.parse_args(args) if rest else ns
    name, _ = command_for(ns)
    start = args.index(ns.command) + 1
    if " " in name:
        start = args.index(ns.subcommand, start) + 1
    leaf = ns._leaves[name].parse_intermixed_args(args[start:])
    for key, value in vars(leaf).items():
        setattr(ns, key, value)
    return ns


def _add_command(sub: Any, name: str, cmd: Command, full: bool = True) -> argparse.ArgumentParser:
    """`cmd`'s parser; its options (and its config's import) only when `full`."""
    if not full:
        return sub.add_parser(name, help=cmd.help, add_help=False)
    config = cmd.config_class()
    p = sub.add_parser(
        name,
        help=cmd.help,
        description=(config.__doc__ or cmd.help).strip(),
        epilog=f"example:\n  {cmd.examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, config)
    return p


def command_for(ns: argparse.Namespace) -> tuple[str, Command]:
    """The command line's command name ("eval", "guard check") and its `Command`."""
    cmd = COMMANDS[ns.command]
    if isinstance(cmd, Group):
        return f"{ns.command} {ns.subcommand}", cmd.commands[ns.subcommand]
    return ns.command, cmd


def dispatch(name: str, cfg: Any, console: Console) -> tuple[Any, Callable[[Any], None] | None]:
    """Run command `name`; return its result and a printer for people (None: already shown)."""
    command = _leaf(name)
    progress = command.progress(cfg) if command.progress is not None else None
    show = None if command.show is None else functools.partial(_show, command.show, console, cfg)
    try:
        return command.run(cfg, progress), show
    except WeightsmithError as e:
        if getattr(e, "result", None) is not None:  # failed with a result to show (guard test)
            _output(cfg, e.result, show)
        raise


def _show(show: Show, console: Console, cfg: Any, result: Any) -> None:
    show(result, console, cfg)


def _output(cfg: Any, result: Any, show: Callable[[Any], None] | None) -> None:
    """The result as JSON with --json, else through the command's printer."""
    if getattr(cfg, "json", False):
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    elif show is not None:
        show(result)


def _leaf(name: str) -> Command:
    group, _, sub = name.partition(" ")
    cmd = COMMANDS[group]
    return cmd.commands[sub] if isinstance(cmd, Group) else cmd


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = build_parser(args)
    ns = parse_command_line(parser, args)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if ns.command is None:
        parser.print_help()
        return 2
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, markup=False)
    try:
        name, command = command_for(ns)
        cfg = config_from_args(command.config_class(), ns)
        note_command_line(args)
        if name == "serve":
            serve_out.warn_visible_key(args, err)
        if name == "arena serve":
            arena_serve_out.warn_visible_key(args, err)
        # Off a terminal rich assumes 80 columns; a wider page keeps tables readable in logs.
        console = Console(
            highlight=False, emoji=False, markup=False, width=None if sys.stdout.isatty() else 160
        )
        result, show = dispatch(name, cfg, console)
        _output(cfg, result, show)
        return 0
    except WeightsmithError as e:
        if ns.debug:
            raise
        label = " ".join(x for x in (ns.command, getattr(ns, "subcommand", None)) if x)
        err.print(f"weightsmith {label}: error: {e}", markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        if ns.debug:
            raise
        err.print("\ninterrupted", markup=False)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
