"""Starting the command line: each command imports only what it uses.

`weightsmith --help` and the commands that load no model (the store, guardrail checks, the
arena's ratings and exports, lineage) do not import torch (about 1.6 s); the parser gives
each command its options only when that command is named, and that must not change what
any command accepts or shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from weightsmith.cli.command import Group, Ref, resolve
from weightsmith.cli.main import COMMANDS, build_parser, main


def _leaves() -> list[str]:
    names = []
    for name, cmd in COMMANDS.items():
        names += [f"{name} {sub}" for sub in cmd.commands] if isinstance(cmd, Group) else [name]
    return names


@pytest.mark.parametrize("name", _leaves())
def test_a_named_command_gets_the_same_parser_as_the_full_one(name: str, capsys) -> None:
    full = build_parser().get_default("_leaves")[name].format_help()
    lazy = build_parser(["--debug", *name.split(), "x"]).get_default("_leaves")[name].format_help()
    assert lazy == full
    with pytest.raises(SystemExit) as e:
        main([*name.split(), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out == full and "example:\n  weightsmith " in out


def test_every_ref_names_something() -> None:
    """A misspelt `Ref` would fail only when its command runs: resolve every one written."""
    import re
    from pathlib import Path

    import weightsmith.cli

    written = set()
    for path in Path(weightsmith.cli.__file__).parent.glob("*.py"):
        written |= set(re.findall(r'Ref\("([\w.]+:\w+)"\)', path.read_text(encoding="utf-8")))
    assert len(written) > 60
    for path in sorted(written):
        assert callable(Ref(path).get()), path
    for name, cmd in COMMANDS.items():
        for leaf in cmd.commands.values() if isinstance(cmd, Group) else [cmd]:
            assert isinstance(resolve(leaf.config), type) and callable(leaf.run), name
    with pytest.raises(AttributeError):
        Ref("weightsmith.commands.store:NoSuchConfig").get()


NO_MODEL = [
    ["--help"],
    ["models"],
    ["models", "--json"],
    ["guard", "check", "builtin:school", "what is photosynthesis"],
    ["arena", "ratings", "--db", "missing.sqlite"],
    ["arena", "export", "--help"],
    ["lineage", "--help"],
    ["card", "--help"],
]


@pytest.mark.parametrize("argv", NO_MODEL, ids=" ".join)
def test_commands_that_load_no_model_do_not_import_torch(argv: list[str], tmp_path) -> None:
    code = (
        "import sys\nfrom weightsmith.cli.main import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, code)\n"
    )
    env = {"WEIGHTSMITH_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    torch_loaded, exit_code = out.stdout.split()[-2:]
    assert torch_loaded == "False", out.stderr[-2000:]
    # --help and the store's listing succeed; a missing arena DB is a one-line error
    assert exit_code == ("1" if "missing.sqlite" in argv else "0"), out.stderr[-2000:]


def test_the_package_names_load_on_first_use() -> None:
    code = (
        "import sys, weightsmith as ws\n"
        "assert 'torch' not in sys.modules and ws.__version__\n"
        "from weightsmith import SamplingParams, WeightsmithError, load\n"
        "assert ws.LLM.__module__ == 'weightsmith.llm' and callable(load)\n"
        "assert SamplingParams().temperature >= 0 and issubclass(WeightsmithError, Exception)\n"
        "assert ws.inspect.__name__ == 'weightsmith.inspect' and set(ws.__all__) <= set(dir(ws))\n"
        "try:\n    ws.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "module 'weightsmith' has no attribute 'nothing'"
