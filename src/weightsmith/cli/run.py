"""The terminal side of generate and chat: the prompt from standard input, streamed text,
and chat's read-eval loop (slash commands, Ctrl-C stops an answer, Ctrl-D quits).

Not here: loading, generating, the conversation's history (`weightsmith.commands.run`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO

from weightsmith.commands.run import ChatConfig, GenerateConfig, open_chat, run_generate
from weightsmith.errors import UsageError

CHAT_HELP = "/reset clears the conversation, /system TEXT sets the system message, /exit quits"


def read_prompt(cfg: GenerateConfig, stdin: TextIO) -> str:
    """The prompt: --prompt, else standard input (not a terminal)."""
    if cfg.prompt is not None:
        return cfg.prompt
    if stdin.isatty():
        raise UsageError("no prompt: pass --prompt TEXT or pipe text on standard input")
    text = stdin.read()
    if not text.strip():
        raise UsageError("the prompt read from standard input is empty; pass --prompt TEXT")
    return text.rstrip("\n")


def generate(cfg: GenerateConfig, progress: Any = None) -> dict:
    """`generate`: the prompt from --prompt or stdin, then `run_generate` streaming to `progress`."""
    cfg.prompt = read_prompt(cfg, sys.stdin)
    return run_generate(cfg, progress)


def chat(cfg: ChatConfig, progress: Any = None) -> dict:
    """`chat`: the loop on this terminal (or over piped lines, one turn per line)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    return run_chat(cfg, stdin=sys.stdin, out=sys.stdout, interactive=interactive, progress=progress)


def run_chat(cfg: ChatConfig, *, stdin: TextIO, out: TextIO, interactive: bool, progress: Any = None) -> dict:
    """The REPL: slash commands, streaming answers, history kept across turns (`progress`:
    what `open_chat` shows model loads with)."""
    session = open_chat(cfg, progress)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        out.write(f"chatting with {cfg.model} ({CHAT_HELP}, Ctrl-C stops an answer, Ctrl-D quits)\n")
    turns = 0
    while True:
        line = _read_line(stdin, out, interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/reset":
                session.history.clear()
                out.write("(conversation cleared)\n")
            elif cmd == "/system":
                session.system = arg.strip() or None
                session.history.clear()
                out.write("(system message set, conversation cleared)\n")
            else:
                out.write(f"unknown command {cmd}: {CHAT_HELP}\n")
            out.flush()
            continue
        try:
            session.reply(text, lambda s: (out.write(s), out.flush()), _Thoughts(out, interactive))
        except KeyboardInterrupt:
            if not interactive:
                raise
            out.write(" (stopped)")  # Ctrl-C ends this answer, not the session
        out.write("\n")
        out.flush()
        turns += 1
    return {"turns": turns}


class _Thoughts:
    """How a reasoning model's thoughts (gpt-oss's analysis) are shown before its answer: dimmed on
    a terminal, else after "[thinking]", so a transcript tells them apart; `end` when the answer
    starts puts it on a line of its own."""

    def __init__(self, out: TextIO, interactive: bool) -> None:
        self.out, self.interactive, self.started = out, interactive, False

    def __call__(self, text: str) -> None:
        if not self.started:
            self.out.write("\x1b[2m" if self.interactive else "[thinking] ")
            self.started = True
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.started:
            self.out.write("\x1b[0m\n" if self.interactive else "\n[answer] ")
            self.started = False


def _read_line(stdin: TextIO, out: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return None
    line = stdin.readline()
    return line if line else None
