"""The OpenAI-compatible HTTP server: routes, auth, limits, streaming.

`create_app` returns a FastAPI app whose model loads in a background thread after
start-up (`/health` answers 503 until it is ready, 200 after). Every request body is
read with a size limit and validated (schemas.py) before anything is queued, so bad
input gets a 4xx with OpenAI's error object and never a 500; an error after a stream
started arrives as a `data: {"error": ...}` event followed by `data: [DONE]`.
Generation goes through the continuous-batching `Scheduler`; a client that
disconnects cancels its sequences, which frees their batch rows.

Security: with an API key, every route but `/` (the chat page) and `/health` needs
`Authorization: Bearer KEY`; adapters are the ones named at start-up (a request can
only pick one by name, never name a file); CORS is off unless origins are given.

Not here: a request in flight and its response (jobs.py), the options and running uvicorn
(weightsmith.commands.serve), argument parsing (weightsmith.cli).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from weightsmith.chat_template import TemplateLimits
from weightsmith.llm import LLM
from weightsmith.prompt_cache import PromptCache
from weightsmith.serve.embedding_route import add_embedding_route
from weightsmith.serve.gate import ClientGone, Gate, error_response, read_body
from weightsmith.serve.jobs import (
    EchoJob,
    GuardedJob,
    Job,
    choice_params,
    respond,
    sampling_params,
    token_budget,
)
from weightsmith.serve.limits import ConnectionLimits
from weightsmith.serve.metrics import ServerMetrics
from weightsmith.serve.openapi import openapi_document
from weightsmith.serve.prepare import chat_ids, check_chars, check_n, completion_ids, off_loop, prompt_param
from weightsmith.serve.prompt_logprobs import score_prompt
from weightsmith.serve.response_route import add_response_route
from weightsmith.serve.response_store import ResponseStore
from weightsmith.serve.responses import ResponseBuilder
from weightsmith.serve.scheduler import QueueFull, Scheduler
from weightsmith.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from weightsmith.serve.steering import request_steering
from weightsmith.serve.structured import chat_messages, message_chars, plan_request
from weightsmith.serve.token_routes import add_token_routes

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a client is told to wait (Retry-After) on 429 and 503.
RETRY_AFTER = 1
#: Most prompt tokens the scheduler prefills in one step.
MAX_PREFILL_TOKENS = 4096


class ServerOptions(Protocol):
    """What the app reads from `weightsmith serve`'s config (`weightsmith.commands.serve.ServeConfig`,
    the one owner of these options; the app takes that config as it is)."""

    model: str
    served_name: str | None  # the model name clients send; None: `model`
    api_key: str | None
    max_batch: int
    max_queue: int
    max_model_len: int  # context per request (KV cache per row); 0: the model's
    prefill_chunk: int  # longer prompts are prefilled a chunk per decode step
    prompt_cache_mib: int  # finished rows' KV kept for the next turn (prompt_cache.py); 0: off
    response_store_mib: int  # stored /v1/responses (response_store.py); 0: none
    max_prompt_chars: int  # characters of prompt text per request, counted before tokenising
    template_timeout: float  # seconds one chat-template render may take
    cors_origin: list[str]
    pooling: str | None  # how /v1/embeddings pools; None: the checkpoint's own, else the last token's
    host: str  # the bind address; with limits.allowed_host, the Host names the server answers to
    limits: ConnectionLimits  # body size and time, Host names (connections: commands.serve)


@dataclass
class Loaded:
    """What the loader returns: the model and the adapter names loaded into it."""

    llm: LLM
    adapters: list[str]
    #: directions a request may steer with, by name (`serve --direction`), checked against the weights
    directions: dict[str, Any] = field(default_factory=dict)


class ServerState:
    """The app's model, scheduler and metrics; the model arrives from a loader thread."""

    def __init__(self, settings: ServerOptions, loader: Callable[[], Loaded], guard: Any = None) -> None:
        self.settings = settings
        self.served_name = settings.served_name or settings.model
        self.guard = guard  # a safety.policy.Guard applied to every request (`serve --guard`)
        self.loader = loader
        self.metrics = ServerMetrics()
        #: finished /v1/responses kept for previous_response_id and GET (response_store.py)
        self.responses = ResponseStore(settings.response_store_mib * 2**20)
        self.loaded: Loaded | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.created = 0  # when the model became ready, for /v1/models
        self.ready = threading.Event()
        self.on_load_error: Callable[[str], None] = lambda message: None
        self.template_limits = TemplateLimits(timeout=settings.template_timeout)
        self._weights_sha256: str | None = None
        self._hash_lock = threading.Lock()

    def load(self) -> None:
        try:
            loaded = self.loader()
            llm = loaded.llm
            s = self.settings
            n_ctx = min(s.max_model_len or llm.engine.context_length, llm.engine.context_length)
            scheduler = Scheduler(
                llm.model,
                llm.tokenizer,
                llm.engine.eos_token_ids,
                max_batch=s.max_batch,
                max_len=n_ctx,
                max_queue=s.max_queue,
                max_prefill_tokens=MAX_PREFILL_TOKENS,
                prefill_chunk=s.prefill_chunk,
                observer=self.metrics,
                decode=llm.engine.decode_step(),
                prompt_cache=PromptCache(s.prompt_cache_mib * 2**20) if s.prompt_cache_mib else None,
                kv_dtype=llm.engine.kv_dtype,
            )
            scheduler.start()
        except Exception as e:  # reported on /health and to the CLI, which exits
            log.exception("loading the model failed")
            self.load_error = str(e)
            self.on_load_error(self.load_error)
            return
        self.loaded, self.scheduler = loaded, scheduler
        self.created = int(time.time())
        self.ready.set()
        log.info("model %s ready", self.served_name)

    def require(self) -> tuple[Loaded, Scheduler]:
        if self.loaded is None or self.scheduler is None:
            message = (
                f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            )
            raise ApiError(
                503,
                f"{message}; retry shortly",
                type="service_unavailable",
                code="model_loading" if not self.load_error else "model_failed",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        return self.loaded, self.scheduler

    async def weights_sha256(self) -> str:
        """The served weights' fingerprint (every tensor, adapters included: eval.cache), computed
        once, on the model's thread between decode steps (like all model work: see
        model_calls.py). Clients spreading one run over replicas check the replicas agree and
        key their caches on it rather than on the URL (weightsmith.endpoints)."""
        if self._weights_sha256 is None:
            _, scheduler = self.require()
            try:
                future = scheduler.call(self._fingerprint)
            except QueueFull as e:
                raise _busy(e) from None
            await asyncio.wrap_future(future)
        assert self._weights_sha256 is not None
        return self._weights_sha256

    def _fingerprint(self) -> None:
        with self._hash_lock:
            if self._weights_sha256 is None:
                from weightsmith.eval.cache import model_fingerprint

                assert self.loaded is not None
                self._weights_sha256 = model_fingerprint(self.loaded.llm.model)

    def pooling(self) -> str:
        """How /v1/embeddings pools (embeddings.py); 400 when the checkpoint names a pooling not
        computed here and --pooling does not choose another."""
        from weightsmith.checkpoint.pooling import POOLINGS
        from weightsmith.embeddings import DEFAULT_POOLING

        loaded, _ = self.require()
        own = getattr(loaded.llm.checkpoint, "pooling", None)
        chosen = getattr(self.settings, "pooling", None) or own or DEFAULT_POOLING
        if chosen not in POOLINGS:
            raise ApiError(400, f"the model's checkpoint pools by {chosen!r}, which is not supported; start the "
                           f"server with --pooling ({', '.join(POOLINGS)})", param="model",
                           code="unsupported_pooling")  # fmt: skip
        return chosen

    def model_names(self) -> list[str]:
        base = self.served_name
        adapters = self.loaded.adapters if self.loaded else []
        return [base] + [f"{base}:{a}" for a in adapters]

    def steering(self, specs: str | list[str] | None) -> dict[str, list[Any]] | None:
        """The edit table for a request's `steer` field (serve/steering.py); 400 when it is wrong."""
        assert self.loaded is not None
        n_layers = len(self.loaded.llm.model.model.layers)
        return request_steering(specs, self.loaded.directions, n_layers)

    def resolve_model(self, name: str) -> str | None:
        """The adapter a model name selects (None: the base model); 404 when unknown."""
        base = self.served_name
        if name == base:
            return None
        prefix, _, adapter = name.partition(":")
        if prefix == base and self.loaded is not None and adapter in self.loaded.adapters:
            return adapter
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server has {', '.join(self.model_names())}",
            param="model",
            code="model_not_found",
        )


