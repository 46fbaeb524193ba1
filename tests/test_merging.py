"""`weightsmith merge --fork`: several forks of one base merged into one model.

Parity is with mergekit itself (a test-only dependency): the same forks merged by
`mergekit.merge.run_merge` from a configuration that says what our flags say give the same
tensors, for each deterministic method, with LoRA adapters as forks (mergekit's
`base+adapter` references, merged by PEFT) and with SLERP's per-layer, per-filter `t`. DARE's
random drop is checked against PEFT's `random_pruning` drawing from the same seed, and by
what it must do on average.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import build_tiny_hf_dir
from safetensors.torch import load_file

from weightsmith.cli.main import main
from weightsmith.merging.merge import tensor_generator
from weightsmith.merging.methods import combine, drop, elected, slerp, trim

mergekit_merge = pytest.importorskip("mergekit.merge")
mergekit_config = pytest.importorskip("mergekit.config")


@pytest.fixture(scope="module")
def forks(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, two full fine-tunes of it (every tensor moved), two LoRA adapters on it."""
    root = tmp_path_factory.mktemp("merging")
    base = build_tiny_hf_dir(root / "base", tie_word_embeddings=False)
    out = {"base": base}
    for name, seed in (("a", 1), ("b", 2)):
        shutil.copytree(base, root / name)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        out[name] = root / name
    targets = {
        "lora1": ["q_proj", "v_proj", "down_proj"],
        "lora2": ["q_proj", "o_proj", "up_proj", "down_proj"],
    }
    for seed, (name, modules) in enumerate(targets.items(), 3):
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tuned.save_pretrained(root / name)
        out[name] = root / name
    return out


def mergekit(config: dict, out: Path) -> dict[str, torch.Tensor]:
    conf = mergekit_config.MergeConfiguration.model_validate({"dtype": "float32", **config})
    options = mergekit_merge.MergeOptions(
        quiet=True, write_model_card=False, lora_merge_cache=str(out) + "-loras"
    )
    mergekit_merge.run_merge(conf, str(out), options)
    return load_file(out / "model.safetensors")


def ours(base: Path, args: list[str], out: Path) -> dict[str, torch.Tensor]:
    assert main(["merge", str(base), *args, "--out", str(out)]) == 0
    return load_file(out / "model.safetensors")


def assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert set(ref) == set(got)
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    assert worst <= tol, worst


def fork_args(paths: list[Path]) -> list[str]:
    return [a for p in paths for a in ("--fork", str(p))]


# --- parity with mergekit -------------------------------------------------------------

