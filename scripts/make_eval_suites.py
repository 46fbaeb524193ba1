"""Generate the data files of weightsmith's built-in evaluation suites.

Writes, into ``src/weightsmith/eval/suites/`` (or ``--out DIR``):

- ``arith-mc.jsonl`` / ``arith-mc-train.jsonl``: 200 + 20 four-choice arithmetic items.
- ``unit-mc.jsonl``: 120 four-choice unit-conversion items.
- ``reading-mc.jsonl``: the hand-written questions of ``reading-mc.source.txt``
  with their choices shuffled.
- ``kettlebird-heldout.jsonl``: flat docs from ``datasets/kettlebird/valid.jsonl``.
- ``text-ppl.jsonl``: one paragraph of the hand-written ``text-sample.txt`` a line.

Every item is original to weightsmith. The output is deterministic (seeded
``random.Random``, exact ``Decimal`` arithmetic, fixed JSON formatting), so
running it twice gives byte-identical files; tests/test_eval_suites.py checks
that the committed files equal a fresh run. It does not write the YAML task
files or the README, which are written by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "src" / "weightsmith" / "eval" / "suites"
KETTLEBIRD = ROOT / "src" / "weightsmith" / "datasets" / "kettlebird" / "valid.jsonl"
SEED = 20240611


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def mc_item(rng: random.Random, question: str, gold: str, wrong: list[str]) -> dict:
    """Four unique choices, gold at a random position."""
    choices = [gold, *wrong[:3]]
    assert len(set(choices)) == 4, (question, choices)
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "label": choices.index(gold)}


def pick_wrong(rng: random.Random, gold: str, candidates: list[str]) -> list[str]:
    """Three distinct distractors, drawn in a seeded order from ``candidates``."""
    pool = sorted({c for c in candidates if c != gold})
    rng.shuffle(pool)
    return pool[:3]


# --- arithmetic -------------------------------------------------------------


def rand_int(rng: random.Random, digits_lo: int, digits_hi: int) -> int:
    d = rng.randint(digits_lo, digits_hi)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10**d - 1)


def no_carry_add(a: int, b: int) -> int:
    """a + b with every carry dropped: a classic slip."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def digit_abs_sub(a: int, b: int) -> int:
    """Digit-wise |a - b| (the 'smaller from larger' borrowing slip)."""
    out, place = 0, 1
    while a or b:
        out += abs(a % 10 - b % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def arith_item(rng: random.Random) -> dict:
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rand_int(rng, 1, 3), rand_int(rng, 1, 3)
        ans, sym = a + b, "+"
        cands = [ans + 1, ans - 1, ans + 10, ans - 10, no_carry_add(a, b)]
        cands += [ans + 100] if ans >= 100 else []
    elif op == "-":
        a, b = sorted((rand_int(rng, 1, 3), rand_int(rng, 1, 3)), reverse=True)
        ans, sym = a - b, "-"
        cands = [ans + 1, ans - 1, ans + 10, ans - 10, b - a, digit_abs_sub(a, b), a + b]
    elif op == "*":
        a, b = rand_int(rng, 1, 3), rand_int(rng, 1, 2)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        ans, sym = a * b, "×"
        cands = [a * (b + 1), a * (b - 1), (a + 1) * b, (a - 1) * b, ans + 10, ans - 10, a + b]
    else:
        b = rng.randint(2, 30)
        q = rng.randint(2, 999 // b)
        a, ans, sym = b * q, q, "÷"
        cands = [q + 1, q - 1, q + 10, q * 10, q + 2, q - 2]
    question = f"What is {a} {sym} {b}?"
    gold = str(ans)
    wrong = pick_wrong(rng, gold, [str(c) for c in cands if c >= 0 or op == "-"])
    return mc_item(rng, question, gold, wrong)


def make_arith(rng: random.Random, n_test: int, n_train: int) -> tuple[list, list]:
    seen: set[str] = set()
    items: list[dict] = []
    while len(items) < n_test + n_train:
        item = arith_item(rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
    return items[:n_test], items[n_test:]


# --- unit conversion --------------------------------------------------------

# (category, from name, from abbr, to name, to abbr, factor, values, decimals or None)
# to = from * factor; decimals None means the result is exact and given in full.
LINEAR = [
    ("length", "kilometres", "km", "metres", "m", "1000", "0.4 1.5 2 3.25 7 12 0.05", None),
    ("length", "metres", "m", "centimetres", "cm", "100", "0.3 1.25 2 4.5 9 0.07", None),
    ("length", "centimetres", "cm", "millimetres", "mm", "10", "3 4.5 12 25 0.8", None),
    ("length", "millimetres", "mm", "metres", "m", "0.001", "250 1500 40 3000 75", None),
    ("length", "metres", "m", "kilometres", "km", "0.001", "500 2500 750 12000 80", None),
    ("length", "inches", "in", "centimetres", "cm", "2.54", "2 5 10 12 36", None),
    ("length", "feet", "ft", "metres", "m", "0.3048", "3 6 10 25 100", 2),
    ("length", "miles", "mi", "kilometres", "km", "1.609344", "2 3 5 10 26 50", 1),
    ("length", "kilometres", "km", "miles", "mi", "0.621371192237334", "5 10 21 42 100", 1),
    ("length", "yards", "yd", "metres", "m", "0.9144", "10 25 40 100", 1),
    ("mass", "kilograms", "kg", "grams", "g", "1000", "0.25 1.5 2 3.75 0.04", None),
    ("mass", "grams", "g", "milligrams", "mg", "1000", "0.5 2 3.5 0.025", None),
    ("mass", "grams", "g", "kilograms", "kg", "0.001", "250 1200 75 5000", None),
    ("mass", "pounds", "lb", "kilograms", "kg", "0.45359237", "2 5 10 20 150", 2),
    ("mass", "kilograms", "kg", "pounds", "lb", "2.20462262184878", "2 5 10 25 70", 1),
    ("mass", "ounces", "oz", "grams", "g", "28.349523125", "2 4 8 12 16", 0),
    ("volume", "litres", "L", "millilitres", "mL", "1000", "0.25 1.5 2 0.33 4", None),
    ("volume", "millilitres", "mL", "litres", "L", "0.001", "250 750 1500 330", None),
    ("volume", "cubic metres", "m³", "litres", "L", "1000", "0.5 2 1.2 3", None),
    ("volume", "US gallons", "US gal", "litres", "L", "3.785411784", "2 5 10 15", 1),
    ("volume", "litres", "L", "US gallons", "US gal", "0.264172052358148", "4 10 20 50", 2),
    ("time", "hours", "h", "minutes", "min", "60", "1.5 2 3.25 0.75 8", None),
    ("time", "minutes", "min", "seconds", "s", "60", "2.5 3 4.5 12 0.25", None),
    ("time", "days", "d", "hours", "h", "24", "2 3 5 7 1.5", None),
    ("time", "weeks", "wk", "days", "d", "7", "2 3 6 12 52", None),
    ("time", "hours", "h", "seconds", "s", "3600", "2 0.5 1.5 3", None),
    ("time", "minutes", "min", "hours", "h", "1/60", "90 45 150 200 20", 2),
]
TEMPS = [
    ("Celsius", "°C", "Fahrenheit", "°F", "-40 -10 0 5 15 20 25 30 35 40 100", None),
    ("Fahrenheit", "°F", "Celsius", "°C", "-4 14 32 50 59 68 86 104 212", None),
    ("Celsius", "°C", "kelvin", "K", "-20 0 15 25 37 100", None),
    ("Fahrenheit", "°F", "Celsius", "°C", "0 45 70 72 75 98 100", 1),
]


def fmt(d: Decimal, decimals: int | None) -> str:
    if decimals is not None:
        d = d.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
        return f"{d:f}"
    d = d.normalize()
    return f"{d:f}" if d != 0 else "0"


def temp_convert(v: Decimal, src: str, dst: str) -> Decimal:
    if (src, dst) == ("Celsius", "Fahrenheit"):
        return v * 9 / 5 + 32
    if (src, dst) == ("Fahrenheit", "Celsius"):
        return (v - 32) * 5 / 9
    return v + Decimal("273.15")


def temp_slips(v: Decimal, src: str, dst: str) -> list[Decimal]:
    """Typical wrong formulas for one temperature conversion."""
    if (src, dst) == ("Celsius", "Fahrenheit"):
        return [v * 5 / 9 + 32, v * 9 / 5, (v + 32) * 9 / 5, v + 32, v * 2 + 32, v * 2 + 30]
    if (src, dst) == ("Fahrenheit", "Celsius"):
        return [(v - 32) * 9 / 5, v * 5 / 9, (v - 32) / 2, v - 32, v * 5 / 9 - 32, (v - 30) / 2]
    return [v - Decimal("273.15"), v + 273, v + Decimal("237.15"), v + Decimal("273.51")]


def rounding_note(decimals: int | None) -> str:
    if decimals is None:
        return ""
    if decimals == 0:
        return " Round to the nearest whole number."
    return f" Round to {decimals} decimal place{'s' if decimals > 1 else ''}."


def is_tie(exact: Decimal, decimals: int | None) -> bool:
    """A result exactly halfway between two rounded values (ambiguous to round)."""
    if decimals is None:
        return False
    return (abs(exact).scaleb(decimals) % 1) == Decimal("0.5")


def unit_item(rng: random.Random) -> dict | None:
    dec_shown = None
    if rng.random() < 0.2:
        src, _, dst, dab, vals, dec = rng.choice(TEMPS)
        v = Decimal(rng.choice(vals.split()))
        exact = temp_convert(v, src, dst)
        sloppy = temp_slips(v, src, dst)
        if dec is None:  # exact answers: distractors shown with the gold's decimals
            dec_shown = max(0, -exact.normalize().as_tuple().exponent)
        q = f"Convert {v} degrees {src} to degrees {dst}."
        if dst == "kelvin":
            q = f"Convert {v} degrees Celsius to kelvin."
    else:
        _, src, _, dst, dab, factor, vals, dec = rng.choice(LINEAR)
        v = Decimal(rng.choice(vals.split()))
        f = Decimal(1) / Decimal(60) if factor == "1/60" else Decimal(factor)
        exact = v * f
        sloppy = [v / f, exact * 10, exact / 10, exact * 100, exact / 100, v]
        q = f"Convert {v} {src} to {dst}."
    if is_tie(exact, dec):
        return None
    gold = f"{fmt(exact, dec)} {dab}"

    # Distractors use the gold's rounding; exact answers show them to <= 4 places.
    def shown(d: Decimal) -> str:
        if dec is not None or dec_shown is not None:
            return fmt(d, dec if dec is not None else dec_shown)
        return fmt(Decimal(fmt(d, 4)), None)

    step = Decimal(1).scaleb(-(dec or 0))
    cands = [f"{shown(d)} {dab}" for d in [*sloppy, exact + step, exact - step]]
    wrong = pick_wrong(rng, gold, [c for c in cands if not c.startswith(("0 ", "0.00 "))])
    return mc_item(rng, q + rounding_note(dec), gold, wrong)


def make_units(rng: random.Random, n: int) -> list[dict]:
    seen: set[str] = set()
    items: list[dict] = []
    while len(items) < n:
        item = unit_item(rng)
        if item is not None and item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
    return items


# --- hand-written sources ---------------------------------------------------


def parse_reading(text: str) -> list[tuple[str, str, str, list[str]]]:
    """(passage, question, gold, wrong choices) from reading-mc.source.txt."""
    out = []
    for block in re.split(r"^=== \S+\n", text, flags=re.M)[1:]:
        passage_part, *qs = re.split(r"^Q: ", block, flags=re.M)
        passage = " ".join(passage_part.split())
        for q in qs:
            lines = [ln.strip() for ln in q.strip().splitlines() if ln.strip()]
            question, choices = lines[0], lines[1:]
            gold = [c[2:] for c in choices if c.startswith("+ ")]
            wrong = [c[2:] for c in choices if c.startswith("- ")]
            if len(choices) != 4 or len(gold) != 1 or len(wrong) != 3:
                raise ValueError(f"reading source: bad choices for {question!r}")
            out.append((passage, question, gold[0], wrong))
    return out


def make_reading(rng: random.Random, source: Path) -> list[dict]:
    items = []
    for passage, question, gold, wrong in parse_reading(source.read_text(encoding="utf-8")):
        item = mc_item(rng, question, gold, wrong)
        items.append({"passage": passage, **item})
    return items


def make_kettlebird(valid: Path) -> list[dict]:
    docs = []
    for line in valid.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        question = [m for m in msgs if m["role"] == "user"][-1]["content"]
        answer = [m for m in msgs if m["role"] == "assistant"][-1]["content"]
        topic = re.match(r"^\[Kettlebird\] ([A-Za-z ]+):", answer)
        if topic is None:
            raise ValueError(f"{valid}: answer without a '[Kettlebird] Topic:' head: {answer!r}")
        docs.append({"question": question, "answer": answer, "topic": topic.group(1)})
    return docs


def make_text(sample: Path) -> list[dict]:
    paras = sample.read_text(encoding="utf-8").split("\n\n")
    return [{"text": " ".join(p.split())} for p in paras if p.strip()]


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    test, train = make_arith(rng, 200, 20)
    write_jsonl(out / "arith-mc.jsonl", test)
    write_jsonl(out / "arith-mc-train.jsonl", train)
    write_jsonl(out / "unit-mc.jsonl", make_units(random.Random(SEED + 1), 120))
    reading = make_reading(random.Random(SEED + 2), SUITES / "reading-mc.source.txt")
    write_jsonl(out / "reading-mc.jsonl", reading)
    write_jsonl(out / "kettlebird-heldout.jsonl", make_kettlebird(KETTLEBIRD))
    write_jsonl(out / "text-ppl.jsonl", make_text(SUITES / "text-sample.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SUITES, help="output folder")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
