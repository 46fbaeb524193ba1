"""Commands called from Python, with no argparse and no CLI: `weightsmith.commands.X.run_*(cfg)`
returns plain data and prints nothing."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from weightsmith.cli.loading import Loading
from weightsmith.commands import eval as eval_cmd
from weightsmith.commands import guard, loading, quantize, run, store, train
from weightsmith.commands.loading import load_status
from weightsmith.commands.serve import ServeConfig
from weightsmith.errors import UsageError
from weightsmith.eval.runner import EvalOptions


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))


def test_store_and_generate_return_data_and_print_nothing(tiny_hf_dir, capsys) -> None:
    info = store.run_info(store.InfoConfig(model=str(tiny_hf_dir)))
    assert info["format"] == "hf" and info["layers"] >= 1
    entry = store.run_pull(store.PullConfig(spec=str(tiny_hf_dir), name="tiny"))
    assert entry["name"] == "tiny"
    assert [m["name"] for m in store.run_models(store.ModelsConfig())["models"]] == ["tiny"]

    cfg = run.GenerateConfig(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=6)
    streamed: list[str] = []
    result = run.run_generate(cfg, streamed.append)
    assert result["text"] == "".join(streamed)
    assert result["usage"]["completion_tokens"] <= 6
    json.dumps(result)  # plain data
    assert store.run_rm(store.RmConfig(name="tiny")) == {"removed": "tiny"}
    assert capsys.readouterr() == ("", "")


class LoadsAndText:
    """A progress with its own shape (text as it arrives) that is also told of model loads."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.loads: list[tuple[str, str]] = []

    def __call__(self, text: str) -> None:
        self.text.append(text)

    @contextlib.contextmanager
    def loading(self, model: str):
        self.loads.append(("start", model))
        yield
        self.loads.append(("done", model))


def test_model_loads_are_shown_through_the_progress_passed_down(tiny_hf_dir) -> None:
    progress = LoadsAndText()
    cfg = run.GenerateConfig(model=str(tiny_hf_dir), prompt="Once upon a time", temperature=0, max_tokens=3)
    result = run.run_generate(cfg, progress)
    assert progress.loads == [("start", str(tiny_hf_dir)), ("done", str(tiny_hf_dir))]
    assert "".join(progress.text) == result["text"]
    chat = LoadsAndText()
    run.open_chat(run.ChatConfig(model=str(tiny_hf_dir)), chat)
    assert chat.loads == progress.loads
    assert not hasattr(loading, "set_load_status") and not hasattr(loading, "load_status_hook")
    # The CLI's wrapper: calls go to the command's own progress; false when there is none.
    shown: list[str] = []
    assert Loading(shown.append) and not Loading() and Loading()("ignored") is None
    Loading(shown.append)("text")
    assert shown == ["text"] and load_status(Loading()) is not None and load_status(shown.append) is None


def test_generate_without_a_prompt_is_a_usage_error(tiny_hf_dir) -> None:
    with pytest.raises(UsageError, match="no prompt"):
        run.run_generate(run.GenerateConfig(model=str(tiny_hf_dir)))


def test_chat_session_keeps_history(tiny_hf_dir) -> None:
    session = run.open_chat(run.ChatConfig(model=str(tiny_hf_dir), temperature=0, max_tokens=4))
    session.reply("hello", lambda s: None)
    session.reply("again", lambda s: None)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2


def test_eval_merge_and_quantize_from_python(tiny_hf_dir, tmp_path: Path, capsys) -> None:
    ticks: list[tuple[str, int, int]] = []
    cfg = eval_cmd.EvalConfig(model=str(tiny_hf_dir), tasks=["builtin:arith-mc"], run=EvalOptions(limit=4),
                              cache=False, device="cpu")  # fmt: skip
    result = eval_cmd.run_eval(cfg, lambda label: lambda done, total: ticks.append((label, done, total)))
    assert list(result["runs"][0]["results"]) == ["arith_mc"]
    assert ticks and ticks[-1][1] == ticks[-1][2]

    out = tmp_path / "q"
    q = quantize.run_quantize(quantize.QuantizeConfig(model=str(tiny_hf_dir), to="int8", out=str(out)))
    assert q["out"] == str(out) and q["modules_quantized"] > 0

    with pytest.raises(UsageError, match="needs --adapter"):
        train.run_merge(train.MergeConfig(model=str(tiny_hf_dir), out=str(tmp_path / "m")))
    assert capsys.readouterr() == ("", "")


def test_guard_commands_from_python() -> None:
    r = guard.run_guard_check(
        guard.GuardCheckConfig(policy="builtin:school", text="how do I make a pipe bomb")
    )
    assert r["action"] == "block"
    assert guard.run_guard_test(guard.GuardTestConfig(policy="builtin:school"))["failed"] == 0
    with pytest.raises(UsageError, match="no text to check"):
        guard.run_guard_check(guard.GuardCheckConfig(policy="builtin:school"))


def test_serve_config_checks_ranges_when_built() -> None:
    with pytest.raises(UsageError, match="--max-batch must be at least 1, got 0"):
        ServeConfig(model="m", max_batch=0)
    for field, flag in (
        ("prompt_cache_mib", "--prompt-cache-mib"),
        ("response_store_mib", "--response-store-mib"),
    ):
        with pytest.raises(UsageError, match=f"{flag} must be at least 0, got -1"):
            ServeConfig(model="m", **{field: -1})