CASES = {
    "linear": ({}, ["--weights", "0.3,0.7"], {"weight": [0.3, 0.7]}),
    "task_arithmetic": ({"lambda": 0.8}, ["--weights", "0.6,0.9", "--scale", "0.8"], {"weight": [0.6, 0.9]}),
    "ties": ({}, ["--weights", "0.5,1", "--density", "0.4"], {"weight": [0.5, 1.0], "density": [0.4, 0.4]}),
    "breadcrumbs": (
        {}, ["--weights", "1,0.7", "--density", "0.6", "--gamma", "0.05"],
        {"weight": [1.0, 0.7], "density": [0.6, 0.6], "gamma": [0.05, 0.05]},
    ),
    "breadcrumbs_ties": (
        {}, ["--density", "0.5,0.8", "--gamma", "0.1"], {"weight": [1.0, 1.0], "density": [0.5, 0.8], "gamma": [0.1, 0.1]},
    ),
    "ties-unnormalized": (
        {"normalize": False}, ["--weights", "1,0.8", "--density", "0.3,0.7", "--normalize", "no"],
        {"weight": [1.0, 0.8], "density": [0.3, 0.7]},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["full", "adapters"])
def test_task_vector_methods_equal_mergekit(case, kind, forks, tmp_path):
    shared, flags, per_model = CASES[case]
    method = case.split("-")[0]
    mine = [forks["a"], forks["b"]] if kind == "full" else [forks["lora1"], forks["lora2"]]
    refs = [str(p) if kind == "full" else f"{forks['base']}+{p}" for p in mine]
    models = [
        {"model": ref, "parameters": {k: v[i] for k, v in per_model.items()}} for i, ref in enumerate(refs)
    ]
    config = {"merge_method": method, "models": models, "parameters": shared}
    if method != "linear":
        config["base_model"] = str(forks["base"])
    ref = mergekit(config, tmp_path / "mergekit")
    got = ours(forks["base"], [*fork_args(mine), "--method", method, *flags], tmp_path / "ours")
    assert_same(ref, got)
    if kind == "adapters":  # a tensor no adapter touches is the base's, bit for bit
        base = load_file(forks["base"] / "model.safetensors")
        assert torch.equal(
            got["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
        )


@pytest.mark.parametrize("kind", ["full", "adapters"])
def test_model_stock_equals_mergekit(kind, forks, tmp_path):
    mine = [forks["a"], forks["b"]] if kind == "full" else [forks["lora1"], forks["lora2"]]
    refs = [str(p) if kind == "full" else f"{forks['base']}+{p}" for p in mine]
    config = {
        "merge_method": "model_stock",
        "base_model": str(forks["base"]),
        "models": [{"model": r} for r in refs],
    }
    ref = mergekit(config, tmp_path / "mergekit")
    got = ours(forks["base"], [*fork_args(mine), "--method", "model_stock"], tmp_path / "ours")
    assert_same(ref, got)


def test_slerp_with_a_gradient_and_filters_equals_mergekit(forks, tmp_path):
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.2]}, {"value": 0.35}]
    config = {"merge_method": "slerp", "base_model": str(forks["a"]), "parameters": {"t": t},
              "models": [{"model": str(forks["a"])}, {"model": str(forks["b"])}]}  # fmt: skip
    ref = mergekit(config, tmp_path / "mergekit")
    flags = ["--method", "slerp", "--t", "self_attn=0,0.5,1", "--t", "mlp=1,0.2", "--t", "0.35"]
    got = ours(forks["base"], [*fork_args([forks["a"], forks["b"]]), *flags], tmp_path / "ours")
    assert_same(ref, got)


def test_slerp_from_the_base_to_an_adapter_fork_equals_mergekit(forks, tmp_path):
    """The model itself as the first fork: SLERP from the base towards a fine-tune."""
    lora = f"{forks['base']}+{forks['lora1']}"
    config = {"merge_method": "slerp", "base_model": str(forks["base"]), "parameters": {"t": 0.4},
              "models": [{"model": str(forks["base"])}, {"model": lora}]}  # fmt: skip
    ref = mergekit(config, tmp_path / "mergekit")
    flags = [*fork_args([forks["base"], forks["lora1"]]), "--method", "slerp", "--t", "0.4"]
    assert_same(ref, ours(forks["base"], flags, tmp_path / "ours"))


