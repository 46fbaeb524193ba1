"""Aggregate serving throughput of `weightsmith serve` with 1, 4 and 16 concurrent clients.

The server runs in its own process (`python -m weightsmith.cli.main serve MODEL`, fp32 as
`serve` loads a GGUF file by default, or its quantized blocks with `--keep-quantized`), so
the load generator's Python never takes the GIL from the model thread; the clients are a
lean HTTP/1.1 client on asyncio streams, since they share the machine's cores with the
server and a general-purpose client costs more per streamed chunk. Each
client streams chat completions over HTTP (temperature 0 unless `--temperature`/`--top-p` say
otherwise, the same for the offline peer; `max_tokens` fixed and
the `ignore_eos` extension, so every request generates exactly `--max-tokens`
tokens), one request after another; every request has its own short prompt. A
scenario sends `--requests` requests through C concurrent clients; its aggregate
throughput is the completion tokens the server reports (`stream_options.include_usage`)
over the scenario's wall time. One client (requests one at a time) is the baseline,
and every scenario is printed as a ratio against it: continuous batching should
give 16 clients well over 3x the aggregate tokens/s of one.

Per request the client also records the time to first token (request sent -> first
content chunk) and the inter-token latency (first -> last content chunk over the
tokens in between); the table shows their medians over every request of every round.
As a peer baseline, the offline engine (`weightsmith.load(MODEL).engine.generate`)
generates the first `--offline-requests` prompts one at a time in this process
while the server idles: the server's one-client figure over it is what HTTP and the
scheduler cost.

Each scenario is warmed up with one request, the scenarios alternate within each of
`--rounds` rounds (1, 4, 16, offline, 1, 4, ...) so a noisy neighbour slows all
alike, and medians are taken. Read the ratios: the machines are shared and noisy,
so a lone absolute figure means little.

    python benchmarks/serve.py [--clients 1,4,16] [--requests 16] [--max-tokens 64] [--rounds 3] [--keep-quantized]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

TOPICS = [
    "rivers", "volcanoes", "bicycles", "libraries", "honey bees", "lighthouses", "glaciers", "chess",
    "bread", "comets", "coral reefs", "windmills", "owls", "deserts", "trains", "tea",
]  # fmt: skip
ASKS = ["Write two sentences about {}.", "Give three facts about {}.", "Describe {} to a child."]


def prompts(n: int) -> list[str]:
    """`n` distinct short prompts."""
    return [
        ASKS[(i // len(TOPICS)) % len(ASKS)].format(TOPICS[i % len(TOPICS)]) + f" ({i})" for i in range(n)
    ]


@dataclass
class Result:
    """One request as the client saw it."""

    tokens: int
    ttft: float  # seconds from sending to the first content chunk
    itl: float  # seconds per token between the first and the last content chunk


# ---- the server, in its own process -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, log, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """Start `weightsmith serve` (with `extra` options) and wait until /health answers 200."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "weightsmith.cli.main", "serve", model,
           "--port", str(port), "--max-batch", str(max_batch), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    log.seek(0)
    raise SystemExit(f"the server did not become ready:\n{log.read().decode(errors='replace')}")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user would; kill only if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the clients --------------------------------------------------------------------------------
#
# A lean HTTP/1.1 client on asyncio streams: the load generator shares the machine's cores with the
# server, so it should cost as little as it can (a general-purpose client spends more CPU per
# streamed chunk than the server does to send it). One keep-alive connection per client; each
# server-sent event is still parsed as JSON and checked.


