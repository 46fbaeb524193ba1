"""A GGUF file loaded with its quantized matrices kept as blocks (`keep_quantized`,
checkpoint/gguf_quants.py), end to end, against the same file's float (dequantized) load.

The file is a tiny llama written here with `gguf.GGUFWriter`, Q/K rows permuted as llama.cpp's
converter does, one matrix of each type the kernels run (Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 made
by gguf-py's quantizers, Q2_K to Q6_K, IQ4_NL and IQ4_XS random valid blocks; the grid-coded IQ1_S
to IQ3_S random valid blocks, TQ1_0, TQ2_0 and MXFP4 gguf-py's), one F16 matrix (stays a
float layer) and a Q8_0 embedding with no output tensor (the head is the embedding's blocks,
as llama.cpp computes it). Checked: every kept layer dequantizes bit for bit to the float
load's weight, resident bytes are the file's, prefill logits equal the float load's, decode
logits through the kernels and through the fused C step equal the PyTorch path's with the
kernels' input rounding, and `weightsmith generate --keep-quantized` decodes what the PyTorch
path decodes; a LoRA adapter runs beside the blocks (generate, serve); refusals are one line.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import CPU, assert_matches, kernels_on, quantize_act, run_cli
from ggml_blocks import random_blocks
from gguf import GGMLQuantizationType as QT
from test_cli import one_line_error
from test_gguf import add_tokenizer_metadata, llama_cpp_permute, train_byte_level_vocab

from weightsmith.checkpoint.gguf_reader import GGUFFile
from weightsmith.cpu_decode import prepare_cpu_decode
from weightsmith.generate import decode_one_token, prefill
from weightsmith.kv_cache import KVCache
from weightsmith.llm import load
from weightsmith.models.linear import Linear
from weightsmith.quant import weight_only as wo
from weightsmith.quant.ggml_linear import GGMLLinear

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 5
# (GGUF name, rows, columns) per layer; types per layer below.
MATRICES = [("attn_q", HIDDEN, HIDDEN), ("attn_k", 128, HIDDEN), ("attn_v", 128, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", INTER, HIDDEN), ("ffn_up", INTER, HIDDEN),
            ("ffn_down", HIDDEN, INTER)]  # fmt: skip
LAYER_TYPES = [
    [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q5_0, QT.Q4_1, QT.Q6_K],
    [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.F16, QT.Q6_K, QT.Q5_K, QT.Q4_K],
    [QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS, QT.Q3_K, QT.IQ4_XS, QT.Q2_K],
    [QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ1_M],
    [QT.TQ1_0, QT.TQ2_0, QT.MXFP4, QT.IQ3_S, QT.IQ2_S, QT.IQ1_M, QT.TQ2_0],
]
#: The types decoded by the row-major block kernels only (no 16-row tiled layout).
UNTILED = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"}
PROMPTS = [[3, 17, 40, 99, 5, 64], [8, 2, 77]]


def _matrix(qtype: QT, n: int, k: int, seed: int, permute_heads: int | None) -> np.ndarray:
    """The tensor as the file stores it: blocks (rows permuted for llama's q/k), or F16."""
    if qtype == QT.F16:
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.2
        return w.astype(np.float16)
    blocks = random_blocks(qtype, n, k, seed, scale=0.2, signed=False)
    return llama_cpp_permute(blocks, permute_heads) if permute_heads else blocks


@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    tok = train_byte_level_vocab("smollm")
    vocab = len(tok["tokens"])
    path = tmp_path_factory.mktemp("blocks") / "tiny-blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny blocks")
    for method, value in (("add_context_length", 128), ("add_embedding_length", HIDDEN),
                          ("add_feed_forward_length", INTER), ("add_block_count", LAYERS),
                          ("add_head_count", HEADS), ("add_head_count_kv", KV_HEADS),
                          ("add_layer_norm_rms_eps", 1e-5), ("add_rope_freq_base", 10000.0),
                          ("add_vocab_size", vocab)):  # fmt: skip
        getattr(writer, method)(value)
    add_tokenizer_metadata(writer, tok)
    rng = np.random.default_rng(0)
    embed = gguf.quants.quantize(0.2 * rng.standard_normal((vocab, HIDDEN)).astype(np.float32), QT.Q8_0)
    writer.add_tensor("token_embd.weight", embed, raw_dtype=QT.Q8_0)  # no output.weight: tied
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for layer, types in enumerate(LAYER_TYPES):
        for (name, n, k), qtype in zip(MATRICES, types, strict=True):
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name)
            data = _matrix(qtype, n, k, seed=100 * layer + len(name), permute_heads=heads)
            writer.add_tensor(
                f"blk.{layer}.{name}.weight", data, raw_dtype=None if qtype == QT.F16 else qtype
            )
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(
                f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def loads(block_file):
    return load(block_file, device="cpu", dtype="fp32"), load(
        block_file, device="cpu", dtype="fp32", keep_quantized=True
    )


def test_layers_are_the_files_blocks_bit_for_bit(loads, block_file):
    flt, blk = loads
    layers = {n: m for n, m in blk.model.named_modules() if isinstance(m, (GGMLLinear, wo.Int4Linear))}
    assert len(layers) == LAYERS * 7 - 1 + 1  # every matrix but the F16 one, and the head
    assert isinstance(blk.model.model.layers[1].self_attn.o_proj, Linear)  # F16: a float layer
    # Q4_1 blocks are exactly an int4 g32 layer's groups: kept as one (the int4 tile kernels run it).
    q4_1 = {n for n, m in layers.items() if isinstance(m, wo.Int4Linear)}
    assert q4_1 == {"model.layers.0.mlp.up_proj"} and layers[next(iter(q4_1))].group_size == 32
    kinds = {m.type_name for m in layers.values() if isinstance(m, GGMLLinear)}
    assert kinds == {t.name for ts in LAYER_TYPES for t in ts} - {"F16", "Q4_1"}
    assert layers["lm_head"].type_name == "Q8_0" and not blk.model.config.tie_word_embeddings
    floats = dict(flt.model.named_parameters())
    floats["lm_head.weight"] = flt.model.model.embed_tokens.weight  # tied in the float load
    for name, layer in layers.items():
        w = floats[f"{name}.weight"].detach()
        assert torch.equal(layer.dequantize().view(torch.int32), w.view(torch.int32)), name
    # Resident bytes: exactly the file's for these tensors (the budget is 1.1x).
    reader = GGUFFile.open(block_file)
    on_disk = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type not in (QT.F32, QT.F16))
    held = sum(t.nbytes for m in layers.values() for t in (*m.buffers(), *[m.tiles][: m.tiles is not None]))
    assert layers["model.layers.0.mlp.up_proj"].tiles is not None  # the decode layout's tiles: no other copy
    tiled = {n for n, m in layers.items() if isinstance(m, GGMLLinear) and m.tiles is not None}
    # Every type with a tiled layout has tiles: all the file's, in this layout.
    assert {layers[n].type_name for n in tiled} == {t.name for ts in LAYER_TYPES for t in ts} - {
        "F16",
        "Q4_1",
    } - UNTILED
    assert held == on_disk
    assert "GGUF blocks" in blk.checkpoint.quantization


