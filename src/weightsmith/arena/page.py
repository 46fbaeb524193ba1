"""The arena page: people compare two anonymous answers and vote (`weightsmith arena serve`).

`create_arena_app` returns a FastAPI app on the same stack as `serve`: the same gate (Host
header, `application/json` POST bodies, body size; serve.gate), the same error handling
(serve.app.add_error_handlers: every refusal a JSON error, never a 500 for bad input), and
uvicorn with serve's connection limits (weightsmith.commands.serve). Routes:

* ``GET /``: the page (one HTML document, inline CSS and JS, no external assets); it sets
  the voter cookie, a random token (HttpOnly, SameSite=Strict) the store keeps only as a
  salted hash.
* ``GET /api/info``: what the page needs to draw itself (no contestant names).
* ``POST /api/battles`` ``{"prompt": TEXT | "random": true, "category": TAG?}``: picks an
  informative pair (`choose_pair` over the battle counts and current ratings, sides
  randomised), creates the battle and streams both answers (battle_stream.py).
* ``POST /api/votes`` ``{"battle": ID, "choice": "a" | "b" | "tie" | "both_bad"}``: records
  the vote (committed before the answer says so) and reveals the two names and the prompt's
  reference fields (its `--prompts` line's `answer`, `contains`, ...; `{}` for none), which the
  page shows then: after the vote, so they teach the task without steering the vote.

Names and references leave the server only in a vote's answer. With a vote key, both POST routes need
``Authorization: Bearer KEY`` (401 otherwise): a private arena neither votes nor spends
compute for strangers. Store refusals keep their status (`ArenaError.http_status`): a
forged battle id 404, a second vote 409, a vote after the battle's `--battle-ttl` 410, a
voter over the rate limit 429 with Retry-After.

A battle holds one of `--max-active` slots only while its answers stream: the slot is freed
when the stream ends, however it ends. A battle nobody votes on expires after `--battle-ttl`
seconds: it stays in the DB, unvoted, but stops counting toward pairing (the store's
`battle_counts`), so abandoned battles do not skew which pair meets next; ratings only ever
count votes.

Not here: the contestants and the pairing rule (contestants.py, pairing.py), storage
(store.py), options and running uvicorn (weightsmith.commands.arena_serve).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from weightsmith.arena.battle_stream import battle_events
from weightsmith.arena.records import Battle, Outcome, Prompt
from weightsmith.arena.schema import ArenaError
from weightsmith.arena.store import ArenaStore, mint_voter_token
from weightsmith.errors import WeightsmithError
from weightsmith.sampling import SamplingParams
from weightsmith.serve.app import add_error_handlers
from weightsmith.serve.gate import Gate, read_body
from weightsmith.serve.limits import ConnectionLimits
from weightsmith.serve.schemas import ApiError, parse

log = logging.getLogger(__name__)

#: The voter cookie's name.
VOTER_COOKIE = "weightsmith_arena_voter"
#: Seconds between refits of the ratings the pairing reads.
RATINGS_EVERY_S = 30.0
#: A category tag: 1-40 printable characters.
CATEGORY = re.compile(r"[^\x00-\x1f\x7f]{1,40}")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ArenaOptions(Protocol):
    """What the app reads from `arena serve`'s config (`ArenaServeConfig`, the owner)."""

    host: str
    limits: ConnectionLimits
    max_prompt_chars: int
    max_votes_per_minute: int
    max_active: int
    battle_ttl: float
    max_tokens: int
    temperature: float
    top_p: float


@dataclass
class GateSettings:
    """What serve's gate reads: the arena has no API key (the vote key is checked per route)."""

    host: str
    limits: ConnectionLimits
    api_key: None = None


@dataclass
class RequestCounts:
    """Responses by path and status (serve's gate counts every request here)."""

    counts: Counter = field(default_factory=Counter)

    def request(self, endpoint: str, status: int) -> None:
        self.counts[endpoint, status] += 1


class BattleRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    prompt: str | None = None
    random: bool = False
    category: str | None = None


class VoteRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    battle: str
    choice: str