def test_an_adapter_and_a_full_fork_merge_together(forks, tmp_path):
    models = [{"model": str(forks["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
              {"model": f"{forks['base']}+{forks['lora2']}", "parameters": {"weight": 0.4, "density": 0.5}}]  # fmt: skip
    ref = mergekit(
        {"merge_method": "ties", "base_model": str(forks["base"]), "models": models}, tmp_path / "mk"
    )
    flags = [
        *fork_args([forks["a"], forks["lora2"]]),
        "--method",
        "ties",
        "--weights",
        "0.7,0.4",
        "--density",
        "0.5",
    ]
    assert_same(ref, ours(forks["base"], flags, tmp_path / "ours"))


def test_mixture_of_experts_forks_merge_as_mergekit_merges_them(tmp_path):
    """Mixtral: experts are saved one tensor per expert and projection (the checkpoint's layout);
    element-wise methods equal mergekit's (which sees transformers 5's fused expert tensors),
    compared as transformers loads both."""
    from conftest import TINY_SHAPE, build_tiny_tokenizer_dir

    paths = []
    for seed in range(3):
        build_tiny_tokenizer_dir(tmp_path / f"m{seed}")
        torch.manual_seed(0)
        config = transformers.MixtralConfig(
            **TINY_SHAPE, num_local_experts=4, num_experts_per_tok=2, eos_token_id=2
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (seed > 0))
        model.save_pretrained(tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    base, a, b = paths
    models = [
        {"model": str(a), "parameters": {"weight": 0.7}},
        {"model": str(b), "parameters": {"weight": 0.4}},
    ]
    mergekit({"merge_method": "task_arithmetic", "base_model": str(base), "models": models}, tmp_path / "mk")
    ours(base, [*fork_args([a, b]), "--method", "task_arithmetic", "--weights", "0.7,0.4"], tmp_path / "ours")
    ref, got = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("mk", "ours")
    )
    assert set(ref) == set(got) and any("experts" in k for k in ref)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6


def test_one_adapter_fork_is_the_adapter_folded_in(forks, tmp_path):
    folded = ours(forks["base"], ["--adapter", str(forks["lora1"])], tmp_path / "folded")
    for method in ("task_arithmetic", "linear"):
        merged = ours(forks["base"], [*fork_args([forks["lora1"]]), "--method", method], tmp_path / method)
        assert_same(folded, merged, tol=0.0)


def test_a_gguf_model_merges_as_its_hf_folder_does(forks, tmp_path):
    """The default model is a .gguf file: adapters merge onto it, and the file itself as a
    --fork is the base (SLERP from it), as with the HF folder it was exported from."""
    gguf = tmp_path / "base.gguf"
    assert main(["export", str(forks["base"]), "--quant", "f32", "--out", str(gguf)]) == 0
    flags = ["--method", "slerp", "--t", "0.3,0.8"]
    from_hf = ours(forks["base"], [*fork_args([forks["base"], forks["lora2"]]), *flags], tmp_path / "hf")
    from_gguf = ours(gguf, [*fork_args([gguf, forks["lora2"]]), *flags], tmp_path / "gguf")
    assert_same(from_hf, from_gguf, tol=1e-6)


# --- DARE -----------------------------------------------------------------------------


def test_dare_drop_equals_peft_random_pruning_from_the_same_seed():
    delta = torch.randn(64, 48)
    torch.manual_seed(11)
    ref = peft.utils.merge_utils.random_pruning(delta, 0.3, rescale=True)
    got = drop(delta, 0.3, torch.Generator().manual_seed(11))
    assert torch.allclose(got, ref, atol=1e-7)


def test_dare_keeps_a_density_share_and_the_expected_delta():
    delta = torch.randn(400_000)
    kept = drop(delta, 0.25, torch.Generator().manual_seed(0))
    share = (kept != 0).float().mean().item()
    assert abs(share - 0.25) < 0.005  # 400k Bernoulli(0.25) draws: sd 0.0007
    assert torch.allclose(kept[kept != 0], delta[kept != 0] / 0.25)
    means = torch.stack([drop(torch.ones(4000), 0.25, torch.Generator().manual_seed(s)) for s in range(200)])
    assert abs(means.mean().item() - 1.0) < 0.02  # unbiased: E[kept / density] = delta


def test_dare_merges_are_seeded_and_reproducible(forks, tmp_path):
    flags = [*fork_args([forks["a"], forks["b"]]), "--method", "dare_ties", "--density", "0.5"]
    first = ours(forks["base"], [*flags, "--seed", "3"], tmp_path / "one")
    again = ours(forks["base"], [*flags, "--seed", "3"], tmp_path / "two")
    other = ours(forks["base"], [*flags, "--seed", "4"], tmp_path / "three")
    assert_same(first, again, tol=0.0)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    dense = ours(
        forks["base"], [*fork_args([forks["a"], forks["b"]]), "--method", "task_arithmetic"], tmp_path / "ta"
    )
    full = ours(
        forks["base"], [*fork_args([forks["a"], forks["b"]]), "--method", "dare_linear"], tmp_path / "d1"
    )
    assert_same(dense, full)  # density 1 drops nothing
    # each fork's mask differs, and does not depend on the other tensors
    g1, g2 = tensor_generator(3, 0, "x.weight"), tensor_generator(3, 1, "x.weight")
    assert not torch.equal(torch.rand(50, generator=g1), torch.rand(50, generator=g2))


# --- the tensor functions --------------------------------------------------------------


def test_ties_pieces_by_hand():
    d = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-1.0, -2.0, 0.25, 1.0]])
    assert torch.equal(trim(d[0], 0.5), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    assert torch.equal(elected(d), torch.tensor([[True, True, True, True], [False, True, True, False]]))
    # sums 2, -3, 0.75, -3: entry 0 keeps fork 0 (3 / 1), entry 1 both ((-1 - 2) / 2), ...
    got = combine(d, [1.0, 1.0], elect=True, normalize=True)
    assert torch.allclose(got, torch.tensor([3.0, -1.5, 0.375, -4.0]))
    assert torch.allclose(combine(d, [0.5, 2.0], elect=False, normalize=True), (0.5 * d[0] + 2 * d[1]) / 2.5)


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_falls_back_to_lerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([0.5**0.5, 0.5**0.5]))
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: a straight line