def _decode(model, fused: bool):
    """Prefill PROMPTS, then 3 decode steps of 2 rows: logits (3, 2, V)."""
    cache = KVCache.for_model(model.config, len(PROMPTS), 32, dtype=torch.float32, device="cpu")
    plan = prepare_cpu_decode(model, layout=False) if fused else None
    step = decode_one_token if plan is None else plan.decode_step(decode_one_token)
    prefill(model, cache, PROMPTS, CPU)
    logits = torch.stack([step(model, cache, [t, t + 1], CPU) for t in (11, 23, 42)])
    if plan is not None:
        plan.undo()
    return logits


def test_logits_against_the_float_load(loads, monkeypatch, fused_calls):
    flt, blk = loads
    kernels_on(monkeypatch, True)
    ref = _decode(flt.model, fused=False)
    eager = _decode(blk.model, fused=False)  # the layers' kernels, one call each
    fused = _decode(blk.model, fused=True)  # the C step
    assert fused_calls == [2, 2, 2], "the fused step was not taken"
    scale = ref.abs().max().item()
    assert scale > 1.0  # logits that carry information
    # A long input runs the dequantized weights: the float load's logits up to summation order.
    rows = wo.TILED_KERNEL_MAX_ROWS + 1  # past the kernels' row limit in every layer, tiled or not
    ids = torch.tensor([(PROMPTS[0] * rows)[:rows]])
    with torch.no_grad():
        torch.testing.assert_close(blk.model(ids), flt.model(ids), rtol=1e-4, atol=1e-4 * scale)
    # Decode: the fused step computes what the layers' kernels compute, up to float rounding. That
    # rounding (the C step's exp and sums are not PyTorch's to the last bit) can flip an int8
    # rounding of some layer's input; the flip moves the layers below it by one int8 step, and
    # the logits by up to about 1e-2 of their scale (9e-3 seen on an AMD EPYC, AVX2: a flip in
    # the last down_proj's input moved ten of the head's input codes), against >= 1e-1 for a
    # wrong scale, zero or index. A flip written into the KV cache moves the later steps too.
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=2e-2 * scale)
    # ... which is, layer by layer, the float64 product of the kernels' int8-rounded input with
    # the weight the layer dequantizes to. (Layer by layer: through the whole model, a float
    # summation-order difference upstream can flip an input's int8 rounding downstream.)
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach(), out.detach())))
        for m in blk.model.modules()
        if isinstance(m, (GGMLLinear, wo.Int4Linear))
    ]
    try:
        _decode(blk.model, fused=False)
    finally:
        for hook in hooks:
            hook.remove()
    kernel_calls = [(mod, x, out) for mod, x, out in seen if x.numel() <= mod.kernel_rows() * mod.in_features]
    for mod, x, out in kernel_calls:
        bias = 0 if mod.bias is None else mod.bias.double()
        assert_matches(out, quantize_act(x)[0] @ mod.dequantize().double().T + bias)
    kinds = {
        getattr(m, "type_name", "int4") + ("/tiles" if m.tiles is not None else "")
        for m, _, _ in kernel_calls
    }
    tiled = (
        "Q4_0",
        "Q5_0",
        "Q5_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_0",
        "IQ4_NL",
        "IQ4_XS",
        "int4",
    )
    assert {f"{t}/tiles" for t in tiled} <= kinds
    # Against the unrounded float load: the activations' rounding only.
    assert (eager - ref).abs().max().item() < 0.05 * scale


