"""ROUGE-L between instructions, and near-duplicate search against everything kept so far.

`tokenize` is rouge-score's default tokenisation without stemming (Lin's ROUGE-1.5.5 rule, as
`rouge_score.tokenize.tokenize(text, None)`): lower-case, every run of characters outside
[a-z0-9] becomes a space, split, keep tokens matching ^[a-z0-9]+$. `rouge_l` is
rouge-score's ROUGE-L F-measure (`RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure`),
computed with the same floating-point operations: precision = lcs/len(b), recall =
lcs/len(a), F = 2PR/(P+R), 0 when either side has no token. The LCS length comes from the
bit-parallel algorithm (Allison & Dix 1986; Hyyrö 2004) on Python integers, one word
operation per token of the second string instead of a table.

`NearDupIndex` answers "is this within ROUGE-L >= tau of anything added?" without comparing
against everything (self-instruct's filter, Wang et al. 2022). LCS <= the multiset overlap
of the two token lists, so F >= tau needs overlap >= tau * (m + n) / 2; with the length
bound that means overlap >= ceil(m * tau / (2 - tau)) for a side of m tokens. Each token
list becomes a set of (token, occurrence) elements in one global order (rare first) and a
record is indexed under its first m - ceil(m * tau / (2 - tau)) + 1 elements: two lists
that can reach tau share an element of those prefixes (prefix filtering: Chaudhuri et al.
2006; Bayardo et al. 2007). Candidates are checked with the exact score, so the kept set is
the all-pairs one.

Not here: other ROUGE variants, stemming, what a duplicate means for a run (synth.pipeline).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


def tokenize(text: str) -> list[str]:
    """rouge-score's tokens for `text` (no stemmer)."""
    tokens = _SPACES.split(_NON_ALNUM.sub(" ", text.lower()))
    return [t for t in tokens if _VALID.match(t)]


def _masks(tokens: list[str]) -> dict[str, int]:
    """Bit i of masks[t] is set where tokens[i] == t."""
    masks: dict[str, int] = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict[str, int], n: int, b: list[str]) -> int:
    """LCS length of a list of n tokens (given as its `_masks`) and `b`."""
    full = (1 << n) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return n - v.bit_count()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a  # the longer one is the bit vector: fewer loop turns in Python
    if not b:
        return 0
    return _lcs_with_masks(_masks(a), len(a), b)