class Connection:
    """One keep-alive HTTP/1.1 connection to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, asyncio.StreamReader, dict[str, str]]:
        """Send a JSON POST; return the status, the reader positioned at the body, and the headers."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        assert self.reader is not None
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, self.reader, headers

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def body_parts(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives: chunked transfer encoding or a Content-Length body."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
        while await reader.readline() not in (b"\r\n", b""):  # trailers
            pass
    else:
        yield await reader.readexactly(int(headers.get("content-length", "0")))


#: The requests' sampling settings (main sets them from --temperature and --top-p).
SAMPLING: dict[str, float] = {"temperature": 0.0, "top_p": 1.0}


async def one_request(conn: Connection, model: str, prompt: str, max_tokens: int) -> Result:
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        **SAMPLING,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    first = last = None
    usage, finish, done = None, None, False
    start = time.perf_counter()
    status, reader, headers = await conn.post("/v1/chat/completions", body)
    if status != 200:
        text = b"".join([part async for part in body_parts(reader, headers)])
        raise RuntimeError(f"HTTP {status}: {text.decode(errors='replace')}")
    pending = b""
    async for part in body_parts(reader, headers):
        pending += part
        *events, pending = pending.split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']}")
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    if not done or usage is None or first is None or last is None:
        raise RuntimeError("the stream ended without content, usage or [DONE]")
    n = usage["completion_tokens"]
    if n != max_tokens or finish != "length":
        raise RuntimeError(f"expected {max_tokens} tokens ending with 'length', got {n} and {finish!r}")
    return Result(n, first - start, (last - first) / max(n - 1, 1))


async def run_clients(url: str, model: str, batch: list[str], clients: int, max_tokens: int):
    """Send `batch` through `clients` concurrent clients; return (wall seconds, results)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    todo = iter(batch)
    results: list[Result] = []
    conns = [Connection(host, int(port)) for _ in range(clients)]

    async def worker(conn: Connection) -> None:
        for prompt in todo:  # one shared iterator: each client takes the next prompt
            results.append(await one_request(conn, model, prompt, max_tokens))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        wall = time.perf_counter() - start
    finally:
        for c in conns:
            await c.close()
    return wall, results


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


# ---- the offline peer ---------------------------------------------------------------------------


def offline_runner(model: str, max_tokens: int, keep_quantized: bool):
    """One-at-a-time generation with the in-process engine; returns fn(prompts) -> (wall, results)."""
    import weightsmith

    llm = weightsmith.load(model, auto_pull=False, keep_quantized=keep_quantized)
    sp = llm.sampling_params(max_tokens=max_tokens, ignore_eos=True, **SAMPLING)

    def run(batch: list[str]) -> tuple[float, list[Result]]:
        ids = [llm.engine.chat_prompt([{"role": "user", "content": p}]) for p in batch]
        results = []
        start = time.perf_counter()
        for p in ids:
            c = llm.engine.generate([p], sp)[0]
            assert c.completion_tokens == max_tokens, c.completion_tokens
            results.append(
                Result(c.completion_tokens, c.prefill_seconds, c.decode_seconds / max(max_tokens - 1, 1))
            )
        return time.perf_counter() - start, results

    return run


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    ap.add_argument("--requests", type=int, default=16, help="requests per scenario")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per scenario (1 is always run)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument(
        "--keep-quantized", action="store_true",
        help="serve (and run offline) the GGUF file's quantized blocks (`serve --keep-quantized`) instead of fp32",
    )  # fmt: skip
    ap.add_argument(
        "--offline-requests", type=int, default=4, help="prompts the offline engine runs per round (0: skip)"
    )
    ap.add_argument("--temperature", type=float, default=0.0, help="every request's temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's top_p (1: off)")
    args = ap.parse_args()
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p)
    levels = sorted({1, *(int(c) for c in args.clients.split(","))})
    batch = prompts(args.requests)

    import torch
    from machine import cpu_description

    from weightsmith.quant import cpu_kernels

    weights = (
        "GGUF blocks kept quantized (--keep-quantized)" if args.keep_quantized else "fp32 (serve's default)"
    )
    print(f"CPU: {cpu_description()} at start")
    print(
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; C decode kernels: {cpu_kernels.info()}"
    )
    print(
        f"model {args.model}, weights {weights}, server --max-batch {args.max_batch}, {args.requests} requests "
        f"per scenario, {args.max_tokens} tokens each (temperature {args.temperature}, top_p {args.top_p}, "
        "ignore_eos), streaming chat, "
        f"{args.rounds} rounds",
        flush=True,
    )
    if max(levels) > args.requests:
        print(f"note: only {args.requests} requests, so at most {args.requests} clients are ever busy")

    log = tempfile.TemporaryFile()
    proc, url = start_server(
        args.model, args.max_batch, log, ["--keep-quantized"] if args.keep_quantized else []
    )
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        model = served_model(url)
        # Warm the server up at the largest concurrency before anything is timed.
        asyncio.run(run_clients(url, model, prompts(max(levels)), max(levels), args.max_tokens))
        offline = (
            offline_runner(args.model, args.max_tokens, args.keep_quantized)
            if args.offline_requests > 0
            else None
        )
        names = [f"{c}" for c in levels] + (["offline"] if offline else [])
        samples = {name: {"tok_s": [], "ttft": [], "itl": []} for name in names}
        for r in range(args.rounds):
            for name in names:
                if name == "offline":
                    offline(batch[:1])  # warm-up
                    wall, results = offline(batch[: args.offline_requests])
                else:
                    clients = int(name)
                    asyncio.run(run_clients(url, model, ["Say hello."], 1, args.max_tokens))  # warm-up
                    wall, results = asyncio.run(run_clients(url, model, batch, clients, args.max_tokens))
                s = samples[name]
                s["tok_s"].append(sum(x.tokens for x in results) / wall)
                s["ttft"] += [x.ttft for x in results]
                s["itl"] += [x.itl for x in results]
                label = "offline engine" if name == "offline" else f"{name} clients"
                print(
                    f"round {r + 1} {label:>15}: {s['tok_s'][-1]:7.1f} tok/s over {wall:6.1f}s, "
                    f"TTFT {statistics.median(x.ttft for x in results) * 1e3:6.0f} ms, "
                    f"ITL {statistics.median(x.itl for x in results) * 1e3:6.1f} ms",
                    flush=True,
                )
    finally:
        stop_server(proc)
        log.close()

    med = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    base = med["1"]["tok_s"]
    print(
        f"\nmedians over {args.rounds} rounds (TTFT and ITL: over every request); "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'':34}{'tok/s':>9}{'vs 1 client':>13}{'TTFT ms':>10}{'ITL ms':>9}")
    for name, m in med.items():
        label = (
            f"offline engine, one at a time ({args.offline_requests})"
            if name == "offline"
            else f"server, {name} client{'s' if name != '1' else ''}"
        )
        print(
            f"{label:34}{m['tok_s']:9.1f}{m['tok_s'] / base:12.2f}x{m['ttft'] * 1e3:10.0f}{m['itl'] * 1e3:9.1f}"
        )
    for c in levels[1:]:
        print(f"ratio {c} clients / 1 client: {med[str(c)]['tok_s'] / base:.2f}x aggregate tokens/s")
    if "offline" in med:
        print(f"ratio server 1 client / offline engine: {base / med['offline']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