def test_generate_matches_the_pytorch_path(block_file, capsys, monkeypatch, fused_calls):
    from weightsmith.cpu_decode import plan as cpu_plan

    # Greedy: the two steps' logits differ by up to 2e-2 of their scale (an int8 rounding flipped:
    # test_logits_against_the_float_load), which a sampled token may cross however it is drawn;
    # the whole distribution is compared there.
    argv = ["generate", str(block_file), "--keep-quantized", "-p", "the cat", "-n", "12", "--temperature", "0",
            "--json"]  # fmt: skip
    kernels_on(monkeypatch, True)
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    taken = len(fused_calls)
    assert taken, "the fused step was not taken"
    monkeypatch.setattr(cpu_plan.CpuDecodePlan, "fused", lambda self: None)  # the PyTorch step
    code, out_pytorch, err = run_cli(argv, capsys)
    assert code == 0, err
    assert len(fused_calls) == taken, "the fused step ran on the PyTorch path"
    fused, pytorch = json.loads(out), json.loads(out_pytorch)
    assert fused["text"] == pytorch["text"] and fused["usage"] == pytorch["usage"]
    assert len(set(fused["text"])) > 3  # a text that tells the paths apart


def test_refusals_are_one_line(block_file, tiny_hf_dir, capsys, tmp_path):
    one_line_error(capsys, ["generate", str(tiny_hf_dir), "--keep-quantized", "-p", "x"],
                   expect_in=["--keep-quantized", ".gguf"])  # fmt: skip


@pytest.fixture(scope="module")
def block_adapter(block_file, tmp_path_factory):
    """A LoRA adapter on every projection (r=4, random A and B) for the block file's model."""
    from weightsmith.lora import LoraConfig, apply_lora, save_adapter

    model = load(block_file, device="cpu", dtype="fp32").model
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    apply_lora(model, cfg)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return save_adapter(model, tmp_path_factory.mktemp("block-adapter") / "adapter", cfg)


