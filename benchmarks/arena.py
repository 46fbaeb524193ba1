"""Votes the arena page's server records over HTTP: the most it sustains with 32 voters, and
how long a vote takes at a fixed offered load (target: >= 500 votes/s, p99 < 50 ms on 2 cores).

Each run makes a fresh DB in `--dir` and fills it with answered battles through the store
(`create_battle` + `record_answers`: answers pre-generated, no model runs), then starts
`weightsmith arena serve`'s app in a child process (the same uvicorn server, gate, limits
and store settings as the command: `synchronous=FULL`, the per-voter rate limit checked).
The client is this process: `--voters` keep-alive connections on loopback, each with its own
voter cookie, written with raw asyncio streams (a lean client: on 2 cores it shares the CPU
with the server). Two measurements per run, on separate battles:

* closed loop: every voter POSTs its next vote as soon as the last one is answered. This
  finds the most votes/s the server sustains. Its latency says little: with V voters always
  waiting, mean latency = V / throughput (Little's law), whatever the server does.
* open loop: votes are offered at a constant `--rate` (votes/s) spread over the voters, as
  wrk2 does: vote k of voter i is due at t0 + (k * V + i) / rate, and its latency runs from
  that intended send time (not the actual one) to the answer, so a server that falls behind
  is charged for the queue it causes (no coordinated omission). p50/p99 of these are the
  latency figures against the target.

The server also times each `record_vote` call (the vote committed, group commit and fsync
included): "recording p99" (open loop). Two server stacks are measured in the same run:
"fast" (httptools + uvloop, what `uvicorn_server` picks when they are installed) and "plain"
(h11 + asyncio, the fallback); the ratio fast/plain is printed. One warm-up run per stack,
then medians over `--runs`. The CPU model and instruction sets are printed.

    python benchmarks/arena.py [--voters 32] [--votes 4000] [--rate 500] [--runs 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from machine import cpu_isa, cpu_model  # beside this file

from weightsmith.arena.records import CHOICES, Contestant, Prompt
from weightsmith.arena.store import ArenaStore

PROMPT = [{"role": "user", "content": "Write two sentences about rivers."}]
NAMES = ("base", "fork")
STACKS = {"fast": True, "plain": False}


class PreAnswered:
    """Contestants for a server whose battles are answered already: names only."""

    names = list(NAMES)
    contestants = [Contestant("base", "base", "local"), Contestant("fork", "base:fork", "fork")]

    def stream(self, name, messages, params):
        raise RuntimeError("the benchmark's battles are answered in advance")


# ---- the server (child process) -------------------------------------------------------------


def serve(db: str, stack: str) -> None:
    """The child process: the arena app on a free loopback port; prints its URL, serves until
    its stdin closes, then prints the server-side times of recording each vote (JSON: battle
    id -> seconds)."""
    from weightsmith.commands.arena_serve import ArenaServeConfig, build_arena_app
    from weightsmith.commands.serve import bind, uvicorn_server

    cfg = ArenaServeConfig(contestants=list(NAMES), db=db, port=0, max_votes_per_minute=1_000_000)
    app, store, _ = build_arena_app(cfg, PreAnswered(), choose_pair=lambda counts, ratings, rng: NAMES)
    record, times = store.record_vote, []

    def timed(battle_id, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return record(battle_id, *args, **kwargs)
        finally:
            times.append((battle_id, time.perf_counter() - t0))

    store.record_vote = timed
    sock = bind(cfg.host, 0)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server = uvicorn_server(app, cfg.limits, fast=STACKS[stack])

    def stop_when_stdin_closes() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=stop_when_stdin_closes, daemon=True).start()
    server.run(sockets=[sock])
    print(json.dumps(times), flush=True)


def fill(db: Path, battles: int) -> list[str]:
    """`battles` answered battles in a fresh DB; their ids."""
    with ArenaStore(db) as store:
        store.add_contestants(PreAnswered.contestants)
        (prompt_id,) = store.add_prompts([Prompt(PROMPT)])
        ids = []
        for _ in range(battles):
            b = store.create_battle("base", "fork", prompt_id, sampling={"temperature": 0.7})
            store.record_answers(b.id, "A" * 400, "B" * 400, timings={"a": {}, "b": {}})
            ids.append(b.id)
    return ids


# ---- the client (this process) --------------------------------------------------------------


class Voter:
    """One voter on one keep-alive connection: raw HTTP/1.1 over asyncio streams."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.head = b""

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = await self._response()
        cookie = next(v for k, v in headers if k == b"set-cookie").split(b";", 1)[0]
        self.head = (
            b"POST /api/votes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Cookie: " + cookie + b"\r\nContent-Length: "
        )

    async def vote(self, battle: str, choice: str) -> None:
        body = json.dumps({"battle": battle, "choice": choice}).encode()
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status, _, answer = await self._response()
        if status != 200:
            raise RuntimeError(f"vote refused: HTTP {status} {answer[:200]!r}")

    async def _response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(b":") for x in lines[1:] if x)]
        length = int(next((v for k, v in headers if k == b"content-length"), b"0"))
        return status, headers, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Phase:
    votes: int
    seconds: float
    latencies: list[float]  # sorted, seconds

    @property
    def rate(self) -> float:
        return self.votes / self.seconds


