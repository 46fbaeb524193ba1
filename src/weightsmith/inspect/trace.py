"""`llm.trace(prompt)`: run a prompt through the model with hook points, keep what they saw.

    with llm.trace("The Eiffel Tower is in the city of") as t:
        resid = t["blocks.10.hook_resid_post"]            # (1, T, hidden)
    with llm.trace(prompt, edits={"blocks.3.attn.hook_z": Ablate(heads=[2])}) as t:
        t.logits                                          # (1, T, vocab) with head 3.2 removed

`run_hooked` is the same for token ids already batched, and what the analyses call. Names are
checked before anything runs (an unknown one gets a did-you-mean); the forward runs without
gradients unless `grad=True`.

Not here: hook points (hooks.py), edits (interventions.py), analyses (lens.py, patching.py,
attribution.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from weightsmith.inspect.hooks import Edit, HookState, InspectError, check_names, hooked
from weightsmith.models.model import CausalLM

Edits = Mapping[str, Edit | Sequence[Edit]]


def _edit_lists(edits: Edits | None) -> dict[str, list[Edit]]:
    return {name: [e] if callable(e) else list(e) for name, e in (edits or {}).items()}


def run_hooked(
    model: CausalLM,
    ids: torch.Tensor,
    *,
    edits: Edits | None = None,
    keep: Collection[str] | str = (),
    grad: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (B, T, V) for token ids (B, T) with `edits` applied, and the values at `keep`."""
    state = HookState(_edit_lists(edits), keep)
    with hooked(model, state), torch.inference_mode(False), torch.set_grad_enabled(grad):
        logits = model(ids.to(model.inv_freq.device))
    return logits, state.cache


def encode(tokenizer, prompt: str | Sequence[int], what: str = "prompt") -> list[int]:
    """The prompt's token ids (a string is tokenized as it is, no chat template); empty -> one line."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InspectError(f"the {what} is empty; give at least one token of text")
    return ids


class Trace:
    """One prompt run through the model with hook points (see the module doc).

    edits: hook name -> an edit or a list of edits (interventions.py, or any `(x, name) -> x`).
    names: the hook points to keep ("all" by default).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer,
        prompt: str | Sequence[int],
        *,
        edits: Edits | None = None,
        names: Collection[str] | str = "all",
        grad: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.tokens = encode(tokenizer, prompt)
        self.edits = _edit_lists(edits)
        self.names = names
        self.grad = grad
        check_names(model, list(self.edits) + ([] if names == "all" else list(names)))
        self.logits: torch.Tensor | None = None
        self.cache: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Trace:
        ids = torch.tensor([self.tokens])
        self.logits, self.cache = run_hooked(
            self.model, ids, edits=self.edits, keep=self.names, grad=self.grad
        )
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            check_names(self.model, [name])
            raise InspectError(f"{name} was not kept in this trace; add it to names=")
        return self.cache[name]

    def __contains__(self, name: str) -> bool:
        return name in self.cache

    def keys(self) -> list[str]:
        return list(self.cache)

    @property
    def str_tokens(self) -> list[str]:
        """Each token's text, for labels."""
        return [self.tokenizer.decode([t]) for t in self.tokens]