def f_measure(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge-score's ROUGE-L F from an LCS length, with its operations in its order."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(target: str | list[str], prediction: str | list[str]) -> float:
    """ROUGE-L F-measure of `prediction` against `target` (strings or token lists)."""
    a = tokenize(target) if isinstance(target, str) else target
    b = tokenize(prediction) if isinstance(prediction, str) else prediction
    return f_measure(lcs_length(a, b), len(a), len(b))


def min_overlap(m: int, tau: float) -> int:
    """The fewest shared (token, occurrence) elements a list of m tokens needs with any other
    list for F >= tau; a hair under the real bound so rounding never loses a pair."""
    return max(1, math.ceil(m * tau / (2 - tau) - 1e-9))


def _elements(tokens: list[str]) -> list[tuple[str, int]]:
    seen: Counter[str] = Counter()
    out = []
    for t in tokens:
        out.append((t, seen[t]))
        seen[t] += 1
    return out


class NearDupIndex:
    """Token lists added so far, searchable for any within ROUGE-L >= `threshold` of a query.

    `reference` (texts) sets the global element order: elements frequent there come last, so
    prefixes are made of rare elements and few records share them; unseen elements come first.
    Any order gives the same answers; a good one gives them faster.
    """

    def __init__(self, threshold: float = 0.7, reference: Iterable[str] = ()) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"the ROUGE-L threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        freq: Counter[tuple[str, int]] = Counter()
        for text in reference:
            freq.update(_elements(tokenize(text)))
        self._freq = freq
        self._records: list[list[str]] = []
        self._texts: list[str] = []
        self._masks: list[dict[str, int]] = []
        self._lengths: list[int] = []
        self._postings: dict[tuple[str, int], list[tuple[int, int]]] = {}  # element -> (record, position)
        self.comparisons = 0  # exact scores computed (candidates that passed the filters)

    def __len__(self) -> int:
        return len(self._records)

    def _rank(self, element: tuple[str, int]) -> tuple[int, int]:
        # the frequency, then a stable hash (never Python's salted hash: the order must not change)
        return self._freq.get(element, 0), zlib.crc32(f"{element[0]}\0{element[1]}".encode())

    def _ordered(self, tokens: list[str]) -> list[tuple[str, int]]:
        return sorted(_elements(tokens), key=self._rank)

    def _candidates(self, tokens: list[str]) -> dict[int, int]:
        """Added lists that may reach the threshold: those sharing an element of the prefixes,
        within the length bound, and passing the positional filter (PPJoin, Xiao et al. 2008):
        the overlap seen so far plus the most still possible must reach the pair's bound."""
        m, tau = len(tokens), self.threshold
        low, high = m * tau / (2 - tau) - 1e-9, m * (2 - tau) / tau + 1e-9
        # the overlap a list of n tokens needs with this one; more than possible outside the length bound
        need = [
            math.ceil(tau * (m + n) / 2 - 1e-9) if low <= n <= high else m + n + 1
            for n in range(int(high) + 2)
        ]
        lengths, postings, far = self._lengths, self._postings, len(need) - 1
        counts: dict[int, int] = {}
        for i, element in enumerate(self._ordered(tokens)[: m - min_overlap(m, tau) + 1]):
            rest = m - i - 1
            for rec, j in postings.get(element, ()):
                seen = counts.get(rec, 0)
                if seen < 0:
                    continue
                n = lengths[rec]
                rest_y = n - j - 1
                if seen + 1 + (rest if rest < rest_y else rest_y) < need[n if n < far else far]:
                    counts[rec] = -1
                else:
                    counts[rec] = seen + 1
        return {rec: c for rec, c in counts.items() if c > 0}

    def nearest(self, tokens: list[str]) -> tuple[int, float] | None:
        """(index, score) of the added list most similar to `tokens` among those with ROUGE-L >=
        threshold (ties: the smaller text), None when there is none. The answer depends on
        what was added, not on the order it was added in (a resumed run rebuilds the index)."""
        if not tokens:
            return None  # no token: ROUGE-L is 0 against anything
        m = len(tokens)
        best: tuple[float, str, int] | None = None
        for i in self._candidates(tokens):
            self.comparisons += 1
            other = self._records[i]
            score = f_measure(_lcs_with_masks(self._masks[i], len(other), tokens), len(other), m)
            if score >= self.threshold and (best is None or (-score, self._texts[i]) < (-best[0], best[1])):
                best = (score, self._texts[i], i)
        return None if best is None else (best[2], best[0])

    def add(self, tokens: list[str], text: str | None = None) -> int:
        """Index `tokens` (of `text`); returns its position."""
        i = len(self._records)
        self._records.append(tokens)
        self._texts.append(" ".join(tokens) if text is None else text)
        self._masks.append(_masks(tokens))
        self._lengths.append(len(tokens))
        if tokens:
            ordered = self._ordered(tokens)
            for j, element in enumerate(
                ordered[: len(tokens) - min_overlap(len(tokens), self.threshold) + 1]
            ):
                self._postings.setdefault(element, []).append((i, j))
        return i

    def text(self, i: int) -> str:
        return self._texts[i]


def dedup(texts: Iterable[str], threshold: float = 0.7, reference: Iterable[str] | None = None) -> list[int]:
    """Indices of `texts` kept when each is dropped if within ROUGE-L >= threshold of one kept
    before it (the reference order defaults to the texts themselves)."""
    texts = list(texts)
    index = NearDupIndex(threshold, texts if reference is None else reference)
    kept = []
    for i, text in enumerate(texts):
        tokens = tokenize(text)
        if index.nearest(tokens) is None:
            index.add(tokens, text)
            kept.append(i)
    return kept
