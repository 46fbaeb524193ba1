"""Difference-of-means directions, their files, and steering while generating."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_hf_dir, run_cli

import weightsmith as ws
from weightsmith.inspect import Add, InspectError, run_hooked
from weightsmith.inspect.directions import difference_of_means, prompt_ids, read_direction, write_direction
from weightsmith.inspect.steering import parse_steer
from weightsmith.models.fingerprint import model_fingerprint
from weightsmith.models.model import CausalLM

POSITIVE = ["Tell me a story about a fox.", "Once upon a time there was a dog.", "The quick brown fox jumps."]
NEGATIVE = ["0123456789", "Bonjour le monde!", "Hola mundo. Grüße aus Köln."]


@pytest.fixture(scope="module")
def llm(tiny_hf_dir):
    return ws.load(tiny_hf_dir, device="cpu")


@pytest.fixture(scope="module")
def direction_file(llm, tmp_path_factory):
    direction = difference_of_means(llm.model, llm.tokenizer, POSITIVE, NEGATIVE)
    path = tmp_path_factory.mktemp("dirs") / "d.safetensors"
    write_direction(path, direction, {"model_sha256": model_fingerprint(llm.model), "positive": "test"})
    return path


def test_difference_of_means_is_the_mean_last_token_stream(llm) -> None:
    direction = difference_of_means(llm.model, llm.tokenizer, POSITIVE, NEGATIVE, layer=1)
    assert direction.vectors.shape == (3, 64) and direction.layer == 1

    def last(prompt: str, name: str) -> torch.Tensor:
        ids = prompt_ids(llm.tokenizer, prompt, chat=True)  # the chat template's user turn
        assert len(ids) > len(llm.tokenizer.encode(prompt))
        return run_hooked(llm.model, torch.tensor([ids]), keep=[name])[1][name][0, -1]

    for layer, name in ((1, "blocks.1.hook_resid_pre"), (2, "blocks.1.hook_resid_post")):
        manual = torch.stack([last(p, name) for p in POSITIVE]).mean(0) - torch.stack(
            [last(p, name) for p in NEGATIVE]
        ).mean(0)
        torch.testing.assert_close(direction.vectors[layer], manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(InspectError, match="negative prompt set is empty"):
        difference_of_means(llm.model, llm.tokenizer, POSITIVE, [])
    with pytest.raises(InspectError, match="layer=9 is out of range"):
        difference_of_means(llm.model, llm.tokenizer, POSITIVE, NEGATIVE, layer=9)


def test_direction_files_are_checked_against_the_model(llm, direction_file, tmp_path) -> None:
    n, h, fp = 2, 64, model_fingerprint(llm.model)
    d = read_direction(direction_file, hidden_size=h, num_layers=n, fingerprint=fp)
    assert d.meta["model_sha256"] == fp and d.meta["positive"] == "test" and d.meta["positive_count"] == "3"
    with pytest.raises(InspectError, match="width 64 but this model's hidden size is 32"):
        read_direction(direction_file, hidden_size=32, num_layers=n, fingerprint=fp)
    with pytest.raises(InspectError, match="extracted from other weights"):
        read_direction(direction_file, hidden_size=h, num_layers=n, fingerprint="0" * 64)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InspectError, match="not a safetensors file"):
        read_direction(junk, hidden_size=h, num_layers=n, fingerprint=fp)
    with pytest.raises(InspectError, match="no direction file"):
        read_direction(tmp_path / "missing.safetensors", hidden_size=h, num_layers=n, fingerprint=fp)


def test_steer_specs() -> None:
    assert parse_steer("d/x.safetensors:layer=3:scale=-2.5") == parse_steer(
        "d/x.safetensors:scale=-2.5:layer=3"
    )
    spec = parse_steer("C:/d/x.safetensors:ablate")
    assert str(spec.path) == "C:/d/x.safetensors" and spec.ablate and spec.scale is None
    for bad, match in (("x.safetensors", "either scale=S"), ("x:ablate:scale=1", "either scale=S"),
                       ("x:layer=a:scale=1", "layer must be an integer"), (":ablate", "direction file first")):  # fmt: skip
        with pytest.raises(InspectError, match=match):
            parse_steer(bad)


def _orthogonalized(model: CausalLM, r: torch.Tensor) -> CausalLM:
    """Arditi et al.'s weight orthogonalisation: nothing written into the stream has r in it."""
    m = copy.deepcopy(model)
    r = r / r.norm()
    with torch.no_grad():
        m.model.embed_tokens.weight -= (m.model.embed_tokens.weight @ r)[:, None] * r
        for layer in m.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight -= r[:, None] * (r @ lin.weight)[None, :]
    return m


def test_ablation_equals_weight_orthogonalisation(tiny_hf_dir, direction_file) -> None:
    steered = ws.load(tiny_hf_dir, device="cpu", steer=[f"{direction_file}:ablate"])
    plain = ws.load(tiny_hf_dir, device="cpu")
    plain.engine.cpu_plan.undo()  # plain row-major weights to copy and edit
    r = read_direction(direction_file, hidden_size=64, num_layers=2, fingerprint=None)
    ortho = _orthogonalized(plain.model, r.at())
    ids = torch.tensor([[5, 17, 42, 99, 3, 150, 7]])
    with torch.no_grad():
        torch.testing.assert_close(steered.model(ids), ortho(ids), atol=1e-4, rtol=1e-4)
        assert (plain.model(ids) - ortho(ids)).abs().max() > 1e-3
    steered.steering.stop()
    assert type(steered.model) is CausalLM


def test_addition_steers_prefill_and_every_decode_step(tiny_hf_dir, direction_file) -> None:
    steered = ws.load(tiny_hf_dir, device="cpu", steer=[f"{direction_file}:layer=1:scale=8"])
    out = steered.complete("Once upon", max_tokens=8, temperature=0).token_ids
    plain = ws.load(tiny_hf_dir, device="cpu")
    d = read_direction(direction_file, hidden_size=64, num_layers=2, fingerprint=None)
    ids = plain.tokenizer.encode("Once upon")
    manual = []
    for _ in range(len(out)):  # no KV cache: the whole sequence again each token, edited throughout
        logits, _ = run_hooked(
            plain.model, torch.tensor([ids + manual]), edits={"blocks.1.hook_resid_pre": Add(d.at(1), 8.0)}
        )
        manual.append(int(logits[0, -1].argmax()))
    assert out == manual
    assert plain.complete("Once upon", max_tokens=8, temperature=0).token_ids != out


def test_cli_steer_errors_are_one_line(tiny_hf_dir, direction_file, capsys, tmp_path) -> None:
    other = build_tiny_hf_dir(tmp_path / "other", seed=1)
    capsys.readouterr()
    code, out, err = run_cli(
        ["generate", other, "-p", "hi", "-n", "2", "--steer", f"{direction_file}:ablate"], capsys
    )
    assert code == 1 and "extracted from other weights" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(
        ["generate", tiny_hf_dir, "-p", "hi", "-n", "2", "--steer", f"{direction_file}:layer=5:scale=1"],
        capsys,
    )
    assert code == 1 and "layer=5 is out of range" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(
        [
            "generate",
            tiny_hf_dir,
            "-p",
            "hi",
            "-n",
            "3",
            "--temperature",
            "0",
            "--steer",
            f"{direction_file}:ablate",
        ],
        capsys,
    )
    assert code == 0, err
