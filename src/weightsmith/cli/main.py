"""The `weightsmith` command: parse arguments, call a command's run function, print.

Errors a user can cause become one line on stderr and exit status 1 (2 for usage
errors); `--debug` shows the traceback instead. Nothing here knows how models
work: commands live in `cli/store.py` and `cli/run.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from weightsmith import __version__
from weightsmith.cli import audit as audit_cmd
from weightsmith.cli import demo, store
from weightsmith.cli import eval as eval_cmd
from weightsmith.cli import export as export_cmd
from weightsmith.cli import guard as guard_cmd
from weightsmith.cli import quantize as quantize_cmd
from weightsmith.cli import redteam as redteam_cmd
from weightsmith.cli import run as run_cmds
from weightsmith.cli import serve as serve_cmd
from weightsmith.cli import train as train_cmds
from weightsmith.cli.args import add_config_arguments, config_from_args
from weightsmith.errors import WeightsmithError


@dataclass(frozen=True)
class Command:
    config: type
    help: str
    examples: str


@dataclass(frozen=True)
class Group:
    """A command with subcommands (`weightsmith guard check ...`); dispatched as "guard check"."""

    help: str
    commands: dict[str, Command]


#: Every command, in the order `--help` lists them.
COMMANDS: dict[str, Command | Group] = {
    "pull": Command(
        store.PullConfig,
        "fetch a model into the store",
        "weightsmith pull smollm2-135m-instruct\n"
        "  weightsmith pull HuggingFaceTB/SmolLM2-135M-Instruct     # online only\n"
        "  weightsmith pull ./my-checkpoint --name mine             # register a local HF dir or .gguf",
    ),
    "models": Command(store.ModelsConfig, "list the models in the store", "weightsmith models --json"),
    "rm": Command(store.RmConfig, "remove a model from the store", "weightsmith rm mine"),
    "info": Command(
        store.InfoConfig,
        "show a model's family, size, precision, context and chat template",
        "weightsmith info smollm2-135m-instruct --template",
    ),
    "generate": Command(
        run_cmds.GenerateConfig,
        "complete a prompt",
        'weightsmith generate smollm2-135m-instruct --prompt "Once upon a time" --temperature 0 --json\n'
        '  echo "Explain LoRA in one sentence." | weightsmith generate smollm2-135m-instruct --chat -n 64',
    ),
    "chat": Command(
        run_cmds.ChatConfig,
        "chat with a model (streams; /reset, /system TEXT, /exit)",
        "weightsmith chat smollm2-135m-instruct --system 'You are terse.'",
    ),
    "finetune": Command(
        train_cmds.FinetuneConfig,
        "fine-tune on your JSONL data (LoRA, QLoRA or full)",
        "weightsmith finetune smollm2-135m-instruct --data support.jsonl --method lora --out runs/support\n"
        "  weightsmith finetune smollm2-135m-instruct --config finetune.yaml --train.lr 1e-4 --lora.rank 16\n"
        "  weightsmith finetune --resume runs/support          # continue from the latest checkpoint",
    ),
    "merge": Command(
        train_cmds.MergeConfig,
        "fold a LoRA adapter into its base model and save an HF directory",
        "weightsmith merge smollm2-135m-instruct --adapter runs/support --out models/support-merged",
    ),
    "eval": Command(
        eval_cmd.EvalConfig,
        "evaluate a model and its forks on task files; compare and report",
        "weightsmith eval smollm2-135m-instruct --tasks builtin:arith-mc,my_tasks/qa.yaml --limit 200\n"
        "  weightsmith eval smollm2-135m-instruct --adapter runs/support --compare base \\\n"
        "      --tasks builtin:kettlebird-heldout --apply-chat-template --out reports/support",
    ),
    "redteam": Command(
        redteam_cmd.RedteamConfig,
        "attack a model, its forks and its guard with probe packs; attack success vs over-refusal",
        "weightsmith redteam smollm2-135m-instruct --adapter runs/support --guard builtin:school --out reports/rt\n"
        "  weightsmith redteam http://localhost:8000/v1 --model smollm2-135m-instruct --packs builtin:injection",
    ),
    "guard": Group(
        "check text against a guardrail policy, or test a policy against its own examples",
        {
            "check": Command(
                guard_cmd.GuardCheckConfig,
                "check one text against a policy's input (or --output) rails",
                'weightsmith guard check builtin:school "how do I make a bomb"\n'
                '  echo "my email is a@b.org" | weightsmith guard check policies/school.yaml --output --json',
            ),
            "test": Command(
                guard_cmd.GuardTestConfig,
                "run a policy against the examples written in it (exit 1 if any fails)",
                "weightsmith guard test builtin:school\n  weightsmith guard test policies/school.yaml --json",
            ),
        },
    ),
    "audit": Group(
        "audit a model for bias",
        {
            "bias": Command(
                audit_cmd.AuditBiasConfig,
                "counterfactual bias audit over eval tasks, and stereotype-pair likelihoods",
                "weightsmith audit bias smollm2-135m-instruct --tasks builtin:reading-mc --out reports/bias\n"
                "  weightsmith audit bias ./my-model --lexicon builtin:names --pairs none --tasks my_task.yaml",
            ),
        },
    ),
    "export": Command(
        export_cmd.ExportConfig,
        "write a model as a GGUF file for llama.cpp and Ollama (f32, f16, q8_0, q4_0)",
        "weightsmith export smollm2-135m-instruct --quant q8_0 --out exports/smollm2-q8_0.gguf\n"
        "  weightsmith export models/support-merged --quant f16 --out support.gguf --overwrite\n"
        "  ollama create support -f Modelfile                    # then, in the --out directory",
    ),
    "quantize": Command(
        quantize_cmd.QuantizeConfig,
        "quantize weights to int8 (per channel) or int4 (group-wise) and save a loadable directory",
        "weightsmith quantize smollm2-135m-instruct --to int4 --group-size 32 --out models/smol-int4 --check\n"
        "  weightsmith quantize ./my-model --to int8 --out models/my-int8 --overwrite\n"
        '  weightsmith generate models/smol-int4 --prompt "Once upon a time"',
    ),
    "serve": Command(
        serve_cmd.ServeConfig,
        "serve a model behind an OpenAI-compatible API (streaming, batching, adapters)",
        "weightsmith serve smollm2-135m-instruct --adapter support=runs/support --port 8000\n"
        '  weightsmith serve ./my-model --api-key "$(cat key.txt)" --host 0.0.0.0 --max-batch 32',
    ),
    "demo": Command(
        demo.DemoConfig,
        "run the main job end to end on the default model",
        "weightsmith demo\n  weightsmith demo --stages chat",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith",
        description="Run, shape, check and ship open-weight language models on your own hardware.",
        epilog="Run `weightsmith COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, Group):
            g = sub.add_parser(name, help=cmd.help, description=cmd.help)
            inner = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for sub_name, sub_cmd in cmd.commands.items():
                leaves[f"{name} {sub_name}"] = _add_command(inner, sub_name, sub_cmd)
        else:
            leaves[name] = _add_command(sub, name, cmd)
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


def _add_command(sub: Any, name: str, cmd: Command) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=cmd.help,
        description=(cmd.config.__doc__ or cmd.help).strip(),
        epilog=f"example:\n  {cmd.examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, cmd.config)
    return p


def command_for(ns: argparse.Namespace) -> tuple[str, Command]:
    """The command line's command name ("eval", "guard check") and its `Command`."""
    cmd = COMMANDS[ns.command]
    if isinstance(cmd, Group):
        return f"{ns.command} {ns.subcommand}", cmd.commands[ns.subcommand]
    return ns.command, cmd


