"""The serve command: the OpenAI-compatible server on uvicorn.

Everything a user can get wrong (the model name, an adapter directory, a busy
port) is checked before the server starts, so it fails with one line instead of a
server that never becomes ready. The model then loads in the background while
`/health` answers 503. Ctrl-C or SIGTERM stops accepting connections and lets
in-flight requests finish (up to --drain-timeout seconds).

`start_server` runs the same server on a thread (the demo, tests and benchmarks
use it). `ServeConfig` is the one owner of the server's options: the app
(`weightsmith.serve.app.create_app`) takes it as it is.

Not here: routes, scheduling, limits (`weightsmith.serve`), the listening banner
(`weightsmith.cli.serve`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.checkpoint.pooling import POOLINGS
from weightsmith.commands.loading import KV_CACHE_DTYPES, KV_CACHE_HELP, SteerOptions
from weightsmith.config import opt
from weightsmith.errors import UsageError
from weightsmith.files import is_plain_file_name
from weightsmith.safety.policy_file import ClassifierAccess
from weightsmith.serve.limits import ConnectionLimits
from weightsmith.serve.startup import ServeError, bind, listen, uvicorn_server  # noqa: F401 (bind, uvicorn_server: re-exported)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(kw_only=True)
class ServeConfig:
    """Serve a model (and LoRA adapters) behind an OpenAI-compatible HTTP API."""

    model: str = opt(help="catalog or store name, HF directory, or .gguf file", positional=True)
    adapter: list[str] = opt(
        default_factory=list,
        help="LoRA adapter to offer as MODEL:NAME, given as NAME=DIR or DIR (NAME = the folder's name)",
        split=False,
    )
    direction: list[str] = opt(
        default_factory=list,
        help="direction file a request may steer with (its `steer` field: NAME:ablate or NAME:layer=L:scale=S), "
        "given as NAME=FILE or FILE (NAME = the file's stem)",
        split=False,
    )
    steering: SteerOptions = opt(default_factory=SteerOptions, flatten=True)  # --steer: every request
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = opt(8000, "port to listen on (0: any free port)")
    api_key: str | None = opt(
        None,
        "require 'Authorization: Bearer KEY' (visible in the process list: prefer --api-key-file or "
        "$WEIGHTSMITH_API_KEY); unset: --api-key-file, then $WEIGHTSMITH_API_KEY, if set",
    )
    api_key_file: str | None = opt(None, "read the API key from this file (its first line)")
    served_name: str | None = opt(None, "the model name clients send; unset: MODEL as given")
    max_batch: int = opt(16, "most sequences decoded together")
    max_queue: int = opt(64, "most requests waiting for a batch slot; more get 429")
    max_model_len: int = opt(
        2048, "context per sequence in tokens (0: the model's); the KV cache holds max-batch x this"
    )
    prefill_chunk: int = opt(
        512,
        "prompts longer than this are prefilled this many tokens per decode step, so streams keep flowing",
    )
    prompt_cache_mib: int = opt(
        1024,
        "MiB of finished conversations' keys and values kept, so a next turn copies its history instead of "
        "prefilling it (0: off)",
    )
    response_store_mib: int = opt(
        64, "MiB of /v1/responses kept for previous_response_id and GET /v1/responses/{id} (0: store none)"
    )
    max_prompt_chars: int = opt(
        1_000_000, "most characters of prompt text (messages or prompts) in one request, before tokenising"
    )
    template_timeout: float = opt(5.0, "seconds the chat template may take to render one request")
    pooling: str | None = opt(
        None, "how /v1/embeddings pools the last layer: last (token), mean or first; unset: the checkpoint's "
        "own (a GGUF file's pooling_type, a sentence-transformers Pooling module), else last",
        choices=POOLINGS,
    )  # fmt: skip
    # --max-body, --read-timeout, --keep-alive-timeout, --max-connections, --allowed-host, --drain-timeout
    limits: ConnectionLimits = opt(default_factory=ConnectionLimits, flatten=True)
    cors_origin: list[str] = opt(
        default_factory=list,
        help="let web pages from this origin call the API (CORS is off by default)",
        split=False,
    )
    guard: str | None = opt(None, "guardrail policy file (or builtin:NAME) applied to every request")
    classifier: ClassifierAccess = opt(default_factory=ClassifierAccess, flatten=True)
    device: str = opt("auto", "cpu, cuda, cuda:N, mps or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")
    allow_pickle: bool = opt(False, "allow pickle weights (.bin/.pt), loaded with weights_only=True")
    keep_quantized: bool = opt(
        False, "run a .gguf file's quantized matrices (Q4_K, Q8_0, IQ*, MXFP4, ...; and gpt-oss's MXFP4 "
        "experts of an HF folder) from their own blocks (CPU kernels, the file's memory) instead of "
        "dequantizing them; adapters run beside the blocks"
    )  # fmt: skip
    compile: bool = opt(
        False, "decode through torch.compile; on a CUDA device, replayed from CUDA graphs per batch size"
    )
    kv_cache_dtype: str = opt("auto", KV_CACHE_HELP, choices=KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        for name, value, low in (("max-batch", self.max_batch, 1), ("max-queue", self.max_queue, 0),
                                 ("max-model-len", self.max_model_len, 0), ("prefill-chunk", self.prefill_chunk, 1),
                                 ("max-prompt-chars", self.max_prompt_chars, 1),
                                 ("prompt-cache-mib", self.prompt_cache_mib, 0),
                                 ("response-store-mib", self.response_store_mib, 0)):  # fmt: skip
            if value < low:
                raise UsageError(f"--{name} must be at least {low}, got {value}")
        if not self.template_timeout > 0:
            raise UsageError(
                f"--template-timeout must be a positive number of seconds, got {self.template_timeout}"
            )


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` -> {name: dir}, each checked to be a LoRA adapter directory or a GGUF
    file (read as llama.cpp's LoRA format when the model loads)."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        directory = Path(path if sep else spec).expanduser()
        gguf = directory.suffix.lower() == ".gguf" and directory.is_file()  # llama.cpp's LoRA file
        if not sep:
            name = directory.stem if gguf else directory.resolve().name
        if not ADAPTER_NAME.fullmatch(name):
            raise UsageError(
                f"--adapter {spec!r}: adapter name {name!r} must be letters, digits, '.', '_' or '-'; "
                "give one as NAME=DIR"
            )
        if name in adapters:
            raise UsageError(
                f"--adapter {spec!r}: the name {name!r} is used twice; give each NAME=DIR a new name"
            )
        if not (gguf or (directory / "adapter_config.json").is_file()):
            raise UsageError(
                f"--adapter {spec!r}: {directory} is not a LoRA adapter directory (no adapter_config.json); "
                "point it at a finetune output, a PEFT adapter or a llama.cpp GGUF LoRA file"
            )
        adapters[name] = directory
    return adapters


def parse_directions(specs: list[str], steer: list[str]) -> dict[str, Path]:
    """`NAME=FILE` or `FILE` -> {name: file}, each file present (read against the model at load)."""
    if specs and steer:
        raise UsageError("--steer steers every request and --direction lets requests steer; choose one")
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        path = Path(file if sep else spec)
        name = name if sep else path.stem
        if not is_plain_file_name(name) or ":" in name or name in found:
            raise UsageError(
                f"--direction {spec!r}: give each file a new NAME of letters, digits, '.', '_' or '-'"
            )
        if not path.is_file():
            raise UsageError(f"--direction {spec!r}: no direction file at {path}")
        found[name] = path
    return found


def read_directions(llm: Any, directions: dict[str, Path]) -> dict[str, Any]:
    from weightsmith.inspect.steering import read_steer_file
    from weightsmith.models.fingerprint import model_fingerprint

    if not directions:
        return {}
    fingerprint, cfg = model_fingerprint(llm.model), llm.model.config
    return {
        name: read_steer_file(
            path, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, fingerprint=fingerprint
        )
        for name, path in directions.items()
    }


def make_loader(model_path: Path, adapters: dict[str, Path], cfg: ServeConfig, directions: dict[str, Path]):
    """A function that loads the model and its adapters (run on the server's loader thread)."""

    def loader():
        from weightsmith.llm import load
        from weightsmith.lora import load_adapter, set_adapter
        from weightsmith.serve.app import Loaded

        llm = load(
            model_path, device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle, auto_pull=False,
            steer=cfg.steering.steer, keep_quantized=cfg.keep_quantized, kv_cache_dtype=cfg.kv_cache_dtype,
        )  # fmt: skip
        llm.engine.compile = cfg.compile
        checked = read_directions(llm, directions)  # against the base weights, before adapters
        for name, directory in adapters.items():
            load_adapter(llm.model, directory, name=name)
        if adapters:
            set_adapter(llm.model, None)  # rows pick their adapter per request
            llm.model.requires_grad_(False)
        return Loaded(llm, list(adapters), checked)

    return loader


def build_app(cfg: ServeConfig):
    """Check the options and return (app, its state); nothing is loaded yet."""
    from weightsmith.checkpoint.pull import resolve
    from weightsmith.llm import load
    from weightsmith.safety.guarded import load_guard
    from weightsmith.serve.app import create_app

    adapters = parse_adapters(cfg.adapter)
    guard = load_guard(
        cfg.guard, load_model=lambda ref: load(ref, device=cfg.device, dtype=cfg.dtype),
        grants=cfg.classifier.grants(),
    )  # fmt: skip
    path = resolve(cfg.model)
    served_name = cfg.served_name or cfg.model
    if ":" in served_name.removeprefix(str(Path(served_name).anchor)):
        served_name = Path(cfg.model).name  # a Windows path; ':' separates adapters
    settings = dataclasses.replace(cfg, served_name=served_name, api_key=resolve_api_key(cfg))
    directions = parse_directions(cfg.direction, cfg.steering.steer)
    app = create_app(settings, make_loader(path, adapters, cfg, directions), guard=guard)
    return app, app.state.weightsmith


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The API key: --api-key, else the first line of --api-key-file, else $WEIGHTSMITH_API_KEY."""
    return resolve_secret(cfg.api_key, cfg.api_key_file, flag="--api-key", env="WEIGHTSMITH_API_KEY")


def resolve_secret(value: str | None, file: str | None, *, flag: str, env: str) -> str | None:
    """A secret given as `flag VALUE`, else the first line of `flag-file FILE`, else `$env`
    (serve's API key, the arena's vote key); None when none is set."""
    if value is not None and file is not None:
        raise UsageError(f"{flag} and {flag}-file both give a key; keep one (the file)")
    if value is not None:
        return value or None
    if file is not None:
        path = Path(file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{flag}-file {path}: cannot read it ({e}); give a readable text file") from None
        if not key:
            raise UsageError(f"{flag}-file {path}: its first line is empty; write the key there")
        return key
    return os.environ.get(env) or None


def run_serve(cfg: ServeConfig, progress: Any = None) -> dict[str, Any]:
    """Serve until Ctrl-C/SIGTERM; raise ServeError if the model failed to load.
    `progress(url, state)` is told once the socket listens (the model is still loading)."""
    app, state = build_app(cfg)
    listener = listen(app, cfg.host, cfg.port, cfg.limits)
    failure: list[str] = []

    def failed(message: str) -> None:
        failure.append(message)
        listener.server.should_exit = True

    state.on_load_error = failed
    if progress is not None:
        progress(listener.url, state)
    listener.serve()
    if failure:
        raise ServeError(f"the model failed to load: {failure[0]}")
    return {"url": listener.url, "models": state.model_names()}


@dataclass
class RunningServer:
    """A server on a background thread; `stop()` drains it like Ctrl-C does."""

    url: str
    state: Any
    server: Any
    thread: threading.Thread
    errors: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(cfg: ServeConfig, *, wait: bool = True, timeout: float = 300.0) -> RunningServer:
    """Start the server on a thread; with `wait`, return once the model is ready."""
    app, state = build_app(cfg)
    listener = listen(app, cfg.host, cfg.port, cfg.limits)
    errors: list[str] = []

    def failed(message: str) -> None:
        errors.append(message)
        listener.server.should_exit = True

    state.on_load_error = failed
    thread = listener.start("weightsmith-server", wait=False)
    running = RunningServer(listener.url, state, listener.server, thread, errors)
    if wait:
        deadline = time.monotonic() + timeout
        while not state.ready.wait(0.1):
            if running.errors or not thread.is_alive() or time.monotonic() > deadline:
                running.stop()
                raise ServeError(f"the server did not become ready: {running.errors or 'timed out'}")
    return running
