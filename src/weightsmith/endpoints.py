"""One way to reach OpenAI-compatible servers: a pool of endpoints (replicas of one model, ours
or anyone's) that share a list of requests.

Every request weightsmith sends an endpoint is pure (greedy or seeded generation, prompt
scoring), so answering one twice changes nothing; that makes fan-out and retries safe. A request
goes to the endpoint with the fewest requests in flight (at most `concurrency` each; ties in
turn). A connection failure, a timeout, HTTP 429 or a 5xx is tried again, on another endpoint
when one is free, after a backoff: the server's `Retry-After` when it sends one, else
`backoff * 2**(failures - 1)` up to `max_backoff`. The backoff belongs to the endpoint, so one
that keeps failing is left alone for longer and longer while the others carry its requests, and
is tried again when its time is up (a restarted replica rejoins by itself). Other answers (400,
401, 404...) are the request's fault and end it at once. `map` returns the answers in the
order of its inputs, whichever endpoint gave each and however many tries it took, so a run
over two replicas yields the list a run over one yields, and each input is answered once.

Not here: what a request means (the eval scorer, the red-team target, the judge each build
their bodies and read their answers), streaming (the arena's contestant streams on a `client()`).
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from weightsmith.errors import UsageError, WeightsmithError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

#: Answers that say "not now" rather than "not this request": tried again.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_endpoint(model: str) -> bool:
    """Whether `model` names OpenAI-compatible endpoint URLs rather than a model reference."""
    return model.strip().startswith(("http://", "https://"))


def split_endpoint(
    spec: str, what: str = "--model", error: type[WeightsmithError] = UsageError
) -> tuple[str, str]:
    """`URL#MODEL` -> (base URL without a trailing slash, MODEL); MODEL is "default" when not
    given. `error` naming `what` for anything that is not an http(s) URL."""
    url, _, model = spec.strip().partition("#")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise error(f"{what} {spec!r}: expected an endpoint as http(s)://HOST:PORT/v1#MODEL")
    return url.rstrip("/"), model.strip() or "default"


def endpoint_urls(values: str | Iterable[str], flag: str = "--endpoint") -> list[str]:
    """Base URLs from comma-separated and/or repeated values, trailing slashes dropped,
    duplicates removed; UsageError naming `flag` for anything that is not an http(s) URL."""
    items = [values] if isinstance(values, str) else list(values)
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            url = part.strip().rstrip("/")
            if not url:
                continue
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise UsageError(
                    f"{flag}: {part.strip()!r} is not an endpoint URL; expected the server's base URL, "
                    "e.g. http://host:8000/v1 (several: comma-separated or repeated)"
                )
            if url not in urls:
                urls.append(url)
    if not urls:
        raise UsageError(f"{flag}: give at least one endpoint URL, e.g. http://host:8000/v1")
    return urls


def server_root(url: str) -> str:
    """The server a base URL belongs to (`http://h:8000/v1` -> `http://h:8000`), where
    `/tokenize` and `/health` live on our server and vLLM's."""
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a request is tried before its error is the run's."""

    attempts: int = 6  # tries per request, over all endpoints
    backoff: float = 0.5  # seconds before an endpoint is tried again after its first failure
    max_backoff: float = 30.0  # the most an endpoint's backoff grows to
    max_retry_after: float = 60.0  # the most a server's Retry-After is waited

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise UsageError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise UsageError("retry backoffs must be 0 or more seconds")


class EndpointError(WeightsmithError):
    """An endpoint refused a request, or every try of it failed; `status` is the HTTP status
    of the last answer (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def snippet(text: str, limit: int = 200) -> str:
    """An answer's text, squeezed to one line and `limit` characters, for error messages."""
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most `cap`."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), cap)


@dataclass
class _Endpoint:
    url: str
    client: Any = None  # an httpx.Client, made on first use
    in_flight: int = 0
    failures: int = 0  # in a row; 0 after a success
    not_before: float = 0.0  # time.monotonic() before which it gets no request
    answered: int = 0
    failed: int = 0  # tries that failed here (and were retried, or ended the request)


