"""Votes per second the arena page's server sustains with 32 concurrent voters over HTTP, and
the p99 latency of recording a vote (target: >= 500 votes/s, p99 < 50 ms on 2 cores).

Each run makes a fresh DB in `--dir` and fills it with answered battles directly through the
store (`create_battle` + `record_answers`: answers pre-generated, no model runs), then starts
`weightsmith arena serve`'s app in a child process (the same uvicorn server, gate, limits and
store settings as the command: `synchronous=FULL`, the per-voter rate limit checked). The
`--threads` voters each open one keep-alive connection on loopback, fetch the page once for
their cookie, and POST a vote on every battle (`/api/votes`), all starting together. A vote's
latency is the client's wall time from sending the POST to reading its answer, which the
server sends only after the vote is committed. One warm-up run, then medians over `--runs`.
The server also times each `record_vote` call (the vote committed, group commit and fsync
included): "recording p99". The CPU model is printed; there is no peer.

    python benchmarks/arena.py [--threads 32] [--votes 4000] [--runs 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from arena_store import cpu_model  # beside this file

from weightsmith.arena.records import CHOICES, Contestant, Prompt
from weightsmith.arena.store import ArenaStore

PROMPT = [{"role": "user", "content": "Write two sentences about rivers."}]
NAMES = ("base", "fork")


class PreAnswered:
    """Contestants for a server whose battles are answered already: names only."""

    names = list(NAMES)
    contestants = [Contestant("base", "base", "local"), Contestant("fork", "base:fork", "fork")]

    def stream(self, name, messages, params):
        raise RuntimeError("the benchmark's battles are answered in advance")


def serve(db: str) -> None:
    """The child process: the arena app on a free loopback port; prints its URL, serves until
    its stdin closes, then prints the server-side times of recording each vote (JSON, seconds)."""
    from weightsmith.commands.arena_serve import ArenaServeConfig, build_arena_app
    from weightsmith.commands.serve import bind, uvicorn_server

    cfg = ArenaServeConfig(contestants=list(NAMES), db=db, port=0, max_votes_per_minute=1_000_000)
    app, store, _ = build_arena_app(cfg, PreAnswered(), choose_pair=lambda counts, ratings, rng: NAMES)
    record, times = store.record_vote, []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return record(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    store.record_vote = timed
    sock = bind(cfg.host, 0)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server = uvicorn_server(app, cfg)

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


def voter(port: int, ids: list[str], offset: int, start: threading.Barrier, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    r = conn.getresponse()
    r.read()
    cookie = r.getheader("set-cookie", "").split(";", 1)[0]
    headers = {"Content-Type": "application/json", "Cookie": cookie}
    start.wait()
    for j in range(len(ids)):
        body = json.dumps({"battle": ids[(offset + j) % len(ids)], "choice": CHOICES[j % 4]})
        t0 = time.perf_counter()
        conn.request("POST", "/api/votes", body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise RuntimeError(f"vote refused: HTTP {r.status}")
    conn.close()


def one_run(folder: Path, threads: int, votes: int) -> tuple[float, float, float, float]:
    """(votes/s, p50 ms, p99 ms of the client's round trip, p99 ms of the server's recording)
    of one burst against a fresh server and DB."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        db = Path(tmp) / "arena.sqlite"
        ids = fill(db, max(1, votes // threads))
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            port = int(child.stdout.readline().strip().rsplit(":", 1)[1])
            latencies: list[list[float]] = [[] for _ in range(threads)]
            start = threading.Barrier(threads + 1)
            workers = [
                threading.Thread(target=voter, args=(port, ids, i, start, latencies[i]))
                for i in range(threads)
            ]
            for w in workers:
                w.start()
            start.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
        finally:
            child.stdin.close()
            recorded = sorted(json.loads(child.stdout.readline() or "[]"))
            child.wait(30)
        with ArenaStore(db) as store:
            assert store.integrity_check() == []
    every = sorted(x for lat in latencies for x in lat)
    if len(every) != len(ids) * threads:
        raise RuntimeError(f"{len(ids) * threads - len(every)} votes failed")
    return (
        len(every) / wall,
        1000 * quantile(every, 0.5),
        1000 * quantile(every, 0.99),
        1000 * quantile(recorded, 0.99),
    )


def quantile(sorted_values: list[float], q: float) -> float:
    return (
        sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]
        if sorted_values
        else float("nan")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--votes", type=int, default=4000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--serve", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    print(f"cpu: {cpu_model()} ({platform.machine()}), python {platform.python_version()}")
    print(
        f"{args.threads} voters, {args.votes} votes per run, DB in {args.dir}; warm-up, then {args.runs} runs"
    )
    one_run(Path(args.dir), args.threads, min(args.votes, 20 * args.threads))
    runs = [one_run(Path(args.dir), args.threads, args.votes) for _ in range(args.runs)]
    for i, (rate, p50, p99, rec99) in enumerate(runs, 1):
        print(
            f"  run {i}: {rate:5.0f} votes/s  round trip p50 {p50:5.1f} ms p99 {p99:6.1f} ms  recording p99 {rec99:5.1f} ms"
        )
    rate, p50, p99, rec99 = (statistics.median(r[k] for r in runs) for k in range(4))
    print(
        f"median: {rate:.0f} votes/s; round trip p50 {p50:.1f} ms, p99 {p99:.1f} ms; recording p99 {rec99:.1f} ms"
    )
    print(
        f"  (target >= 500 votes/s, p99 < 50 ms; {args.threads} voters that each wait for their answer see a mean"
    )
    print(f"  round trip of voters / rate by Little's law: {1000 * args.threads / rate:.0f} ms here)")


if __name__ == "__main__":
    main()