# --- what is refused, before any work ---------------------------------------------------


def test_lineage_names_every_fork(forks, tmp_path):
    out = tmp_path / "m"
    ours(
        forks["base"], [*fork_args([forks["lora1"], forks["a"]]), "--method", "ties", "--density", "0.5"], out
    )
    record = json.loads((out / "lineage.json").read_text())
    assert record["kind"] == "merge"
    roles = [i["role"] for i in record["inputs"]]
    assert roles.count("forks") == 2 and "model" in roles
    assert record["config"]["method"] == "ties" and record["metrics"]["tensors"] > 0


def test_a_merged_models_card_names_the_forks_and_the_recipe(forks, tmp_path):
    out = tmp_path / "m"
    ours(forks["base"], [*fork_args([forks["lora1"], forks["lora2"]]), "--method", "dare_ties",
                         "--weights", "1,0.5", "--density", "0.5", "--seed", "7"], out)  # fmt: skip
    evals = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(out),
                "--tasks",
                "builtin:arith-mc",
                "--limit",
                "2",
                "--no-cache",
                "--out",
                str(evals),
            ]
        )
        == 0
    )
    assert main(["card", str(out), "--eval", str(evals), "--out", str(tmp_path / "README.md")]) == 0
    text = (tmp_path / "README.md").read_text()
    recipe = f"**merge** (dare_ties of `{forks['lora1']}`, `{forks['lora2']}`; weights 1.0, 0.5; density 0.5; seed 7)"
    assert recipe in text