class EndpointPool:
    """OpenAI-compatible base URLs (`http://host:8000/v1`) sharing requests; thread-safe.

    `transport` (an httpx transport, used for every endpoint) is for tests.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        transport: Any = None,
        what: str = "endpoint",
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"--concurrency must be at least 1, got {concurrency}")
        self._endpoints = [_Endpoint(u) for u in endpoint_urls(urls, what)]
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.transport = transport
        self.what = what
        self._cond = threading.Condition()
        self._turn = 0

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._endpoints]

    # ---- connections ----------------------------------------------------------------------

    def client(self, *, timeout: float | None = None) -> Any:
        """A new httpx.Client with this pool's key, timeouts and transport (the caller closes
        it; for requests the pool does not make itself, such as a stream)."""
        import httpx  # local: only endpoints need it

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        t = self.timeout if timeout is None else timeout
        limits = httpx.Limits(
            max_connections=self.concurrency + 2, max_keepalive_connections=self.concurrency
        )
        return httpx.Client(
            headers=headers, timeout=httpx.Timeout(t, connect=min(t, 10.0)), transport=self.transport,
            limits=limits,
        )  # fmt: skip

    def close(self) -> None:
        with self._cond:
            clients = [e.client for e in self._endpoints if e.client is not None]
            for e in self._endpoints:
                e.client = None
        for c in clients:
            c.close()

    def __enter__(self) -> EndpointPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- choosing an endpoint -------------------------------------------------------------

    def _acquire(self, avoid: _Endpoint | None) -> _Endpoint:
        """A slot on the ready endpoint with the fewest requests in flight (not `avoid`, the
        one that just failed this request, unless it is the only one); waits for one."""
        n = len(self._endpoints)
        with self._cond:
            while True:
                now = time.monotonic()
                ready = [
                    (i, e)
                    for i, e in enumerate(self._endpoints)
                    if e.in_flight < self.concurrency and e.not_before <= now
                ]
                if ready:
                    others = [(i, e) for i, e in ready if e is not avoid] or ready
                    i, ep = min(others, key=lambda ie: (ie[1].in_flight, (ie[0] - self._turn) % n))
                    self._turn = (i + 1) % n
                    ep.in_flight += 1
                    if ep.client is None:
                        ep.client = self.client()
                    return ep
                later = [e.not_before - now for e in self._endpoints if e.not_before > now]
                self._cond.wait(timeout=min(later) if later else None)

    def _release(self, ep: _Endpoint, *, ok: bool, delay: float | None = None) -> None:
        with self._cond:
            ep.in_flight -= 1
            if ok:
                ep.failures = 0
            else:
                ep.failed += 1
                if delay is None:  # no Retry-After: a failure, and the backoff doubles
                    ep.failures += 1
                    r = self.retry
                    delay = min(r.max_backoff, r.backoff * 2 ** (ep.failures - 1))
                ep.not_before = max(ep.not_before, time.monotonic() + delay)
                if ep.failures >= 3 and len(self._endpoints) > 1:
                    log.warning("%s failed %d times in a row; the others take its requests for %.1f s",
                                ep.url, ep.failures, delay)  # fmt: skip
            self._cond.notify_all()

    # ---- requests -------------------------------------------------------------------------

    def post(self, path: str, body: dict[str, Any], *, root: bool = False) -> Any:
        """POST `body` as JSON to `path` under an endpoint's base URL (with `root`, under its
        server's root: `/tokenize`); the answer's JSON. Retried as the module says."""
        return self._request("POST", path, body, root=root)

    def get(self, path: str, *, root: bool = False) -> Any:
        return self._request("GET", path, None, root=root)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, *, root: bool) -> Any:
        import httpx

        avoid: _Endpoint | None = None
        for attempt in range(1, self.retry.attempts + 1):
            ep = self._acquire(avoid)
            url = (server_root(ep.url) if root else ep.url) + path
            try:
                r = ep.client.request(method, url, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: the endpoint, not us
                self._release(ep, ok=False)
                error = EndpointError(
                    f"{self.what} {url}: request failed ({type(e).__name__}: {e}); "
                    "check the URL and that the server is running"
                )
            except httpx.HTTPError as e:
                self._release(ep, ok=True)
                raise EndpointError(f"{self.what} {url}: request failed ({type(e).__name__}: {e})") from None
            else:
                if r.status_code == 200:
                    with self._cond:
                        ep.answered += 1
                    self._release(ep, ok=True)
                    return _json(r, url, self.what)
                error = EndpointError(
                    f"{self.what} {url} answered HTTP {r.status_code}: {snippet(r.text)}", r.status_code
                )
                if r.status_code not in RETRY_STATUSES:
                    self._release(ep, ok=True)  # the server works; the request is wrong
                    raise error
                wait_s = retry_after(r.headers.get("retry-after"), self.retry.max_retry_after)
                self._release(ep, ok=False, delay=wait_s if r.status_code in (429, 503) else None)
            avoid = ep
            if attempt < self.retry.attempts:
                log.info("%s; trying again (%d of %d)", error, attempt + 1, self.retry.attempts)
        spread = f" over {len(self._endpoints)} endpoints" if len(self._endpoints) > 1 else ""
        raise EndpointError(f"{error} (gave up after {self.retry.attempts} tries{spread})", error.status)

    def map(
        self, fn: Callable[[T], R], items: Iterable[T], *, progress: Callable[[int], None] | None = None
    ) -> list[R]:
        """`fn(item)` for each item, as many at once as the endpoints have slots; the results
        in the items' order. `progress(1)` as each finishes. The first error stops the rest."""
        items = list(items)
        workers = min(len(items), self.concurrency * len(self._endpoints))
        if workers <= 1:
            out = []
            for item in items:
                out.append(fn(item))
                if progress:
                    progress(1)
            return out
        pool = ThreadPoolExecutor(workers, thread_name_prefix="weightsmith-endpoint")
        futures = [pool.submit(fn, item) for item in items]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()  # raises the first error
                    if progress:
                        progress(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [f.result() for f in futures]

    # ---- what the endpoints say about themselves ------------------------------------------

    def each(self, path: str) -> dict[str, Any]:
        """GET `path` once from every endpoint (no retries): {url: JSON, or the EndpointError}."""
        out: dict[str, Any] = {}
        for ep in self._endpoints:
            url = ep.url + path
            try:
                with self.client(timeout=min(self.timeout, 30.0)) as client:
                    r = client.get(url)
            except Exception as e:  # noqa: BLE001 - reported per endpoint
                out[ep.url] = EndpointError(f"{self.what} {url}: request failed ({type(e).__name__})")
                continue
            if r.status_code != 200:
                out[ep.url] = EndpointError(
                    f"{self.what} {url} answered HTTP {r.status_code}: {snippet(r.text)}", r.status_code
                )
                continue
            try:
                out[ep.url] = _json(r, url, self.what)
            except EndpointError as e:
                out[ep.url] = e
        return out

    def served_model(self, model: str) -> dict[str, Any]:
        """What the endpoints serve as `model`, checked before a run starts.

        Each endpoint's `/models` must list `model` (when it lists models at all), and servers
        that report their weights' SHA-256 (`weights_sha256`, ours) must all report the same one:
        replicas that differ could not give one run's answers. An endpoint that cannot be reached
        now is left alone for `max_backoff` seconds (the others start; it joins when it answers).
        Returns the identity of what is served, the same for one replica or many: the model
        name with the weights' hash, or else with the `root` the servers name (vLLM: the
        checkpoint). Eval's cache and the red-team's journal key on it, never on the URLs.
        """
        listed: dict[str, dict[str, Any]] = {}
        down: list[str] = []
        for url, answer in self.each("/models").items():
            if isinstance(answer, EndpointError):
                if answer.status in (401, 403):
                    raise EndpointError(f"{answer}; check the API key", answer.status)
                if answer.status is None:
                    down.append(f"{url} ({answer})")
                    self.mark_down(url, self.retry.max_backoff)
                else:  # no /models route: nothing to check there
                    listed[url] = {}
                continue
            data = answer.get("data") if isinstance(answer, dict) else None
            entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
            entry = next((e for e in entries if e.get("id") == model), None)
            if entries and entry is None:
                names = ", ".join(str(e.get("id")) for e in entries)
                raise UsageError(f"{url} does not serve a model named {model!r}; it serves: {names}")
            listed[url] = entry or {}
        if not listed:
            raise EndpointError(f"no {self.what} answered: {'; '.join(down)}")
        for item in down:
            log.warning("%s is unreachable; starting on the others, it joins when it answers", item)
        hashes = {url: e.get("weights_sha256") for url, e in listed.items()}
        known = {h for h in hashes.values() if isinstance(h, str)}
        if len(known) > 1:
            shown = ", ".join(f"{url}: {str(h)[:12]}" for url, h in hashes.items())
            raise UsageError(
                f"the endpoints serve different weights as {model!r} ({shown}); "
                "replicas of one run must serve the same checkpoint"
            )
        if len(known) == 1 and all(isinstance(h, str) for h in hashes.values()):
            return {"model": model, "weights_sha256": known.pop()}
        roots = sorted({str(e["root"]) for e in listed.values() if e.get("root")})
        return {"model": model, "root": roots}

    def mark_down(self, url: str, seconds: float) -> None:
        """Send `url` nothing for `seconds` (an endpoint found unreachable before a run)."""
        with self._cond:
            for ep in self._endpoints:
                if ep.url == url:
                    ep.not_before = max(ep.not_before, time.monotonic() + seconds)
                    ep.failures = max(ep.failures, 1)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint: requests it answered (each request counts once, where it succeeded)
        and tries that failed there."""
        with self._cond:
            return {e.url: {"answered": e.answered, "failed_tries": e.failed} for e in self._endpoints}


def _json(r: Any, url: str, what: str) -> Any:
    try:
        return r.json()
    except ValueError:
        raise EndpointError(
            f"{what} {url} returned a malformed reply (HTTP {r.status_code}): expected JSON, got "
            f"{snippet(r.text)}",
            r.status_code,
        ) from None


__all__ = [
    "EndpointError",
    "EndpointPool",
    "RetryPolicy",
    "endpoint_urls",
    "is_endpoint",
    "server_root",
]
