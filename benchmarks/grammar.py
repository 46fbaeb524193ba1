"""Per-token cost of grammar-constrained decoding: llguidance vs xgrammar, on this CPU.

Both engines get the default model's tokenizer (SmolLM2, 49,152 tokens) and the same JSON
schema (nested objects, an array of objects, enums, bounded numbers, required fields,
`additionalProperties: false`). A valid document for the schema is tokenized with the model's
tokenizer and walked token by token: at each step the engine computes the allowed-token bitmask
(the work done once per decoded token) and then consumes the token. Reported: grammar compile
time (first and again; llguidance compiles when a matcher is made, so that is what it times), and the median and p90 per-token mask time, single-threaded. Runs of
the two engines are interleaved, medians over several walks after a warm-up. The mask is then
applied to a (V,) fp32 logits row (bitmask -> bool -> masked_fill), the same for both engines,
and that cost is printed too. A decode step of the default model takes ~10-20 ms on these
machines, so a mask cost well under 1 ms is what keeps the <= 15% target reachable.

    python benchmarks/grammar.py [--model smollm2-135m-instruct] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from machine import cpu_description  # beside this file

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "friends": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "close": {"type": "boolean"}},
                "required": ["name", "close"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "role", "tags", "friends"],
    "additionalProperties": False,
}

DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "score": 0.75,
    "tags": ["mathematics", "poetry", "engines"],
    "address": {"city": "London", "zip": "W1"},
    "friends": [{"name": "Charles Babbage", "close": True}, {"name": "Mary Somerville", "close": False}],
}


def llguidance_engine(backend, eos: int, vocab: int):
    import llguidance

    start = time.perf_counter()
    tok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - start

    def compile_():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False}
        )
        # llguidance compiles when a matcher is made: time that as its compile step
        matcher = llguidance.LLMatcher(tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def walk(grammar, tokens, times):
        matcher = llguidance.LLMatcher(tok, grammar)
        for t in tokens:
            t0 = time.perf_counter()
            mask = matcher.compute_bitmask()
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), matcher.get_error()
        assert matcher.is_accepting()
        return np.frombuffer(mask, dtype=np.uint8)

    return setup, compile_, walk


def xgrammar_engine(backend, eos: int, vocab: int):
    import transformers
    import xgrammar

    start = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - start

    def compile_():
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def walk(grammar, tokens, times):
        matcher = xgrammar.GrammarMatcher(grammar)
        bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        for t in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t)
        return bitmask[0].numpy().view(np.uint8)

    return setup, compile_, walk


def apply_cost(mask_bytes: np.ndarray, vocab: int, repeats: int = 200) -> float:
    """Median seconds to turn a packed bitmask into a bool mask and apply it to (V,) logits."""
    logits = torch.randn(vocab)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        allowed = torch.from_numpy(np.unpackbits(mask_bytes, bitorder="little")[:vocab].view(np.bool_))
        logits.masked_fill(~allowed, float("-inf"))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from weightsmith.checkpoint.load import load_checkpoint
    from weightsmith.checkpoint.pull import resolve

    tokenizer = load_checkpoint(resolve(args.model)).tokenizer
    vocab, eos = tokenizer.vocab_size, tokenizer.eos_token_id
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    tokens = tokenizer.encode(text, add_special_tokens=False) + [eos]
    print(f"cpu: {cpu_description()}, python {platform.python_version()}, 1 thread")
    print(f"model {args.model}: vocab {vocab}; document {len(text)} chars, {len(tokens)} tokens (with EOS)")

    engines = {}
    for name, make in (("llguidance", llguidance_engine), ("xgrammar", xgrammar_engine)):
        try:
            setup, compile_, walk = make(tokenizer.backend, eos, vocab)
        except ImportError as e:  # xgrammar is the peer: pip install xgrammar to add it
            print(f"{name}: not measured ({e})")
            continue
        t0 = time.perf_counter()
        grammar = compile_()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        compile_()
        again = time.perf_counter() - t0
        last_mask = walk(grammar, tokens, [])  # warm-up
        engines[name] = dict(
            setup=setup, first=first, again=again, walk=walk, grammar=grammar, mask=last_mask
        )
        engines[name]["times"] = []
    for _ in range(args.runs):  # interleaved: a noisy neighbour slows both alike
        for e in engines.values():
            e["walk"](e["grammar"], tokens, e["times"])
    print(
        f"{'':12}{'tokenizer s':>12}{'compile ms':>12}{'again ms':>10}{'mask us med':>13}{'p90':>8}{'apply us':>10}"
    )
    for name, e in engines.items():
        t = sorted(e["times"])
        med, p90 = statistics.median(t) * 1e6, t[int(0.9 * (len(t) - 1))] * 1e6
        apply_us = apply_cost(e["mask"], vocab) * 1e6
        print(
            f"{name:12}{e['setup']:12.2f}{e['first'] * 1e3:12.1f}{e['again'] * 1e3:10.1f}"
            f"{med:13.1f}{p90:8.1f}{apply_us:10.1f}"
        )
    if len(engines) == 2:
        a, b = (statistics.median(engines[n]["times"]) for n in ("llguidance", "xgrammar"))
        print(f"ratio llguidance / xgrammar per-token mask time (median): {a / b:.2f}x")


if __name__ == "__main__":
    main()
