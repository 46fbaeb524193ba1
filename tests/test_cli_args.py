"""Tests for weightsmith.cli.args: dataclass configs <-> argparse <-> YAML."""

from __future__ import annotations  # get_type_hints must resolve string annotations

import argparse
import dataclasses
import enum
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from weightsmith.cli.args import add_config_arguments, config_from_args, parse_config
from weightsmith.config import config_from_dict, config_to_dict, dump_config_yaml, load_config_yaml, opt
from weightsmith.errors import UsageError

# ---------------------------------------------------------------------------
# Example configs, shaped like a real command's


@dataclasses.dataclass
class TrainConfig:
    """Optimiser settings for the training loop.

    The second line is not part of the group title.
    """

    lr: float = opt(1e-3, "Peak learning rate")
    steps: int = opt(100, "Number of optimiser steps")
    warmup_steps: int = opt(0, "Steps of linear warmup")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning rate schedule")
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW beta coefficients")


@dataclasses.dataclass
class LoraConfig:
    """Low rank adapter settings."""

    rank: int = opt(8, "Adapter rank r")
    targets: list[str] = opt(["q_proj", "v_proj"], "Module names to wrap")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}; try 8 or 16")


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tune a model on your data."""

    model: str = opt(help="Model id or path to fine-tune", positional=True)
    data: Path = opt(Path("train.jsonl"), "JSONL file of training examples", short="-d")
    train: TrainConfig = opt(default_factory=TrainConfig, help="How the loop runs")
    lora: LoraConfig = opt(default_factory=LoraConfig)
    packing: bool = opt(False, "Pack short examples into one sequence")
    use_cache: bool = opt(True, "Keep the tokenized data cache")
    max_tokens: int | None = opt(None, "Truncate examples to this many tokens", short="-n")
    device: Device = opt(Device.CPU, "Where to train")
    tags: dict[str, str] = opt({}, "Labels recorded in the run lineage")


@dataclasses.dataclass
class PromptConfig:
    """Generate text."""

    prompt: str = opt("Hello", "Prompt text", positional=True)
    files: list[Path] = opt([], "Extra prompt files", positional=True)
    temperature: float = opt(0.7, "Sampling temperature")


@dataclasses.dataclass
class SchedulerOverride:
    """Group whose default instance differs from the class defaults."""

    inner: TrainConfig = opt(default_factory=lambda: TrainConfig(lr=0.5, steps=7))


def parse(argv: list[str], cls: type = FinetuneConfig):
    return parse_config(cls, argv, prog="weightsmith finetune")


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Command line


def test_defaults_match_the_dataclass() -> None:
    assert parse(["m"]) == FinetuneConfig(model="m")


def test_flags_short_aliases_and_underscore_spelling() -> None:
    cfg = parse(["m", "-d", "x.jsonl", "--max-tokens", "64", "--device", "cuda"])
    assert (cfg.data, cfg.max_tokens, cfg.device) == (Path("x.jsonl"), 64, Device.CUDA)
    assert parse(["m", "-n", "32"]).max_tokens == 32
    assert parse(["m", "--max_tokens", "16"]).max_tokens == 16
    assert parse(["m", "--device", "CUDA"]).device is Device.CUDA  # an enum member by name too


def test_dotted_flags_set_nested_fields() -> None:
    cfg = parse(["m", "--train.lr", "1e-4", "--train.warmup-steps", "5", "--lora.rank=4"])
    assert cfg.train == TrainConfig(lr=1e-4, warmup_steps=5)
    assert cfg.lora.rank == 4
    assert parse(["m", "--train.warmup_steps", "3"]).train.warmup_steps == 3
    assert parse(["m", "--train.betas", "0.8,0.9"]).train.betas == (0.8, 0.9)


def test_bool_flags_and_their_negations() -> None:
    assert parse(["m", "--packing"]).packing is True
    assert parse(["m", "--packing", "--no-packing"]).packing is False
    assert parse(["m", "--no-use-cache"]).use_cache is False
    assert parse(["m", "--no_use_cache"]).use_cache is False


def test_optional_int_accepts_none() -> None:
    assert parse(["m", "-n", "none"]).max_tokens is None
    assert parse(["m", "-n", "12"]).max_tokens == 12


def test_bad_int_names_the_flag() -> None:
    with pytest.raises(UsageError) as err:
        parse(["m", "--train.steps", "abc"])
    assert str(err.value) == "--train.steps: expected an integer, got 'abc'"
    with pytest.raises(UsageError, match=r"^--train.lr: expected a number, got 'fast'$"):
        parse(["m", "--train.lr", "fast"])
    with pytest.raises(UsageError, match="expected 2 comma-separated values, got 3"):
        parse(["m", "--train.betas", "0.1,0.2,0.3"])


def test_literal_and_enum_choices_are_enforced() -> None:
    assert parse(["m", "--train.schedule", "linear"]).train.schedule == "linear"
    with pytest.raises(UsageError) as err:
        parse(["m", "--train.schedule", "cosin"])
    message = str(err.value)
    assert message.startswith("--train.schedule: expected one of cosine, linear, constant, got 'cosin'")
    assert "did you mean 'cosine'?" in message
    with pytest.raises(UsageError, match="^--device: expected one of cpu, cuda, got 'tpu'"):
        parse(["m", "--device", "tpu"])


def test_lists_take_commas_and_repeated_flags() -> None:
    cfg = parse(["m", "--lora.targets", "q_proj, k_proj", "--lora.targets", "o_proj"])
    assert cfg.lora.targets == ["q_proj", "k_proj", "o_proj"]
    assert parse(["m", "--lora.targets", ""]).lora.targets == []


@dataclasses.dataclass
class StopConfig:
    """Stop strings may contain commas."""

    stop: list[str] = opt([], "Stop when this text appears", split=False)


def test_unsplit_lists_keep_commas(tmp_path: Path) -> None:
    assert parse(["--stop", ", ", "--stop", "a,b"], StopConfig).stop == [", ", "a,b"]
    assert load_config_yaml(StopConfig, write(tmp_path, "stop: 'x, y'\n")).stop == ["x, y"]
    assert "Stop when this text appears (repeatable; default: empty)" in parse_help(StopConfig)


def test_dict_flags_take_key_value_pairs() -> None:
    cfg = parse(["m", "--tags", "team=nlp", "--tags", "note=a=b"])
    assert cfg.tags == {"team": "nlp", "note": "a=b"}
    with pytest.raises(UsageError, match="^--tags: expected KEY=VALUE, got 'team'$"):
        parse(["m", "--tags", "team"])


def test_positionals_required_optional_and_many() -> None:
    with pytest.raises(UsageError, match="missing required setting: give MODEL on the command line"):
        parse([])
    assert parse([], PromptConfig) == PromptConfig()
    cfg = parse(["Hi", "a.txt", "b.txt", "--temperature", "0"], PromptConfig)
    assert cfg == PromptConfig(prompt="Hi", files=[Path("a.txt"), Path("b.txt")], temperature=0.0)


def test_post_init_errors_become_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"^lora.rank must be positive, got 0; try 8 or 16$"):
        parse(["m", "--lora.rank", "0"])


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["m", "--trian.lr", "1"], ["m", "--train.l", "1"], ["m", "--train.lr"]):
        with pytest.raises(SystemExit) as exit_info:
            parse(argv)
        assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_help_lists_every_field_help_and_group_titles(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in (FinetuneConfig, TrainConfig, LoraConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "") in text, f.name
    assert "Optimiser settings for the training loop:" in text
    assert "Low rank adapter settings:" in text
    assert "The second line" not in text
    for flag in (
        "--train.warmup-steps",
        "--lora.targets",
        "--no-use-cache",
        "-d PATH, --data PATH",
        "--config",
    ):
        assert flag in text
    assert "--max_tokens" not in text  # the underscore alias works but stays out of --help
    assert "(default: 0.001)" in text and "(default: true)" in text and "{cosine,linear,constant}" in text


def test_nested_default_instance_supplies_group_defaults() -> None:
    assert parse([], SchedulerOverride).inner == TrainConfig(lr=0.5, steps=7)
    assert parse(["--inner.steps", "9"], SchedulerOverride).inner == TrainConfig(lr=0.5, steps=9)


# ---------------------------------------------------------------------------
# YAML files and precedence


def test_file_then_flags_precedence(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model: from-file\ntrain:\n  lr: 1e-4\n  steps: 50\nlora:\n  targets: [a, b]\npacking: true\n",
    )
    cfg = parse(["--config", str(path), "--train.lr", "3e-4", "--no-packing"])
    assert cfg.model == "from-file"
    assert cfg.train == TrainConfig(lr=3e-4, steps=50)  # flag beats file beats default
    assert cfg.lora.targets == ["a", "b"]
    assert cfg.packing is False
    assert parse(["cli-model", "--config", str(path)]).model == "cli-model"


def test_yaml_floats_without_a_dot_are_coerced(tmp_path: Path) -> None:
    assert isinstance(yaml.safe_load("lr: 1e-4")["lr"], str)  # the PyYAML quirk being fixed
    path = write(tmp_path, "model: m\ntrain:\n  lr: 1e-4\n  steps: 1e3\n  betas: [0, 1]\n")
    cfg = load_config_yaml(FinetuneConfig, path)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.train.betas == (0.0, 1.0) and all(type(b) is float for b in cfg.train.betas)


def test_unknown_yaml_key_has_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\n# a comment\ntrian:\n  lr: 0.1\n")
    with pytest.raises(UsageError) as err:
        parse(["--config", str(path)])
    assert str(err.value) == f"{path}:3: unknown key 'trian' (did you mean 'train'?)"
    path = write(tmp_path, "train:\n  lr: 0.1\n  zzz: 1\n")
    with pytest.raises(UsageError, match=r":3: unknown key 'zzz' in 'train' \(valid keys: lr, steps, "):
        load_config_yaml(FinetuneConfig, path)


def test_wrong_yaml_types_name_file_line_and_field(tmp_path: Path) -> None:
    cases = {
        "train:\n  steps: many\n": ":2: train.steps: expected an integer, got 'many'",
        "model: 1.10\n": ":1: model: expected a string, got 1.1 (in YAML, put the value in quotes)",
        "train: 5\n": ":1: expected a mapping of keys at 'train', got 5",
        "lora:\n  targets: [a, 3]\n": ":2: lora.targets: item 2: expected a string, got 3",
        "train:\n  schedule: step\n": ":2: train.schedule: expected one of cosine, linear, constant",
        "- a list\n": ": expected a mapping of keys at the top level",
        "packing: null\n": ":1: packing: expected true or false, got null",
    }
    for text, expected in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(UsageError) as err:
            load_config_yaml(FinetuneConfig, path)
        assert str(err.value).startswith(str(path) + expected), (text, str(err.value))


def test_yaml_accepts_dashes_and_rejects_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\nuse-cache: false\ntrain: {warmup-steps: 4}\n")
    cfg = load_config_yaml(FinetuneConfig, path)
    assert cfg.use_cache is False and cfg.train.warmup_steps == 4
    path = write(tmp_path, "model: m\nmodel: n\n")
    with pytest.raises(UsageError, match=r":2: invalid YAML: duplicate key 'model'"):
        load_config_yaml(FinetuneConfig, path)
    path = write(tmp_path, "use_cache: true\nuse-cache: false\n")
    with pytest.raises(UsageError, match=r":2: key 'use-cache' is given twice"):
        load_config_yaml(FinetuneConfig, path)


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config file not found"):
        parse(["m", "--config", str(tmp_path / "nope.yaml")])
    path = write(tmp_path, "model: m\ntrain: [1,\n")
    with pytest.raises(UsageError, match=r"config.yaml:\d+: invalid YAML"):
        load_config_yaml(FinetuneConfig, path)
    assert load_config_yaml(PromptConfig, write(tmp_path, "")) == PromptConfig()


def test_config_from_dict_reports_its_source() -> None:
    with pytest.raises(UsageError, match=r"^<dict>: train.lr: expected a number, got \[1\]$"):
        config_from_dict(FinetuneConfig, {"model": "m", "train": {"lr": [1]}})
    cfg = config_from_dict(FinetuneConfig, {"model": "m", "device": "cuda"})
    assert cfg == FinetuneConfig(model="m", device=Device.CUDA)


def test_subparsers_ignore_other_namespace_keys(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="weightsmith")
    parser.add_argument("--debug", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    add_config_arguments(commands.add_parser("finetune"), FinetuneConfig)
    add_config_arguments(commands.add_parser("generate"), PromptConfig)
    path = write(tmp_path, "temperature: 0.1\n")

    ns = parser.parse_args(["--debug", "finetune", "m", "--train.steps", "3"])
    assert (ns.command, ns.debug) == ("finetune", True)
    assert config_from_args(FinetuneConfig, ns) == FinetuneConfig(model="m", train=TrainConfig(steps=3))
    ns = parser.parse_args(["generate", "Hey", "--config", str(path)])
    assert config_from_args(PromptConfig, ns) == PromptConfig(prompt="Hey", temperature=0.1)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["generate", "--train.lr", "1"])
    assert exit_info.value.code == 2


def test_unsupported_annotations_fail_when_the_parser_is_built() -> None:
    @dataclasses.dataclass
    class Bad:
        value: int | str = 1

    with pytest.raises(TypeError, match="only union allowed"):
        add_config_arguments(argparse.ArgumentParser(), Bad)


# ---------------------------------------------------------------------------
# Writing configs


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    cfg = FinetuneConfig(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        data=Path("data/train.jsonl"),
        train=TrainConfig(lr=1e-5, schedule="linear", betas=(0.8, 0.95)),
        lora=LoraConfig(rank=16, targets=["q_proj", "k_proj"]),
        max_tokens=512,
        device=Device.CUDA,
        tags={"yes": "no"},
    )
    path = tmp_path / "out" / "config.yaml"
    dump_config_yaml(cfg, path)
    assert load_config_yaml(FinetuneConfig, path) == cfg
    assert parse(["--config", str(path)]) == cfg
    data = yaml.safe_load(path.read_text())
    assert data["data"] == "data/train.jsonl" and data["device"] == "cuda"
    assert data["train"]["betas"] == [0.8, 0.95] and data["train"]["lr"] == 1e-5
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert config_to_dict(cfg)["lora"] == {"rank": 16, "targets": ["q_proj", "k_proj"]}


class Color(enum.Enum):
    RED = "red"
    ONE = 1


@dataclasses.dataclass
class FlatConfig:
    """Every supported kind of field."""

    name: str = opt("x", "A name")
    count: int = opt(0, "A count")
    rate: float = opt(0.5, "A rate")
    flag: bool = opt(False, "A flag")
    path: Path = opt(Path("."), "A path")
    mode: Literal["fast", "slow"] = opt("fast", "A mode")
    color: Color = opt(Color.RED, "A color")
    limit: int | None = opt(None, "A limit")
    note: str | None = opt(None, "A note")
    words: list[str] = opt([], "Some words")
    sizes: tuple[int, ...] = opt((), "Some sizes")
    pair: tuple[float, int] = opt((0.0, 0), "A pair")
    labels: dict[str, str] = opt({}, "Some labels")


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
floats = st.floats(allow_nan=False)
flat_configs = st.builds(
    FlatConfig,
    name=text,
    count=st.integers(),
    rate=floats,
    flag=st.booleans(),
    path=st.from_regex(r"[a-z0-9_./ -]{1,12}", fullmatch=True).map(Path),
    mode=st.sampled_from(["fast", "slow"]),
    color=st.sampled_from(Color),
    limit=st.none() | st.integers(),
    note=st.none() | text,
    words=st.lists(text, max_size=3),
    sizes=st.lists(st.integers(), max_size=3).map(tuple),
    pair=st.tuples(floats, st.integers()),
    labels=st.dictionaries(text, text, max_size=3),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=flat_configs)
@example(cfg=FlatConfig(name="line\x85break\u2028", words=["a\nb", " "]))  # PyYAML folded U+0085 to a space
def test_round_trip_property(cfg: FlatConfig, tmp_path: Path) -> None:
    assert config_from_dict(FlatConfig, config_to_dict(cfg)) == cfg
    path = tmp_path / "flat.yaml"
    dump_config_yaml(cfg, path)
    assert load_config_yaml(FlatConfig, path) == cfg


def test_every_flat_field_is_settable_from_flags() -> None:
    argv = (
        "--name n --count 3 --rate=-2.5 --flag --path p --mode slow --color 1 --limit 4 --note none".split()
    )
    argv += ["--words", "a,b", "--sizes", "1", "--sizes", "2", "--pair", "1e-3,2", "--labels", "k=v"]
    cfg = parse(argv, FlatConfig)
    expected = FlatConfig("n", 3, -2.5, True, Path("p"), "slow", Color.ONE, 4, "none", ["a", "b"], (1, 2))
    assert cfg == dataclasses.replace(expected, pair=(1e-3, 2), labels={"k": "v"})
    assert re.search(r"--note TEXT\s", parse_help(FlatConfig))


def parse_help(cls: type) -> str:
    parser = argparse.ArgumentParser(prog="x")
    add_config_arguments(parser, cls)
    return parser.format_help()


# ---------------------------------------------------------------------------
# Flattened groups: a library's settings record embedded in a command's config


@dataclasses.dataclass(kw_only=True)
class RunSettings:
    """What the library takes (declared once, where the library lives)."""

    limit: int | None = opt(None, "items per task")
    seed: int = opt(1234, "sampler seed")
    tags: list[str] = opt(default_factory=list, help="labels")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit: expected at least 1, got {self.limit}")


@dataclasses.dataclass(kw_only=True)
class EmbeddingConfig:
    """A command that embeds the library's settings."""

    model: str = opt("m", "model", positional=True)
    first: bool = opt(False, "a flag before the group")
    run: RunSettings = opt(default_factory=lambda: RunSettings(seed=7), flatten=True)
    last: str = opt("z", "a flag after the group")
    train: TrainConfig = opt(default_factory=TrainConfig)


