"""Turn a checkpoint on disk (HF directory or GGUF file) into a ready model and tokenizer.

Opens the files, reads config, tokenizer and generation config, and hands the tensors
to a builder: `build_model` (checkpoint/build.py) for full-precision weights, or
weightsmith.checkpoint.quantized for a directory saved by `weightsmith quantize`. Not here:
finding a model by name (pull.py), building the model from tensors (build.py) or file
formats (safetensors.py, gguf.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from weightsmith.checkpoint import safetensors as st
from weightsmith.checkpoint.build import TensorHook, build_model
from weightsmith.checkpoint.pooling import folder_pooling, gguf_pooling
from weightsmith.errors import CheckpointError
from weightsmith.files import read_json
from weightsmith.models import CausalLM, ModelConfig

if TYPE_CHECKING:
    from weightsmith.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A loaded model with everything needed to run it."""

    model: CausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str  # "hf" or "gguf"
    quantization: str | None = None  # e.g. "Q4_1" for GGUF sources
    generation_config: dict[str, Any] = field(default_factory=dict)
    score: torch.Tensor | None = None  # a reward model's (`*ForSequenceClassification`) score head
    #: How the checkpoint pools an embedding, where it says (checkpoint/pooling.py): "last", ...
    pooling: str | None = None


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    decode_layout: bool = True,
    on_tensor: TensorHook | None = None,
    keep_quantized: bool = False,
    reward: bool = False,
) -> Checkpoint:
    """Load an HF directory or a .gguf file.

    reward: the folder may be a reward model (`*ForSequenceClassification`, `weightsmith reward
    --method full`): its score head comes back as `Checkpoint.score`. Without it such a folder
    is refused (it scores text; it has no LM head to generate with).

    keep_quantized: a GGUF file's matrices in the quantized types the C kernels run stay in
    their blocks (GGMLLinear layers, weightsmith.checkpoint.gguf_quants) instead of being
    dequantized to `dtype`; CPU only. Refused for an HF directory.

    decode_layout: ignored, kept for callers that pass it: the model comes back in plain HF
    layout, and the `Engine` that decodes it lays it out for the CPU (weightsmith.cpu_decode).
    on_tensor: called as on_tensor(model, name) after each tensor is in place, e.g. to
    quantize a layer as soon as it is complete, so the full-precision model never
    exists at once (QLoRA).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such file or directory; pass an HF checkpoint directory or a .gguf file"
        )
    start = time.perf_counter()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{path}: not a .gguf file; pass an HF checkpoint directory or a .gguf file"
            )
        ckpt = _load_gguf(path, torch.device(device), dtype, decode_layout, on_tensor, keep_quantized)
    elif (path / "config.json").exists():
        pooling = folder_pooling(path)  # a bad sentence-transformers layout stops before the weights
        ckpt = _load_hf_dir(
            path, torch.device(device), dtype, allow_pickle, decode_layout, on_tensor, keep_quantized, reward
        )
        ckpt.pooling = pooling
    else:
        raise CheckpointError(f"{path}: directory has no config.json; it is not an HF checkpoint directory")
    log.info("loaded %s (%s) in %.1fs", path, ckpt.config.model_type, time.perf_counter() - start)
    return ckpt


def _load_hf_dir(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool,
    decode_layout: bool,
    on_tensor: TensorHook | None,
    keep_quantized: bool = False,
    reward: bool = False,
) -> Checkpoint:
    from weightsmith.checkpoint import quantized as quant_ckpt
    from weightsmith.tokenizer import Tokenizer

    data = read_json(path / "config.json")
    if reward_head(data) != reward:
        raise CheckpointError(
            f"{path}: a reward model (it scores text, it cannot generate); use it as grpo --reward model:{path}"
            if not reward
            else f"{path}: a language model, not a reward model (train one with weightsmith reward)"
        )
    cfg = ModelConfig.from_hf(data, source=str(path / "config.json"))
    mxfp4 = (data.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    if keep_quantized and not (mxfp4 and device.type == "cpu" and on_tensor is None):
        raise CheckpointError(
            f"{path}: keep_quantized (--keep-quantized) applies to .gguf files and to gpt-oss's MXFP4 folders "
            "on the CPU without QLoRA; this HF directory loads as it is stored (a `weightsmith quantize` "
            "folder is already quantized)"
        )
    qcfg = quant_ckpt.read_quantization_config(data, str(path / "config.json"))
    gen = st.read_generation_config(path)  # checked before the weights load
    files = st.weight_files(path, allow_pickle=allow_pickle)
    tokenizer = Tokenizer.from_dir(path)
    tensors = ((n, t, str(f)) for n, t, f in st.iter_tensors(files))
    if qcfg is not None:  # int8/int4 layers built from the stored codes, never requantized
        model = quant_ckpt.build_quantized_model(
            cfg, qcfg, tensors, device, dtype, decode_layout=decode_layout
        )
    elif keep_quantized:  # gpt-oss's MXFP4 experts as ggml blocks, read by the C kernels
        skeleton = _mxfp4_skeleton(cfg)
        model = build_model(cfg, tensors, device, dtype, skeleton=skeleton)
        return Checkpoint(model, tokenizer, cfg, path, "hf", "MXFP4 (experts kept as blocks)", gen)
    elif reward_head(data):  # a reward model: its score head apart; no LM head (tied, for the build)
        score: dict[str, torch.Tensor] = {}
        built = dataclasses.replace(cfg, tie_word_embeddings=True)
        model = build_model(built, _score_apart(tensors, score), device, dtype, decode_layout=decode_layout)
        if "score.weight" not in score:
            raise CheckpointError(
                f"{path}: a sequence-classification checkpoint without score.weight; re-save it"
            )
        return Checkpoint(model, tokenizer, cfg, path, "hf", None, gen, score["score.weight"])
    else:
        model = build_model(cfg, tensors, device, dtype, decode_layout=decode_layout, on_tensor=on_tensor)
    return Checkpoint(model, tokenizer, cfg, path, "hf", quant_ckpt.describe(qcfg), gen)


def reward_head(config: dict[str, Any]) -> bool:
    """Whether an HF config.json is a one-label sequence classifier (a reward model)."""
    arch = [str(a) for a in config.get("architectures") or []]
    return any(a.endswith("ForSequenceClassification") for a in arch) and config.get("num_labels", 1) == 1


def _score_apart(tensors: Any, score: dict[str, torch.Tensor]) -> Any:
    for name, tensor, source in tensors:
        if name == "score.weight":
            score[name] = tensor
        else:
            yield name, tensor, source


def _mxfp4_skeleton(cfg: ModelConfig) -> CausalLM:
    """The model on meta with every expert projection a GGMLLinear of MXFP4 blocks (still meta:
    build_model puts the file's blocks in)."""
    from weightsmith.models.model import SparseMoE
    from weightsmith.quant.ggml_linear import GGMLLinear, row_bytes
    from weightsmith.quant.weight_only import set_submodule

    mxfp4 = 39  # ggml's type
    with torch.device("meta"):
        model = CausalLM(cfg)
        for name, moe in model.named_modules():
            if not isinstance(moe, SparseMoE):
                continue
            for e, expert in enumerate(moe.experts):
                for part in expert.names:
                    linear = getattr(expert, part)
                    rows = torch.empty(
                        linear.out_features, row_bytes(mxfp4, linear.in_features), dtype=torch.uint8
                    )
                    set_submodule(
                        model,
                        f"{name}.experts.{e}.{part}",
                        GGMLLinear(rows, mxfp4, linear.in_features, linear.bias),
                    )
    return model


def _load_gguf(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    decode_layout: bool,
    on_tensor: TensorHook | None,
    keep_quantized: bool = False,
) -> Checkpoint:
    from weightsmith.checkpoint import gguf

    reader = gguf.open_gguf(path)  # parsing the header is the slow part: do it once
    info = gguf.read_gguf(reader)
    pooling = gguf_pooling(reader, str(gguf.meta(reader, "general.architecture")))
    cfg = ModelConfig.from_hf(info.config, source=str(path))
    tokenizer, gen = _gguf_tokenizer(reader, info)
    if keep_quantized:
        from weightsmith.checkpoint.gguf_quants import build_block_model

        if device.type != "cpu" or on_tensor is not None:
            raise CheckpointError(
                f"{path}: GGUF blocks kept quantized run on the CPU only, without QLoRA hooks; "
                "load the file without --keep-quantized (dequantized) for another device or for QLoRA"
            )
        model, label = build_block_model(reader, cfg, device, dtype)
        label = f"{info.file_type} ({label})"
        return Checkpoint(model, tokenizer, model.config, path, "gguf", label, gen, pooling=pooling)
    from weightsmith.checkpoint.gguf_tensors import iter_gguf_tensors

    tensors = ((n, t, str(path)) for n, t in iter_gguf_tensors(reader, dtype=torch.float32))
    model = build_model(cfg, tensors, device, dtype, decode_layout=decode_layout, on_tensor=on_tensor)
    return Checkpoint(model, tokenizer, cfg, path, "gguf", info.file_type, gen, pooling=pooling)


def _gguf_tokenizer(reader: Any, info: Any) -> tuple[Tokenizer, dict[str, Any]]:
    """A GGUF file's tokenizer and the generation config its metadata gives (BOS/EOS ids)."""
    from weightsmith.checkpoint.gguf_tokenizer import build_gguf_tokenizer
    from weightsmith.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_config(build_gguf_tokenizer(reader), info.tokenizer_config)
    gen = {k: info.config[k] for k in ("bos_token_id", "eos_token_id") if info.config.get(k) is not None}
    return tokenizer, gen


def read_without_weights(path: str | Path) -> tuple[ModelConfig, Tokenizer, dict[str, Any]]:
    """An HF directory's or a GGUF file's config, tokenizer and generation config; no weights are read."""
    from weightsmith.checkpoint import gguf
    from weightsmith.tokenizer import Tokenizer

    path = Path(path)
    if path.is_file():
        reader = gguf.open_gguf(path)
        info = gguf.read_gguf(reader)
        return ModelConfig.from_hf(info.config, source=str(path)), *_gguf_tokenizer(reader, info)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; pass an HF checkpoint directory or a .gguf file")
    cfg = ModelConfig.from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    return cfg, Tokenizer.from_dir(path), st.read_generation_config(path)