def test_an_adapter_runs_beside_the_blocks(block_file, block_adapter, loads, monkeypatch, fused_calls):
    """`keep_quantized` with an adapter: each layer keeps the file's blocks and adds s B A x; a long
    input gives the float load's logits with the adapter folded in, and decoding through the C
    step computes what the PyTorch path computes (up to the kernels' input rounding, as without)."""
    from weightsmith.lora import LoRALinear

    flt = loads[0]
    kept = load(block_file, device="cpu", dtype="fp32", keep_quantized=True, adapter=block_adapter)
    merged = load(block_file, device="cpu", dtype="fp32", adapter=block_adapter)
    q = kept.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base_layer, GGMLLinear)
    rows = wo.TILED_KERNEL_MAX_ROWS + 1
    ids = torch.tensor([(PROMPTS[0] * rows)[:rows]])
    with torch.no_grad():
        want, got, base = merged.model(ids), kept.model(ids), flt.model(ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    assert (want - base).abs().max().item() > 0.05 * scale  # the adapter counts
    kernels_on(monkeypatch, True)
    eager = _decode(kept.model, fused=False)
    fused = _decode(kept.model, fused=True)
    assert fused_calls == [2, 2, 2], "the fused step was not taken"
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=2e-2 * scale)


def test_generate_and_serve_run_an_adapter_beside_the_blocks(
    block_file, block_adapter, capsys, monkeypatch, tmp_path
):
    """`generate --keep-quantized --adapter` (the C step, and the PyTorch step) and `serve
    --keep-quantized --adapter NAME=FILE.gguf` (llama.cpp's adapter format) answer alike."""
    import httpx

    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict
    from weightsmith.cpu_decode import plan as cpu_plan
    from weightsmith.lora.files import write_gguf_adapter_file

    kernels_on(monkeypatch, True)
    argv = ["generate", str(block_file), "--keep-quantized", "-p", "the cat", "-n", "10", "--temperature", "0",
            "--json"]  # fmt: skip
    texts = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(block_adapter)])):
        code, out, err = run_cli(argv + extra, capsys)
        assert code == 0, err
        texts[name] = json.loads(out)["text"]
    assert texts["adapter"] != texts["base"]
    with monkeypatch.context() as m:
        m.setattr(cpu_plan.CpuDecodePlan, "fused", lambda self: None)  # the PyTorch step
        code, out, err = run_cli(argv + ["--adapter", str(block_adapter)], capsys)
    assert code == 0, err
    assert json.loads(out)["text"] == texts["adapter"]
    config = load(block_file, device="cpu", dtype="fp32").model.config
    write_gguf_adapter_file(block_adapter, config, tmp_path / "tone.gguf", "f32")
    cfg = config_from_dict(
        ServeConfig,
        {"model": str(block_file), "served_name": "blocks", "port": 0, "keep_quantized": True,
         "adapter": [f"tone={tmp_path / 'tone.gguf'}"]},
    )  # fmt: skip
    running = start_server(cfg)
    try:
        answers = {}
        for model in ("blocks", "blocks:tone"):
            body = {"model": model, "prompt": "the cat", "max_tokens": 10, "temperature": 0}
            r = httpx.post(running.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answers[model] = r.json()["choices"][0]["text"]
    finally:
        running.stop()
    assert answers == {"blocks": texts["base"], "blocks:tone": texts["adapter"]}


def test_saving_refuses_and_export_state_dequantizes(loads, tmp_path):
    from weightsmith.checkpoint.quantized import float_state, save_quantized
    from weightsmith.errors import CheckpointError

    flt, blk = loads
    with pytest.raises(CheckpointError, match="keep_quantized"):
        save_quantized(blk.model, blk.tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    state = float_state(blk.model, blk.model.config, "test")  # what `export` writes to GGUF
    assert torch.equal(state["lm_head.weight"], flt.model.model.embed_tokens.weight)
    assert torch.equal(
        state["model.layers.0.mlp.down_proj.weight"], flt.model.model.layers[0].mlp.down_proj.weight
    )


def test_serve_keeps_the_blocks_and_answers_like_generate(block_file, capsys, monkeypatch, fused_calls):
    """`serve --keep-quantized` runs the file's blocks (the server's batches through the fused C
    step): a greedy completion equals `generate --keep-quantized`'s."""
    import httpx

    from weightsmith.commands.serve import ServeConfig, start_server
    from weightsmith.config import config_from_dict

    kernels_on(monkeypatch, True)
    argv = ["generate", str(block_file), "--keep-quantized", "-p", "the cat", "-n", "10", "--temperature", "0",
            "--json"]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    cfg = config_from_dict(
        ServeConfig, {"model": str(block_file), "served_name": "blocks", "port": 0, "keep_quantized": True}
    )
    running = start_server(cfg)
    try:
        model = running.state.loaded.llm.model
        assert isinstance(model.model.layers[0].self_attn.q_proj, GGMLLinear)
        fused_calls.clear()
        body = {"model": "blocks", "prompt": "the cat", "max_tokens": 10, "temperature": 0}
        r = httpx.post(running.url + "/v1/completions", json=body, timeout=120)
    finally:
        running.stop()
    assert r.status_code == 200, r.text
    assert fused_calls, "the server's steps did not take the fused C step"
    assert r.json()["choices"][0]["text"] == json.loads(out)["text"]


@pytest.mark.parametrize("family", ["qwen3moe", "mixtral"])
def test_merged_experts_are_kept_as_each_experts_blocks(family, tmp_path, monkeypatch, fused_calls):
    """A mixture of experts' merged expert tensors (`ffn_{gate,up,down}_exps`: every expert's
    matrix stacked, quantized as one) are kept as one GGMLLinear per expert, each exactly that
    expert's slice of the file's blocks: nothing dequantized, resident bytes the file's. The
    routers stay float. Decoding (the PyTorch MoE path and the fused C step) computes what the
    float load computes up to the kernels' int8 rounding of the inputs."""
    import transformers
    from test_gguf_kquants import WIDE, build

    from weightsmith.checkpoint.gguf_write import export_gguf

    shape = {**WIDE, "num_hidden_layers": 2, "intermediate_size": 256}
    if family == "mixtral":
        cls, cfg = (
            transformers.MixtralForCausalLM,
            transformers.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2),
        )
    else:
        cls, cfg = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
            **shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64,
            norm_topk_prob=True,
        )  # fmt: skip
    out = tmp_path / f"{family}.gguf"
    export_gguf(build(tmp_path / family, cls, cfg), out, "q4_k_m")
    flt = load(out, device="cpu", dtype="fp32")
    blk = load(out, device="cpu", dtype="fp32", keep_quantized=True)
    experts = {n: m for n, m in blk.model.named_modules() if ".experts." in n and isinstance(m, GGMLLinear)}
    assert len(experts) == 2 * 4 * 3 and {m.type_name for m in experts.values()} <= {"Q4_K", "Q6_K"}
    floats = dict(flt.model.named_parameters())
    for name, layer in experts.items():
        assert torch.equal(
            layer.dequantize().view(torch.int32), floats[f"{name}.weight"].view(torch.int32)
        ), name
    routers = [m for n, m in blk.model.named_modules() if n.endswith((".gate", ".block_sparse_moe.gate"))]
    assert routers and all(isinstance(r, Linear) for r in routers)
    on_disk = sum(int(t.n_bytes) for t in GGUFFile.open(out).tensors if "_exps" in t.name)
    held = sum(t.nbytes for m in experts.values() for t in (*m.buffers(), *[m.tiles][: m.tiles is not None]))
    assert held == on_disk
    from weightsmith.checkpoint.quantized import float_state

    state = float_state(blk.model, blk.model.config, "test")  # what `export` writes: every expert back
    assert all(torch.equal(state[f"{name}.weight"], floats[f"{name}.weight"]) for name in experts)
    kernels_on(monkeypatch, True)
    ref = _decode(flt.model, fused=False)
    eager = _decode(blk.model, fused=False)
    fused = _decode(blk.model, fused=True)
    assert fused_calls == [2, 2, 2], "the fused step was not taken"
    scale = ref.abs().max().item()
    assert (eager - ref).abs().max().item() < 0.05 * scale
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=2e-2 * scale)