class ArenaState:
    """The page's store, contestants, prompts and limits, shared by every request."""

    def __init__(
        self,
        settings: ArenaOptions,
        store: ArenaStore,
        contestants: Any,
        prompts: list[Prompt],
        *,
        vote_key: str | None,
        choose_pair: Callable[..., tuple[str, str]],
        rng: random.Random,
    ) -> None:
        self.settings = GateSettings(settings.host, settings.limits)
        self.options = settings
        self.store = store
        self.contestants = contestants
        self.prompts = prompts
        self.vote_key = vote_key
        self.choose_pair = choose_pair
        self.rng = rng
        self.metrics = RequestCounts()
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="arena-store")
        self.lock = threading.Lock()
        self.active = 0
        self.ratings: dict[str, float] | None = None
        self.rated_at = -math.inf

    async def off_loop(self, func: Callable[..., Any], *args: Any) -> Any:
        """`func(*args)` on the store's threads, with store refusals as HTTP errors."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)
        except ArenaError as e:
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if e.retry_after else None
            status = e.http_status if e.http_status < 500 else 503
            raise ApiError(status, str(e), code=e.code, headers=headers) from None

    def check_key(self, http: Request) -> None:
        if self.vote_key is None:
            return
        scheme, _, given = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.vote_key.encode()
        ):
            what = "no vote key was given" if not given else "the vote key is not valid"
            raise ApiError(401, f"{what}; this arena is private: enter its vote key", code="invalid_vote_key")

    def acquire(self) -> None:
        """A slot for one more battle in flight, or 429."""
        with self.lock:
            if self.active >= self.options.max_active:
                raise ApiError(
                    429,
                    f"{self.active} battles are being answered (--max-active); try again in a moment",
                    code="busy",
                    headers={"Retry-After": "2"},
                )
            self.active += 1

    def release(self) -> None:
        with self.lock:
            self.active -= 1

    def current_ratings(self) -> dict[str, float] | None:
        """The contestants' ratings (Elo-like scale) from every vote so far, refit at most every
        RATINGS_EVERY_S seconds; None until they are finite."""
        from weightsmith.arena.ratings import SCALE, bradley_terry

        if time.monotonic() - self.rated_at < RATINGS_EVERY_S:
            return self.ratings
        outcomes = [Outcome.of(b, v) for b, votes in self.store.battles_with_votes() for v in votes]
        try:
            strengths = bradley_terry(outcomes) if outcomes else None
        except WeightsmithError:
            strengths = None  # a model unbeaten so far, or groups that never met: counts decide
        self.ratings = (
            None
            if strengths is None
            else {n: 1000.0 + SCALE * t / math.log(10) for n, t in strengths.items()}
        )
        self.rated_at = time.monotonic()
        return self.ratings

    def new_battle(self, messages: list[dict], prompt_id: int, category: str | None) -> Battle:
        """Pick the pair (fewest battles, closest ratings, sides at random) and create the battle."""
        names = set(self.contestants.names)
        counts = {n: c for n, c in self.store.battle_counts().items() if n in names}
        counts.update({n: 0 for n in names - counts.keys()})
        ratings = self.current_ratings()
        with self.lock:
            left, right = self.choose_pair(counts, ratings, self.rng)
        o = self.options
        sampling = {"max_tokens": o.max_tokens, "temperature": o.temperature, "top_p": o.top_p}
        return self.store.create_battle(
            left, right, prompt_id, category=category, sampling=sampling, ttl=o.battle_ttl
        )


def create_arena_app(
    settings: ArenaOptions,
    store: ArenaStore,
    contestants: Any,
    prompts: list[Prompt],
    *,
    vote_key: str | None = None,
    choose_pair: Callable[..., tuple[str, str]] | None = None,
    rng: random.Random | None = None,
) -> FastAPI:
    """The arena app. `contestants` is a `Contestants` (or anything with its `names` and
    `stream`); `prompts` are the `--prompts` list, already in the store (ids set);
    `choose_pair` defaults to `weightsmith.arena.pairing.choose_pair`."""
    if choose_pair is None:
        from weightsmith.arena.pairing import choose_pair
    state = ArenaState(settings, store, contestants, prompts, vote_key=vote_key, choose_pair=choose_pair,
                       rng=rng or random.Random())  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.pool.shutdown(wait=False)

    app = FastAPI(
        title="weightsmith arena", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.arena = state
    add_error_handlers(app)
    _add_page_routes(app, state)
    _add_api_routes(app, state)
    app.add_middleware(Gate, state=state)
    return app


def _voter(http: Request) -> str | None:
    token = http.cookies.get(VOTER_COOKIE)
    return token if token and len(token) <= 128 else None


def _set_voter(response: Response, token: str) -> None:
    response.set_cookie(VOTER_COOKIE, token, max_age=365 * 86400, httponly=True, samesite="strict", path="/")


def _add_page_routes(app: FastAPI, state: ArenaState) -> None:
    page = resources.files("weightsmith.arena").joinpath("static/arena.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index(http: Request) -> HTMLResponse:
        response = HTMLResponse(page, headers=PAGE_HEADERS)
        if _voter(http) is None:
            _set_voter(response, mint_voter_token())
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/api/info")
    async def info() -> JSONResponse:
        categories = sorted({p.category for p in state.prompts if p.category})
        return JSONResponse({"contestants": len(state.contestants.names), "prompts": len(state.prompts),
                             "categories": categories, "vote_key": state.vote_key is not None,
                             "max_prompt_chars": state.options.max_prompt_chars})  # fmt: skip


def _add_api_routes(app: FastAPI, state: ArenaState) -> None:
    o = state.options

    @app.post("/api/battles")
    async def start_battle(http: Request) -> Response:
        state.check_key(http)
        req = parse(BattleRequest, await read_body(http, o.limits))
        prompt = await _prompt(state, req)
        category = _category(req.category) or prompt.category
        state.acquire()
        try:
            battle = await state.off_loop(state.new_battle, prompt.messages, prompt.id, category)
        except BaseException:
            state.release()
            raise
        seeds = {side: secrets.randbelow(2**31) for side in ("a", "b")}
        params = {s: SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p,
                                    seed=seed) for s, seed in seeds.items()}  # fmt: skip

        async def record(answers: dict[str, str], timings: dict[str, Any]) -> None:
            await state.off_loop(lambda: state.store.record_answers(
                battle.id, answers["a"], answers["b"], timings=timings,
                sampling={"seed_a": seeds["a"], "seed_b": seeds["b"]}))  # fmt: skip

        events = battle_events(battle=battle, messages=prompt.messages, contestants=state.contestants,
                               params=params, record=record, release=state.release)  # fmt: skip
        response = StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip
        if _voter(http) is None:
            _set_voter(response, mint_voter_token())
        return response

    @app.post("/api/votes")
    async def vote(http: Request) -> JSONResponse:
        state.check_key(http)
        req = parse(VoteRequest, await read_body(http, o.limits))
        token = _voter(http)
        if token is None:
            raise ApiError(400, "your browser sent no voter cookie; reload the page (the arena needs cookies)",
                           code="no_voter_cookie")  # fmt: skip

        def vote_and_reveal() -> tuple[Any, Battle]:
            recorded = state.store.record_vote(
                req.battle, req.choice, token, max_per_minute=o.max_votes_per_minute
            )
            return recorded, state.store.battle(req.battle)

        recorded, battle = await state.off_loop(vote_and_reveal)
        return JSONResponse({"recorded": True, "battle": battle.id, "choice": recorded.choice,
                             "model_a": battle.model_a, "model_b": battle.model_b,
                             "reference": battle.fields or {}})  # fmt: skip


async def _prompt(state: ArenaState, req: BattleRequest) -> Prompt:
    """The battle's prompt: one of --prompts at random, or the typed text (stored first);
    413 for text over --max-prompt-chars, before anything is generated."""
    if req.random:
        if not state.prompts:
            raise ApiError(400, "this arena has no prompt list (--prompts); type a prompt", code="no_prompts")
        with state.lock:
            return state.rng.choice(state.prompts)
    text = (req.prompt or "").strip()
    if not text:
        raise ApiError(400, "type a prompt, or ask for a random one", param="prompt", code="empty_prompt")
    limit = state.options.max_prompt_chars
    if len(text) > limit:
        raise ApiError(413, f"the prompt holds {len(text)} characters, over this arena's limit of {limit} "
                       "(--max-prompt-chars); shorten it", param="prompt", code="prompt_too_large")  # fmt: skip
    typed = Prompt([{"role": "user", "content": text}], _category(req.category), "typed")
    (prompt_id,) = await state.off_loop(state.store.add_prompts, [typed])
    return Prompt(typed.messages, typed.category, typed.source, prompt_id)


def _category(tag: str | None) -> str | None:
    """A category tag from the page: None when empty, 400 when not a short printable label."""
    tag = (tag or "").strip()
    if not tag:
        return None
    if not CATEGORY.fullmatch(tag):
        raise ApiError(400, "a category is 1-40 printable characters", param="category", code="bad_category")
    return tag
