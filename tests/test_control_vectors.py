"""llama.cpp's control vectors (`--control-vector`) both ways: `export MODEL --steer SPEC` writes
one, `--steer FILE.gguf[:scale=S]` steers with one.

Checked: an exported file, read back as a control vector, steers as the specs it was written from
(logits equal); llama.cpp itself (llama-cpp-python, where installed) given our file the way its
loader reads one (`direction.N` at layer N's output) computes the logits we compute with the specs;
a file in the format cvector-generator writes steers at the layers llama.cpp would; bad files and
specs fail in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_hf_dir, run_cli, write_gguf

import weightsmith as ws
from weightsmith.inspect import Add, InspectError, run_hooked
from weightsmith.inspect.control_vectors import read_control_vector
from weightsmith.inspect.directions import Direction, write_direction
from weightsmith.models.fingerprint import model_fingerprint

IDS = [5, 17, 42, 99, 3, 150, 7]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """A tiny Llama of 5 layers: room for layers llama.cpp can and cannot steer."""
    return build_tiny_hf_dir(tmp_path_factory.mktemp("deep") / "deep", num_hidden_layers=5)


def direction_file(llm, path: Path, seed: int = 0, norm: float = 4.0) -> Path:
    """A direction file of random unit-ish vectors for `llm`'s model (its fingerprint)."""
    cfg = llm.model.config
    torch.manual_seed(seed)
    vectors = torch.randn(cfg.num_hidden_layers + 1, cfg.hidden_size)
    vectors = norm * vectors / vectors.norm(dim=1, keepdim=True)
    write_direction(path, Direction(vectors, layer=2), {"model_sha256": model_fingerprint(llm.model)})
    return path


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        out = llm.model(torch.tensor([IDS]))
    return getattr(out, "logits", out)[0].float()