@pytest.fixture(scope="module")
def misfits(forks, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("misfits")
    return {
        "vocab": build_tiny_hf_dir(root / "vocab", vocab_size=352, tie_word_embeddings=False),
        "tied": build_tiny_hf_dir(root / "tied", tie_word_embeddings=True),
    }


def refusal(capsys, argv: list[str], code: int) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize(
    "flags, code, says",
    [
        (["--fork", "{a}", "--fork", "{b}", "--fork", "{a}", "--method", "slerp", "--t", "0.5"], 2, "exactly 2 --fork"),
        (["--fork", "{a}", "--fork", "{b}", "--method", "slerp"], 2, "needs --t"),
        (["--fork", "{a}", "--fork", "{b}", "--weights", "1,2,3"], 2, "3 values for 2 forks"),
        (["--fork", "{a}", "--method", "ties", "--density", "0"], 2, "--density 0"),
        (["--fork", "{a}", "--density", "0.5"], 2, "not linear"),
        (["--fork", "{a}", "--t", "0.5"], 2, "--t is SLERP's"),
        (["--fork", "{a}", "--method", "ties", "--gamma", "0.1"], 2, "--gamma applies to breadcrumbs"),
        (["--fork", "{a}", "--method", "model_stock"], 2, "at least 2 --fork"),
        (["--fork", "{a}", "--fork", "{b}", "--method", "model_stock", "--weights", "1,2"], 2, "no --weights"),
        (["--fork", "{a}", "--fork", "{b}", "--method", "slerp", "--t", "mlp=0,2"], 2, "2 is outside [0, 1]"),
        (["--fork", "{a}", "--fork", "{b}", "--method", "slerp", "--t", "mlp=0.5"], 2, "no value for tensor"),
        (["--fork", "{a}", "--adapter", "{lora1}"], 2, "one more --fork"),
        (["--fork", "{vocab}"], 1, "model.embed_tokens.weight has shape (352, 64), the base's is (320, 64)"),
        (["--fork", "{tied}"], 1, "tie_word_embeddings is True, the base's is False"),
        (["--fork", "{missing}"], 1, "not found"),
        (["--fork", "{a}", "--as-adapter"], 2, "({a}) needs --rank R"),
        (["--fork", "{lora1}", "--rank", "4"], 2, "add --as-adapter"),
        (["--fork", "{lora1}", "--as-adapter", "--rank", "0"], 2, "at least 1"),
        (["--adapter", "{lora1}", "--as-adapter"], 2, "give the forks"),
    ],
)  # fmt: skip
def test_bad_merges_are_one_line_and_write_nothing(flags, code, says, forks, misfits, tmp_path, capsys):
    names = {**{k: str(v) for k, v in forks.items()}, **{k: str(v) for k, v in misfits.items()}}
    names["missing"] = str(tmp_path / "nowhere")
    out = tmp_path / "out"
    err = refusal(
        capsys, ["merge", str(forks["base"]), *[f.format(**names) for f in flags], "--out", str(out)], code
    )
    assert says.format(**names) in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# --- a merge written as an adapter ------------------------------------------------------


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_adapter_forks_merged_as_an_adapter_are_the_merge(forks, tmp_path):
    """Linear merges of adapters have rank <= the sum of theirs: the adapter is exact, and PEFT
    (loading it, merging it) gives the model `merge --fork` writes."""
    flags = [
        *fork_args([forks["lora1"], forks["lora2"]]),
        "--method",
        "task_arithmetic",
        "--weights",
        "0.6,0.9",
    ]
    model = ours(forks["base"], flags, tmp_path / "model")
    assert (
        main(["merge", str(forks["base"]), *flags, "--as-adapter", "--out", str(tmp_path / "adapter")]) == 0
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    got = peft_merged(forks["base"], tmp_path / "adapter")
    assert_same(model, {k: got[k] for k in model}, tol=2e-6)


def test_a_merged_adapter_equals_peft_svd_combination(forks, tmp_path):
    """PEFT's add_weighted_adapter(combination_type="svd") factors the weighted sum the same way."""
    flags = [
        *fork_args([forks["lora1"], forks["lora2"]]),
        "--method",
        "task_arithmetic",
        "--weights",
        "0.5,1.5",
    ]
    assert (
        main(
            ["merge", str(forks["base"]), *flags, "--as-adapter", "--rank", "3", "--out", str(tmp_path / "a")]
        )
        == 0
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(forks["base"])
    model = peft.PeftModel.from_pretrained(hf, forks["lora1"], adapter_name="one")
    model.load_adapter(forks["lora2"], adapter_name="two")
    model.add_weighted_adapter(["one", "two"], [0.5, 1.5], "svd3", combination_type="svd", svd_rank=3)
    model.set_adapter("svd3")
    ref = {k: v.detach() for k, v in model.merge_and_unload(adapter_names=["svd3"]).state_dict().items()}
    got = peft_merged(forks["base"], tmp_path / "a")
    assert_same(ref, {k: got[k] for k in ref}, tol=2e-6)


def test_a_full_fork_becomes_an_adapter_of_its_best_rank_r_deltas(forks, tmp_path, capsys):
    """LoRA extraction: each linear's delta is the truncated SVD of (fork - base); what a LoRA
    cannot hold (norms, embeddings, the head) is reported, not silently kept or lost."""
    out = tmp_path / "extracted"
    flags = [
        "--fork",
        str(forks["a"]),
        "--method",
        "task_arithmetic",
        "--as-adapter",
        "--rank",
        "5",
        "--json",
    ]
    assert main(["merge", str(forks["base"]), *flags, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rank"] == 5 and result["layers"] == 14  # 7 linears x 2 layers
    assert result["left_out_tensors"] == 7  # embeddings, 4 layer norms, final norm, LM head
    assert 0 < result["energy_kept_min"] < 1
    base, fork = load_file(forks["base"] / "model.safetensors"), load_file(forks["a"] / "model.safetensors")
    got = peft_merged(forks["base"], out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        u, s, vh = torch.linalg.svd(fork[name] - base[name])
        best = base[name] + (u[:, :5] * s[:5]) @ vh[:5]
        assert torch.allclose(got[name], best, atol=2e-6)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])
    # mergekit's own extraction of the same fork at the same rank: the same factors
    import subprocess
    import sys

    extract = Path(sys.executable).with_name("mergekit-extract-lora")
    subprocess.run([str(extract), "--model", str(forks["a"]), "--base-model", str(forks["base"]),
                    "--out-path", str(tmp_path / "mk"), "--max-rank", "5"], check=True, capture_output=True)  # fmt: skip
    ref, mine = (
        load_file(tmp_path / "mk" / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    linear = {k: v for k, v in ref.items() if "lora_" in k}
    assert set(linear) == set(mine)
    assert max((linear[k] - mine[k]).abs().max().item() for k in linear) <= 1e-5
