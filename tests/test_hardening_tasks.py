"""Hostile task files (issue 16 items 1 and 2): a shared task file reads data only from its own
folder, reaches no network endpoint and picks no API-key variable unless the command line
grants it, and its task name cannot write outside --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightsmith.cli.main import main
from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.eval.output import write_outputs
from weightsmith.eval.runner import EvalOptions, load_tasks
from weightsmith.grants import Grants

GEN = """task: {name}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
output_type: generate_until
doc_to_text: "Q: {{{{q}}}}"
doc_to_target: a
generation_kwargs: {{until: ["\\n"], max_gen_toks: 2}}
"""
JUDGE = """judge:
  model: {url}
  rubric: "{{{{ answer }}}} Score: N"
"""


def _task(folder: Path, *, name: str = "t", data: str = "d.jsonl", judge: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    path = folder / "task.yaml"
    path.write_text(GEN.format(name=name, data=data) + judge)
    return path


# -- item 1: data files stay inside the task file's folder unless --allow-files grants more --


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "home" / ".aws" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"q": "AKIA-secret", "a": "y"}) + "\n")
    return path


@pytest.mark.parametrize("how", ["absolute", "dotdot", "home"])
def test_task_data_outside_its_folder_is_refused(tmp_path, secret, monkeypatch, how):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = {"absolute": str(secret), "dotdot": "../home/.aws/credentials", "home": "~/.aws/credentials"}[how]
    path = _task(tmp_path / "tasks", data=spec)
    with pytest.raises(ConfigError, match=r"task\.yaml:3: dataset_kwargs\.data_files\.test: .*--allow-files"):
        load_tasks([str(path)])


def test_task_data_symlinked_outside_its_folder_is_refused(tmp_path, secret):
    path = _task(tmp_path / "tasks", data="link.jsonl")
    (path.parent / "link.jsonl").symlink_to(secret)
    with pytest.raises(ConfigError, match="--allow-files"):
        load_tasks([str(path)])


def test_allow_files_grants_a_folder(tmp_path, secret):
    path = _task(tmp_path / "tasks", data=str(secret))
    taskset = load_tasks([str(path)], EvalOptions(), Grants(folders=(secret.parent,)))
    assert taskset.tasks[0].cfg.data_files["test"] == [secret]


def test_eval_cli_refuses_outside_data_with_one_line(tmp_path, secret, capsys):
    path = _task(tmp_path / "tasks", data=str(secret))
    code = main(["eval", "model-not-loaded", "--tasks", str(path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "--allow-files" in err and "credentials" in err


# -- item 1: a task file cannot choose a network endpoint or an API-key variable ------------


def test_judge_endpoint_needs_the_command_line(tmp_path):
    path = _task(tmp_path, judge=JUDGE.format(url="https://evil.example/v1"))
    with pytest.raises(ConfigError, match=r"task\.yaml:\d+: judge\.model: .*--judge-endpoint https://evil"):
        load_tasks([str(path)])
    other = Grants(endpoints=("https://judge.example/v1",))
    with pytest.raises(ConfigError, match="--judge-endpoint"):
        load_tasks([str(path)], grants=other)
    granted = Grants(endpoints=("https://evil.example/v1/",))
    assert load_tasks([str(path)], grants=granted).tasks[0].cfg.judge


def test_judge_api_key_env_comes_only_from_the_command_line(tmp_path, monkeypatch):
    from weightsmith.eval.judge import JudgeConfig, make_judge

    judge = JUDGE.format(url="https://judge.example/v1") + "  api_key_env: AWS_SECRET_ACCESS_KEY\n"
    path = _task(tmp_path, judge=judge)
    endpoint = Grants(endpoints=("https://judge.example/v1",))
    with pytest.raises(ConfigError, match=r"judge\.api_key_env: .*--judge-api-key-env"):
        load_tasks([str(path)], grants=endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak")
    monkeypatch.setenv("JUDGE_KEY", "sk-judge")
    granted = Grants(endpoints=endpoint.endpoints, api_key_env="JUDGE_KEY")
    cfg = JudgeConfig.from_dict({"model": "https://judge.example/v1", "rubric": "r"}, source="t.yaml")
    backend = make_judge(cfg, load_model=None, grants=granted)
    assert backend.api_key == "sk-judge"
    with pytest.raises(ConfigError, match="--judge-endpoint"):
        make_judge(cfg, load_model=None, grants=Grants())  # the last line of defence


# -- item 2: task names are file-name safe, and the writer stays inside --out --------------


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".hidden", "x\x00y", "a" * 200])
def test_unsafe_task_name_is_refused_at_read_time(tmp_path, name):
    path = _task(tmp_path, name=json.dumps(name))
    with pytest.raises(ConfigError, match=r"task\.yaml:1: task: "):
        load_tasks([str(path)])


def test_output_writer_refuses_a_sample_file_outside_out(tmp_path):
    run = {"weightsmith": {"label": "m"}}
    with pytest.raises(WeightsmithError, match="escaped"):
        write_outputs(tmp_path / "out", [run], [{"../../escaped": [{"x": 1}]}], None)
    assert not list(tmp_path.glob("**/samples_*"))
