"""Votes per second the arena store records with 32 concurrent voters, and the latency of
`ArenaStore.record_vote` (p50, p99): the floor under the arena page's HTTP benchmark
(`benchmarks/arena.py`, target for the whole server: >= 500 votes/s, p99 < 50 ms on 2 cores).

Each run makes a fresh DB in `--dir` (the disk matters: every commit fsyncs the WAL under
`synchronous=FULL`), imports `--votes / --threads` answered battles, and starts `--threads`
voter threads at once; each voter (its own token) votes on every battle, with the per-voter
rate limit checked as the page does. A vote's latency is the wall time of its
`record_vote` call (waiting for the write lock included). Both durability settings are
measured, alternating within each of `--runs` rounds, and medians are printed; FULL is the
store's default (see arena/schema.py). There is no peer: this is a floor, not a race.

    python benchmarks/arena_store.py [--threads 32] [--votes 4000] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_model  # beside this file

from weightsmith.arena.records import CHOICES, Battle, Contestant
from weightsmith.arena.store import ArenaStore

PROMPT = [{"role": "user", "content": "Write two sentences about rivers."}]


def one_run(folder: Path, synchronous: str, threads: int, votes: int) -> tuple[float, float, float]:
    """(votes/s, p50 ms, p99 ms) of one burst on a fresh DB."""
    n_battles = max(1, votes // threads)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        store = ArenaStore(Path(tmp) / "arena.sqlite", synchronous=synchronous)
        store.add_contestants([Contestant("base", "base", "local"), Contestant("fork", "base:k", "fork")])
        store.import_battles(
            [
                (Battle(f"b{i:06d}", "base", "fork", PROMPT, "A" * 400, "B" * 400), [])
                for i in range(n_battles)
            ],
            origin="bench",
        )
        latencies: list[list[float]] = [[] for _ in range(threads)]
        start = threading.Barrier(threads + 1)

        def voter(i: int) -> None:
            token = f"bench-voter-{i:04d}"
            start.wait()
            for j in range(n_battles):
                t0 = time.perf_counter()
                store.record_vote(
                    f"b{(i + j) % n_battles:06d}", CHOICES[j % 4], token, max_per_minute=100_000
                )
                latencies[i].append(time.perf_counter() - t0)

        workers = [threading.Thread(target=voter, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        assert store.integrity_check() == []
        store.close()
    every = sorted(x for lat in latencies for x in lat)
    p50 = every[len(every) // 2]
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))]
    return len(every) / wall, p50 * 1e3, p99 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--votes", type=int, default=4000, help="votes per run (over all threads)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the DBs go")
    args = ap.parse_args()
    modes = ("full", "normal")
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:
            results[mode].append(one_run(args.dir, mode, args.threads, args.votes))
    print(f"CPU: {cpu_model()} ({platform.machine()}), DBs in {args.dir}")
    print(f"{args.threads} voter threads, {args.votes} votes a run, medians of {args.runs} runs")
    print(f"{'synchronous':<12} {'votes/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for mode in modes:
        rate, p50, p99 = (statistics.median(r[k] for r in results[mode]) for k in range(3))
        print(f"{mode:<12} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()