# ---- the app --------------------------------------------------------------------------------


def create_app(settings: ServerOptions, loader: Callable[[], Loaded], *, guard: Any = None) -> FastAPI:
    """The app for `settings` (a `ServeConfig`); `loader` runs on a thread after start-up;
    `guard`, a loaded policy, checks every request."""
    state = ServerState(settings, loader, guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="weightsmith-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.stop()

    app = FastAPI(title="weightsmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.weightsmith = state
    add_error_handlers(app)
    _add_info_routes(app, state)
    _add_generation_routes(app, state)
    add_token_routes(app, state, _accept)
    add_embedding_route(app, state, _accept, _busy)
    add_response_route(app, state, _accept, start_chat)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origin),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Gate, state=state)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """JSON errors for every failure: ApiError as it says, a client gone as a quiet 499,
    routing errors as 404/405, anything unexpected as a logged 500 (the arena page uses it too)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(
            ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind)
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    """The chat page, /health, /metrics and /v1/models."""
    page = resources.files("weightsmith.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                                           "'unsafe-inline'; script-src 'self' 'unsafe-inline'"})  # fmt: skip

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        from weightsmith import __version__

        return JSONResponse(openapi_document(__version__))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def model_card(name: str) -> dict[str, Any]:
        base = state.served_name
        return {"id": name, "object": "model", "created": state.created, "owned_by": "weightsmith", "root": base,
                "parent": None if name == base else base, "max_model_len": state.scheduler.max_len,
                "weights_sha256": await state.weights_sha256()}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        state.require()
        return JSONResponse({"object": "list", "data": [await model_card(n) for n in state.model_names()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        state.require()
        state.resolve_model(name)  # 404 naming the models there are
        return JSONResponse(await model_card(name))


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    """/v1/chat/completions and /v1/completions."""

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await _chat_completions(state, http)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await _completions(state, http)


async def _chat_completions(state: ServerState, http: Request) -> Response:
    loaded, scheduler, req = await _accept(state, http, ChatRequest)
    job = await start_chat(state, loaded, scheduler, req)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    builder = ResponseBuilder(loaded.llm.tokenizer, req.model, chat=True, include_usage=include_usage)
    return await respond(job, http, builder, req, req.logprobs_k() is not None)


async def start_chat(state: ServerState, loaded: Loaded, scheduler: Scheduler, req: ChatRequest) -> Any:
    """A chat request checked, rendered and submitted: its job (a `Job`, or a `GuardedJob` behind
    a guard policy); /v1/chat/completions and /v1/responses answer from it."""
    req.check_stream_options()
    adapter = state.resolve_model(req.model)
    steer = state.steering(req.steer)
    logprobs = req.logprobs_k()
    check_n(req.n, scheduler.max_batch)
    guard = state.guard
    if guard is not None and req.tools and req.tool_choice != "none":
        raise ApiError(400, "tool calls are not served behind a guard policy", param="tools")
    plan = await off_loop(plan_request, loaded.llm, req)  # compiles schemas: 400 naming a bad one
    messages = chat_messages(req.messages, plan)
    check_chars(message_chars(messages, plan), state.settings.max_prompt_chars, "messages")
    ids, refusal = await off_loop(chat_ids, loaded.llm, guard, messages, state.template_limits, plan.tools)
    budget = token_budget(len(ids), req.limit(), scheduler.max_len, "messages", _limit_name(req))
    params = sampling_params(loaded.llm, req, budget, plan.grammar)
    job: Any = None
    if refusal is None:
        job = Job([ids] * req.n, choice_params(params, req.n), adapter, logprobs, steer)
        job.tools = plan.output(loaded.llm.tokenizer, req.n)
        job.submit(scheduler, RETRY_AFTER)
    if guard is not None and (refusal is not None or guard.has_output_rails):
        job = GuardedJob(job, guard, req.n, {} if refusal is None else dict.fromkeys(range(req.n), refusal))
    return job


async def _completions(state: ServerState, http: Request) -> Response:
    loaded, scheduler, req = await _accept(state, http, CompletionRequest)
    req.check_stream_options()
    req.check_unsupported()
    adapter = state.resolve_model(req.model)
    steer = state.steering(req.steer)
    prompts = req.prompts()
    check_n(req.n * len(prompts), scheduler.max_batch, batch=len(prompts))
    chars = sum(len(p) for p in prompts if isinstance(p, str))
    check_chars(chars, state.settings.max_prompt_chars, "prompt")
    guard = state.guard
    if guard is not None and (req.scores_prompt or req.max_tokens == 0):
        raise ApiError(400, "scoring a prompt (echo with logprobs or max_tokens 0) is not served behind a "
                       "guard policy", param="echo")  # fmt: skip
    grammar = (await off_loop(plan_request, loaded.llm, req)).grammar  # response_format (an extension here)
    ids, refusals = await off_loop(completion_ids, loaded.llm, guard, prompts, req.n)
    all_ids, all_params = [], []
    for i, p in enumerate(ids):
        if req.max_tokens == 0:  # echo (and scoring) only: nothing is generated
            continue
        budget = token_budget(
            len(p), req.max_tokens, scheduler.max_len, prompt_param(i, len(ids)), "max_tokens"
        )
        params = sampling_params(loaded.llm, req, budget, grammar)
        if i * req.n not in refusals:
            all_ids += [p] * req.n
            all_params += choice_params(params, req.n)
    scored = (
        await score_prompts(scheduler, loaded.llm, ids, adapter, req.logprobs) if req.scores_prompt else None
    )
    job: Any = None
    if all_ids:
        job = Job(all_ids, all_params, adapter, req.logprobs, steer)
        job.submit(scheduler, RETRY_AFTER)
    if guard is not None and (refusals or guard.has_output_rails):
        job = GuardedJob(job, guard, len(ids) * req.n, refusals)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    builder = ResponseBuilder(loaded.llm.tokenizer, req.model, chat=False, include_usage=include_usage)
    if req.echo:
        choices = range(len(ids) * req.n)
        echoed = [ids[i // req.n] for i in choices]
        logprobs = None if scored is None else [scored[i // req.n] for i in choices]
        job = EchoJob(job, echoed, loaded.llm.tokenizer, logprobs)
    return await respond(job, http, builder, req, req.logprobs is not None)


def _busy(e: QueueFull) -> ApiError:
    return ApiError(429, f"the server is busy ({e}); retry after {RETRY_AFTER} s", type="rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(RETRY_AFTER)})  # fmt: skip


async def score_prompts(
    scheduler: Scheduler, llm: LLM, prompts: list[list[int]], adapter: str | None, top: int
) -> list[list[Any]]:
    """Each prompt's token log-probabilities (prompt_logprobs.py), each computed alone on the
    model's thread between decode steps; 429 when too many wait."""
    out = []
    for ids in prompts:
        try:
            future = scheduler.call(
                lambda ids=ids: score_prompt(llm.model, ids, top, adapter, scheduler.max_len)
            )
        except QueueFull as e:
            raise _busy(e) from None
        try:
            out.append(await asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            raise ApiError(500, f"scoring the prompt failed: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed") from None  # fmt: skip
    return out


async def _accept(state: ServerState, http: Request, schema: type[T]) -> tuple[Loaded, Scheduler, T]:
    """The loaded model (503 while loading) and the validated body; for tokenize and
    detokenize, whose `model` is optional, a model they do name must exist."""
    loaded, scheduler = state.require()
    req = parse(schema, await read_body(http, state.settings.limits))
    if isinstance(req, (TokenizeRequest, DetokenizeRequest)) and req.model is not None:
        state.resolve_model(req.model)
    return loaded, scheduler, req


def _limit_name(req: ChatRequest) -> str:
    return "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
