"""Time to first token over a long conversation: `serve`'s prompt cache on and off, and llama.cpp.

A chat client resends the whole conversation every turn. One conversation of `--turns` turns
(a system prompt, then the bundled Kettlebird questions as user messages; each answer
`--max-tokens` tokens at temperature 0, `ignore_eos`) is sent to:

- `weightsmith serve` with its prompt cache (the default, `--prompt-cache-mib 1024`): each turn
  copies the last turn's prompt and answer from the kept row and prefills only the new message;
- `weightsmith serve --prompt-cache-mib 0`: each turn prefills the whole conversation;
- llama.cpp (llama-cpp-python, where installed), in this process, on an F32 export of the same
  model: `Llama.create_chat_completion(stream=True)`, which reuses the longest prefix the
  context already holds (its own prompt cache for one conversation).

Each server runs in its own process (fp32, as `serve` loads the GGUF file), the client is the
official `openai` client streaming (TTFT: request sent -> first content chunk, so ours include
HTTP); each turn's TTFT is the median over `--rounds` conversations (rounds alternate the
contenders; each round's system prompt begins with its number, so a round shares no prefix
with another's beyond the chat template's first tokens).
Printed per turn: the prompt length, the tokens the server reported cached, each TTFT, and the
cache-off and llama.cpp TTFTs over ours.

    python benchmarks/prompt_cache.py [--turns 8] [--max-tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_description  # noqa: E402
from serve import start_server, stop_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
SYSTEM = (
    "Conversation {}. You are the support assistant of Kettlebird, a small company that makes smart "
    "kettles. Answer in two or three sentences, kindly and precisely, and say when you do not know."
)


def questions(n: int) -> list[str]:
    from weightsmith.datasets import sample_path

    rows = [json.loads(line) for line in sample_path("kettlebird/train.jsonl").open()]
    return [r["messages"][0]["content"] for r in rows if r["messages"][0]["role"] == "user"][:n]


def converse(url: str, round_: int, asks: list[str], max_tokens: int) -> list[tuple[int, int, float]]:
    """(prompt tokens, cached tokens, TTFT) for each turn of one conversation."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    chat = [{"role": "system", "content": SYSTEM.format(round_)}]
    out = []
    for ask in asks:
        chat.append({"role": "user", "content": ask})
        start, first, text, usage = time.perf_counter(), None, "", None
        stream = client.chat.completions.create(
            model=MODEL, messages=chat, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        assert first is not None and usage is not None
        details = usage.prompt_tokens_details
        out.append((usage.prompt_tokens, details.cached_tokens if details else 0, first - start))
        chat.append({"role": "assistant", "content": text})
    return out


def converse_llama_cpp(llama, round_: int, asks: list[str], max_tokens: int) -> list[float]:
    chat = [{"role": "system", "content": SYSTEM.format(round_)}]
    out = []
    for ask in asks:
        chat.append({"role": "user", "content": ask})
        start, first, text = time.perf_counter(), None, ""
        for chunk in llama.create_chat_completion(chat, max_tokens=max_tokens, temperature=0, stream=True):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                first = first or time.perf_counter()
                text += piece
        out.append(first - start)
        chat.append({"role": "assistant", "content": text})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}")
    asks = questions(args.turns)
    ttft: dict[str, list[list[float]]] = {"on": [], "off": [], "llama.cpp": []}
    lengths: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+b") as log:
        llama = None
        try:
            from llama_cpp import Llama

            from weightsmith.checkpoint.gguf_write import export_gguf
            from weightsmith.checkpoint.pull import resolve

            f32 = Path(tmp) / "f32.gguf"
            export_gguf(resolve(MODEL), f32, "f32")
            llama = Llama(str(f32), n_ctx=4096, n_threads=args.threads, verbose=False)
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp column")
        servers = {
            "on": start_server(MODEL, 4, log, []),
            "off": start_server(MODEL, 4, log, ["--prompt-cache-mib", "0"]),
        }
        try:
            for r in range(args.rounds + 1):  # round 0 warms up every contender
                order = ["on", "off", "llama.cpp"] if r % 2 else ["llama.cpp", "off", "on"]
                for who in order:
                    if who == "llama.cpp":
                        if llama is not None:
                            times = converse_llama_cpp(llama, r, asks, args.max_tokens)
                            if r:
                                ttft[who].append(times)
                        continue
                    turns = converse(servers[who][1], r, asks, args.max_tokens)
                    if r:
                        ttft[who].append([t for _, _, t in turns])
                    if who == "on" and r:
                        lengths = [(p, c) for p, c, _ in turns]
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    print(
        "| turn | prompt tokens | cached | TTFT ours s | cache off s | off / ours | llama.cpp s | llama.cpp / ours |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in range(args.turns):
        on, off = (statistics.median(run[k] for run in ttft[w]) for w in ("on", "off"))
        lc = statistics.median(run[k] for run in ttft["llama.cpp"]) if ttft["llama.cpp"] else None
        peer = f"{lc:.3f} | {lc / on:.2f}x" if lc is not None else "- | -"
        print(
            f"| {k + 1} | {lengths[k][0]} | {lengths[k][1]} | {on:.3f} | {off:.3f} | {off / on:.2f}x | {peer} |"
        )


if __name__ == "__main__":
    main()