def test_flattened_group_fields_are_top_level_flags_in_place() -> None:
    cfg = parse(["--limit", "3", "--tags", "a,b", "--last", "y"], EmbeddingConfig)
    assert cfg.run == RunSettings(limit=3, seed=7, tags=["a", "b"])  # the default instance's seed kept
    assert cfg.last == "y" and cfg.train == TrainConfig()
    text = parse_help(EmbeddingConfig)
    flags = re.findall(r"^  (--[\w.-]+)", text, flags=re.M)
    assert flags[:6] == ["--config", "--first", "--limit", "--seed", "--tags", "--last"]
    assert "--run" not in text and "run options" not in text and "(default: 7)" in text
    with pytest.raises(UsageError, match="--limit: expected at least 1"):  # the group's own checks
        parse(["--limit", "0"], EmbeddingConfig)


def test_flattened_group_keys_sit_at_the_top_of_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "limit: 2\nseed: 5\ntrain:\n  lr: 0.5\n")
    cfg = load_config_yaml(EmbeddingConfig, path)
    assert cfg.run == RunSettings(limit=2, seed=5) and cfg.train.lr == 0.5
    data = config_to_dict(cfg)
    assert "run" not in data and data["limit"] == 2 and data["seed"] == 5
    assert config_from_dict(EmbeddingConfig, data) == cfg
    dump_config_yaml(cfg, tmp_path / "out.yaml")
    assert load_config_yaml(EmbeddingConfig, tmp_path / "out.yaml") == cfg
    with pytest.raises(UsageError, match=r"config.yaml:1: unknown key 'run'"):
        load_config_yaml(EmbeddingConfig, write(tmp_path, "run:\n  limit: 2\n"))
    with pytest.raises(UsageError, match=r"did you mean 'seed'"):
        load_config_yaml(EmbeddingConfig, write(tmp_path, "sed: 2\n"))


def test_flattened_group_names_must_not_collide() -> None:
    @dataclasses.dataclass
    class Clash:
        seed: int = 1
        run: RunSettings = opt(default_factory=RunSettings, flatten=True)

    with pytest.raises(TypeError, match="'seed' is used twice"):
        add_config_arguments(argparse.ArgumentParser(), Clash)

    @dataclasses.dataclass
    class NotAGroup:
        seed: int = opt(1, flatten=True)

    with pytest.raises(TypeError, match="only a dataclass field can be flattened"):
        add_config_arguments(argparse.ArgumentParser(), NotAGroup)