def dispatch(name: str, cfg: Any, console: Console) -> tuple[Any, Callable[[Any], None] | None]:
    """Run command `name`; return its result and a printer for people (None: already shown)."""
    out = sys.stdout
    if name == "pull":
        return store.run_pull(cfg), lambda r: store.print_pull(r, console)
    if name == "models":
        return store.run_models(cfg), lambda r: store.print_models(r, console)
    if name == "rm":
        return store.run_rm(cfg), lambda r: store.print_rm(r, console)
    if name == "info":
        return store.run_info(cfg), lambda r: store.print_info(r, console, template=cfg.template)
    if name == "generate":
        sink = None if cfg.json else (lambda s: (out.write(s), out.flush()))
        result = run_cmds.run_generate(cfg, on_text=sink)
        return result, (lambda r: out.write("\n"))
    if name == "chat":
        interactive = sys.stdin.isatty() and out.isatty()
        return run_cmds.run_chat(cfg, stdin=sys.stdin, out=out, interactive=interactive), None
    if name == "finetune":
        return train_cmds.run_finetune_cli(cfg), lambda r: train_cmds.print_finetune(r, console)
    if name == "merge":
        return train_cmds.run_merge(cfg), lambda r: console.print(f"wrote {r['out']}")
    if name == "eval":
        progress = None if cfg.json else eval_cmd.ProgressBars(eval_cmd.stderr_console())
        return eval_cmd.run_eval(cfg, progress=progress), lambda r: eval_cmd.print_eval(r, console)
    if name == "redteam":
        progress = None if cfg.json else redteam_cmd.progress_lines(redteam_cmd.stderr_console())
        result = redteam_cmd.run_redteam_cli(cfg, progress=progress)
        return result, lambda r: redteam_cmd.print_redteam(r, console)
    if name == "guard check":
        return guard_cmd.run_guard_check(cfg), lambda r: guard_cmd.print_guard_check(r, console)
    if name == "guard test":
        return guard_cmd.run_guard_test(cfg, console=console), lambda r: guard_cmd.print_guard_test(
            r, console
        )
    if name == "audit bias":
        progress = None if cfg.json else eval_cmd.ProgressBars(eval_cmd.stderr_console())
        result = audit_cmd.run_audit_bias(cfg, progress=progress)
        return result, lambda r: audit_cmd.print_audit_bias(r, console)
    if name == "export":
        return export_cmd.run_export(cfg), lambda r: export_cmd.print_export(r, console)
    if name == "quantize":
        return quantize_cmd.run_quantize(cfg), lambda r: quantize_cmd.print_quantize(r, console)
    if name == "serve":
        listening = lambda url, state: serve_cmd.print_listening(url, state, sys.stderr)  # noqa: E731
        stopped = lambda r: sys.stderr.write("weightsmith serve: stopped\n")  # noqa: E731
        return serve_cmd.run_serve(cfg, on_listening=listening), stopped
    if name == "demo":
        return demo.run_demo(cfg, out=out), None
    raise AssertionError(name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parse_command_line(parser, argv)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if ns.command is None:
        parser.print_help()
        return 2
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    try:
        name, command = command_for(ns)
        cfg = config_from_args(command.config, ns)
        # Off a terminal rich assumes 80 columns; a wider page keeps tables readable in logs.
        console = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
        result, show = dispatch(name, cfg, console)
        if getattr(cfg, "json", False):
            print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
        elif show is not None:
            show(result)
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
