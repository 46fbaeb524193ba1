"""The analyses on a loaded model and text: `ws.inspect.logit_lens(llm, "The Eiffel Tower is in")`.

Each takes an `LLM` (anything with `.model` and `.tokenizer`) and prompts as text (tokenized as
they are, no chat template) or token ids, and calls the model-level function of the same name
(lens.py, patching.py, attribution.py, directions.py) with the ids.
Not here: the analyses themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightsmith.inspect import attribution, directions, lens, patching
from weightsmith.inspect.trace import encode

Prompt = str | Sequence[int]


def logit_lens(llm: Any, prompt: Prompt, **options: Any) -> lens.LogitLens:
    """The logit lens over `prompt` (options: top_k, target): see lens.logit_lens."""
    return lens.logit_lens(llm.model, encode(llm.tokenizer, prompt), **options)


def direct_logit_attribution(llm: Any, prompt: Prompt, target: int, **options: Any) -> lens.LogitAttribution:
    """`target`'s logit at the last position split over components: see lens.direct_logit_attribution."""
    return lens.direct_logit_attribution(llm.model, encode(llm.tokenizer, prompt), target, **options)


def patch(
    llm: Any, clean: Prompt, corrupt: Prompt, answer: int, wrong: int, **options: Any
) -> patching.PatchResult:
    """Activation patching with the logit difference answer - wrong: see patching.patch."""
    metric = patching.logit_difference(answer, wrong)
    return patching.patch(
        llm.model, encode(llm.tokenizer, clean), encode(llm.tokenizer, corrupt), metric, **options
    )


def integrated_gradients(llm: Any, prompt: Prompt, target: int, **options: Any) -> attribution.Attribution:
    """Integrated gradients per prompt token: see attribution.integrated_gradients."""
    return attribution.integrated_gradients(llm.model, encode(llm.tokenizer, prompt), target, **options)


def attention_patterns(llm: Any, prompt: Prompt) -> torch.Tensor:
    """(L, H, T, T) attention patterns: see attribution.attention_patterns."""
    return attribution.attention_patterns(llm.model, encode(llm.tokenizer, prompt))


def difference_of_means(
    llm: Any, positive: Sequence[str], negative: Sequence[str], **options: Any
) -> directions.Direction:
    """A direction between two prompt sets: see directions.difference_of_means."""
    return directions.difference_of_means(llm.model, llm.tokenizer, positive, negative, **options)