def test_an_exported_control_vector_steers_as_its_specs(deep_dir, tmp_path, capsys):
    plain = ws.load(deep_dir, device="cpu")
    d = direction_file(plain, tmp_path / "d.safetensors")
    specs = [
        f"{d}:layer=2:scale=3",
        f"{d}:layer=4:scale=-1.5",
        f"{d}:layer=5:scale=2",
        f"{d}:layer=4:scale=1",
    ]
    out = tmp_path / "cv.gguf"
    code, stdout, err = run_cli(
        ["export", str(deep_dir), *[a for s in specs for a in ("--steer", s)], "--out", str(out), "--json"],
        capsys,
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["layers"] == [1, 3, 4] and result["model_hint"] == "llama"
    reader = gguf.GGUFReader(out)
    assert str(reader.fields["general.architecture"].contents()) == "controlvector"
    assert int(reader.fields["controlvector.layer_count"].contents()) == 3
    by_spec = logits(ws.load(deep_dir, device="cpu", steer=specs))
    torch.testing.assert_close(
        logits(ws.load(deep_dir, device="cpu", steer=[str(out)])), by_spec, atol=1e-5, rtol=1e-5
    )
    # At half strength: the specs at half their scales.
    half = [s.rsplit("=", 1)[0] + "=" + str(float(s.rsplit("=", 1)[1]) / 2) for s in specs]
    from_file = logits(ws.load(deep_dir, device="cpu", steer=[f"{out}:scale=0.5"]))
    torch.testing.assert_close(
        from_file, logits(ws.load(deep_dir, device="cpu", steer=half)), atol=1e-5, rtol=1e-5
    )
    assert (by_spec - logits(plain)).abs().max() > 0.1


def test_a_cvector_generator_file_steers_each_layer_s_output(deep_dir, tmp_path):
    """direction.N (N >= 1) is added to layer N's output, as llama.cpp's graph adds it."""
    plain = ws.load(deep_dir, device="cpu")
    rng = np.random.default_rng(1)
    vectors = {n: rng.standard_normal(64).astype(np.float32) for n in (1, 3, 4)}
    tensors = {f"direction.{n}": v for n, v in vectors.items()}
    path = write_gguf(
        tmp_path / "repeng.gguf",
        "controlvector",
        tensors,
        **{"controlvector.model_hint": "llama", "controlvector.layer_count": 4},
    )
    got = logits(ws.load(deep_dir, device="cpu", steer=[f"{path}:scale=2"]))
    edits = {f"blocks.{n}.hook_resid_post": Add(torch.from_numpy(v), 2.0) for n, v in vectors.items()}
    plain.engine.cpu_plan.undo()
    want, _ = run_hooked(plain.model, torch.tensor([IDS]), edits=edits)
    torch.testing.assert_close(got, want[0].float(), atol=1e-5, rtol=1e-5)


def test_llama_cpp_steers_with_our_file_as_we_do(default_gguf, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    from weightsmith.checkpoint.gguf_write import export_gguf

    base = tmp_path / "base.gguf"
    export_gguf(default_gguf, base, "f16")
    plain = ws.load(base)
    d = direction_file(plain, tmp_path / "d.safetensors", seed=3, norm=6.0)
    specs = [f"{d}:layer=8:scale=2", f"{d}:layer=20:scale=-1", f"{d}:layer=30:scale=1"]
    out = tmp_path / "cv.gguf"
    code, _, err = run_cli(
        ["export", str(base), *[a for s in specs for a in ("--steer", s)], "--out", str(out)], capsys
    )
    assert code == 0, err
    prompt = plain.engine.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        steered = ws.load(base, steer=specs)
        ours = logits_at(steered.model, prompt)
        unsteered = logits_at(plain.model, prompt)
    # llama.cpp's loader (common_control_vector_load): direction.N's values at N - 1 widths in.
    cfg = plain.model.config
    data = np.zeros(cfg.hidden_size * cfg.num_hidden_layers, dtype=np.float32)
    for t in gguf.GGUFReader(out).tensors:
        n = int(t.name.split(".")[1])
        data[cfg.hidden_size * (n - 1) : cfg.hidden_size * n] += np.asarray(t.data, dtype=np.float32)
    llama = llama_cpp.Llama(model_path=str(base), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    ptr = data.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
    assert (
        llama_cpp.llama_set_adapter_cvec(llama.ctx, ptr, data.size, cfg.hidden_size, 1, cfg.num_hidden_layers)
        == 0
    )
    llama.eval(prompt)
    theirs = np.array(llama.scores[len(prompt) - 1])
    assert np.abs(theirs - ours).max() < 0.1
    assert np.abs(unsteered - ours).max() > 1.0  # the steering counts


def logits_at(model, ids: list[int]) -> np.ndarray:
    out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)[0, -1].float().numpy()


def test_bad_control_vectors_and_specs_fail_in_one_line(deep_dir, tmp_path, capsys):
    plain = ws.load(deep_dir, device="cpu")
    d = direction_file(plain, tmp_path / "d.safetensors")
    for spec, message in ((f"{d}:layer=1:scale=1", "pick a layer from 2 to 5"), (f"{d}:ablate", "only adds")):
        code, _, err = run_cli(
            ["export", str(deep_dir), "--steer", spec, "--out", str(tmp_path / "x.gguf")], capsys
        )
        assert code != 0 and message in err, err
    assert not (tmp_path / "x.gguf").exists()

    def write(name: str, tensors: dict, arch: str = "controlvector") -> Path:
        return write_gguf(tmp_path / name, arch, tensors)

    v = np.ones(64, np.float32)
    cases = {
        "not 'controlvector'": write("model.gguf", {"direction.1": v}, arch="llama"),
        "not direction.N with N >= 1": write("zero.gguf", {"direction.0": v}),
        "has width 32": write("narrow.gguf", {"direction.1": v[:32]}),
        "steers layer 5's output but this model has 5 layers": write("deep.gguf", {"direction.5": v}),
        "must be a 1-D F32 tensor": write("f16.gguf", {"direction.1": v.astype(np.float16)}),
        "holds no direction tensors": write("empty.gguf", {}),
    }
    for message, path in cases.items():
        with pytest.raises(InspectError, match=message):
            read_control_vector(path, hidden_size=64, num_layers=5)
    good = write("good.gguf", {"direction.1": v})
    for spec in (f"{good}:ablate", f"{good}:layer=2:scale=1"):
        with pytest.raises(InspectError, match="adds at every layer it holds"):
            ws.load(deep_dir, device="cpu", steer=[spec])
