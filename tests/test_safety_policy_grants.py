"""A guard policy's endpoint classifier runs only when the command line grants it.

A policy is a shared file: its `classifier:` may name an OpenAI-compatible endpoint, but it is
refused (one line naming the file, line, key and flag) before any request unless the command
line names that URL with `--classifier-endpoint`, and the API key comes only from the variable
named with `--classifier-api-key-env`. Every command that loads a policy takes both flags.
"""

from __future__ import annotations

import textwrap

import pytest

from weightsmith.cli.main import main
from weightsmith.commands.guard import GuardCheckConfig, run_guard_check
from weightsmith.errors import ConfigError
from weightsmith.eval.judge import EndpointJudge
from weightsmith.safety.policy import Guard
from weightsmith.safety.policy_file import ClassifierAccess

URL = "http://127.0.0.1:9/v1"

POLICY = f"""\
policy: test
version: "0.1"
categories:
  S1: violence
refusals:
  default: "I can't help with that request."
classifier:
  model: {URL}
  endpoint_model: guard-model
input:
  - id: judge
    type: classifier
    action: block
    block_categories: [S1]
"""


@pytest.fixture
def requests(monkeypatch):
    """Every request an EndpointJudge would send, answered "category: S1" without a network."""
    sent: list[tuple[str, str | None, list[dict]]] = []

    def complete(self, prompts):
        sent.extend((self.url, self.api_key, p) for p in prompts)
        return ["category: S1"] * len(prompts)

    monkeypatch.setattr(EndpointJudge, "complete", complete)
    return sent


def write(tmp_path, body: str = POLICY) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return str(path)


def test_an_endpoint_classifier_is_refused_without_the_flag(tmp_path, requests):
    path = write(tmp_path)
    with pytest.raises(ConfigError) as err:
        Guard.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:") and "classifier.model" in message
    assert f"pass --classifier-endpoint {URL} to allow it" in message and "\n" not in message
    with pytest.raises(ConfigError, match="--classifier-endpoint"):  # another URL is no grant
        Guard.load(path, grants=ClassifierAccess(classifier_endpoint=["http://elsewhere/v1"]).grants())
    with pytest.raises(ConfigError, match="--classifier-endpoint"):
        run_guard_check(GuardCheckConfig(policy=path, text="hit him"))
    assert requests == []  # refused before any request


def test_with_the_flag_the_classifier_runs(tmp_path, requests):
    path = write(tmp_path)
    access = ClassifierAccess(classifier_endpoint=[URL + "/"])  # a trailing slash is the same URL
    guard = Guard.load(path, grants=access.grants())
    assert guard.check_input("hit him").action == "block"
    assert [(url, key) for url, key, _ in requests] == [(URL + "/chat/completions", None)]


def test_the_api_key_comes_only_from_the_command_line(tmp_path, requests, monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_USER", "s3cret")
    monkeypatch.setenv("GUARD_KEY", "k")
    chosen = write(
        tmp_path, POLICY.replace("  endpoint_model:", "  api_key_env: SECRET_OF_THE_USER\n  endpoint_model:")
    )
    granted = ClassifierAccess(classifier_endpoint=[URL]).grants()
    with pytest.raises(ConfigError) as err:  # the file cannot choose the variable sent
        Guard.load(chosen, grants=granted)
    assert "classifier.api_key_env" in str(err.value)
    assert "remove the key and pass --classifier-api-key-env NAME" in str(err.value)

    access = ClassifierAccess(classifier_endpoint=[URL], classifier_api_key_env="GUARD_KEY")
    Guard.load(write(tmp_path), grants=access.grants()).check_input("x")
    assert requests[-1][1] == "k"

    monkeypatch.delenv("GUARD_KEY")
    with pytest.raises(
        ConfigError, match="--classifier-api-key-env: environment variable GUARD_KEY is not set"
    ):
        Guard.load(write(tmp_path), grants=access.grants())
    assert len(requests) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["guard", "check", "{policy}", "hit him"],
        ["guard", "test", "{policy}"],
        ["generate", "./no-such-model", "--guard", "{policy}", "-p", "hi"],
        ["chat", "./no-such-model", "--guard", "{policy}"],
        ["serve", "./no-such-model", "--guard", "{policy}"],
        ["redteam", "./no-such-model", "--guard", "{policy}", "--limit", "1", "--no-calibrate"],
    ],
    ids=lambda argv: " ".join(argv[:2]) if argv[0] == "guard" else argv[0],
)
def test_every_command_that_loads_a_policy_refuses_then_takes_the_flags(
    tmp_path, requests, capsys, monkeypatch, argv
):
    path = write(tmp_path)
    argv = [a.replace("{policy}", path) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "classifier.model" in err and f"--classifier-endpoint {URL}" in err and len(err.splitlines()) == 1
    assert requests == []
    # With the flags the policy loads, and the command goes on: guard check to its verdict
    # through the granted endpoint, the others to their missing model (or missing examples).
    monkeypatch.setenv("GUARD_KEY", "k")
    code = main([*argv, "--classifier-endpoint", URL, "--classifier-api-key-env", "GUARD_KEY"])
    err = capsys.readouterr().err
    assert "classifier" not in err
    if argv[:2] == ["guard", "check"]:
        assert code == 0 and [(url, key) for url, key, _ in requests] == [(URL + "/chat/completions", "k")]
    else:
        assert code != 0 and ("no-such-model" in err or "has no examples" in err) and requests == []