async def closed_loop(voters: list[Voter], ids: list[str]) -> Phase:
    """Every voter votes on every battle, back to back."""

    async def run(i: int, voter: Voter) -> list[float]:
        out = []
        for j in range(len(ids)):
            t0 = time.perf_counter()
            await voter.vote(ids[(i + j) % len(ids)], CHOICES[j % 4])
            out.append(time.perf_counter() - t0)
        return out

    t0 = time.perf_counter()
    per_voter = await asyncio.gather(*(run(i, v) for i, v in enumerate(voters)))
    wall = time.perf_counter() - t0
    every = sorted(x for lat in per_voter for x in lat)
    return Phase(len(every), wall, every)


async def open_loop(voters: list[Voter], ids: list[str], rate: float) -> Phase:
    """Votes offered at `rate` per second in all; latency from each vote's intended send time."""
    n = len(voters)
    start = time.perf_counter() + 0.05

    async def run(i: int, voter: Voter) -> list[float]:
        out = []
        for j in range(len(ids)):
            due = start + (j * n + i) / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await voter.vote(ids[(i + j) % len(ids)], CHOICES[j % 4])
            out.append(time.perf_counter() - due)
        return out

    per_voter = await asyncio.gather(*(run(i, v) for i, v in enumerate(voters)))
    wall = time.perf_counter() - start
    every = sorted(x for lat in per_voter for x in lat)
    return Phase(len(every), wall, every)


async def client(port: int, voters: int, closed_ids: list[str], open_ids: list[str], rate: float):
    conns = [Voter(port) for _ in range(voters)]
    await asyncio.gather(*(c.open() for c in conns))
    try:
        closed = await closed_loop(conns, closed_ids)
        opened = await open_loop(conns, open_ids, rate)
    finally:
        for c in conns:
            c.close()
    return closed, opened


@dataclass
class Run:
    closed: Phase
    opened: Phase
    recording: list[float]  # sorted seconds, open-loop votes

    def row(self) -> dict[str, float]:
        return {
            "max votes/s": self.closed.rate,
            "offered p50 ms": 1000 * quantile(self.opened.latencies, 0.5),
            "offered p99 ms": 1000 * quantile(self.opened.latencies, 0.99),
            "recording p99 ms": 1000 * quantile(self.recording, 0.99),
            "achieved votes/s": self.opened.rate,
        }


def one_run(folder: Path, stack: str, voters: int, votes: int, rate: float) -> Run:
    """One closed-loop burst and one open-loop run against a fresh server and DB."""
    per_phase = max(1, votes // voters)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        db = Path(tmp) / "arena.sqlite"
        ids = fill(db, 2 * per_phase)
        closed_ids, open_ids = ids[:per_phase], ids[per_phase:]
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(db), "--stack", stack],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(child.stdout.readline().strip().rsplit(":", 1)[1])
            closed, opened = asyncio.run(client(port, voters, closed_ids, open_ids, rate))
        finally:
            child.stdin.close()
            times = json.loads(child.stdout.readline() or "[]")
            child.wait(30)
        with ArenaStore(db) as store:
            assert store.integrity_check() == []
    if closed.votes + opened.votes != 2 * per_phase * voters:
        raise RuntimeError("some votes were not answered")
    wanted = set(open_ids)
    return Run(closed, opened, sorted(t for bid, t in times if bid in wanted))


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voters", type=int, default=32)
    p.add_argument("--votes", type=int, default=4000, help="votes per measurement (closed, open)")
    p.add_argument("--rate", type=float, default=500.0, help="offered votes/s of the open loop")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--stacks", default="fast,plain", help="server stacks to measure: fast, plain")
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fast", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.stack)
        return
    from weightsmith.serve.connections import installed

    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    if "fast" in stacks and not (installed("httptools") and installed("uvloop")):
        print("httptools or uvloop is not installed: measuring the plain stack only")
        stacks = [s for s in stacks if s != "fast"]
    print(f"cpu: {cpu_model()} ({platform.machine()}; {cpu_isa()}), python {platform.python_version()}")
    print(
        f"{args.voters} voters; {args.votes} votes closed loop, {args.votes} offered at {args.rate:g}/s; "
        f"DB in {args.dir}; stacks {', '.join(stacks)}; warm-up, then {args.runs} runs each"
    )
    medians: dict[str, dict[str, float]] = {}
    for stack in stacks:
        one_run(Path(args.dir), stack, args.voters, min(args.votes, 20 * args.voters), args.rate)
        runs = [one_run(Path(args.dir), stack, args.voters, args.votes, args.rate) for _ in range(args.runs)]
        rows = [r.row() for r in runs]
        for i, row in enumerate(rows, 1):
            print(f"  {stack} run {i}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
        medians[stack] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("\nmedians:")
    for stack, m in medians.items():
        verdict = "meets" if m["max votes/s"] >= 500 and m["offered p99 ms"] < 50 else "misses"
        print(
            f"  {stack:5s}: {m['max votes/s']:.0f} votes/s sustained (closed loop, {args.voters} voters); "
            f"at {args.rate:g}/s offered: p50 {m['offered p50 ms']:.1f} ms, p99 {m['offered p99 ms']:.1f} ms "
            f"(achieved {m['achieved votes/s']:.0f}/s); recording p99 {m['recording p99 ms']:.1f} ms: "
            f"{verdict} the target"
        )
    if {"fast", "plain"} <= medians.keys():
        f, pl = medians["fast"], medians["plain"]
        print(
            f"  fast / plain: {f['max votes/s'] / pl['max votes/s']:.2f}x votes/s, "
            f"{f['offered p99 ms'] / pl['offered p99 ms']:.2f}x p99 at {args.rate:g}/s"
        )
    print("  (target >= 500 votes/s and p99 < 50 ms on 2 cores; client and server share the CPU)")


if __name__ == "__main__":
    main()
