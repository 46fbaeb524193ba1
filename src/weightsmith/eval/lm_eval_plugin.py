"""lm-eval on weightsmith's engine: a `weightsmith` model class for lm-eval's registry.

Importing this module registers the class, so in Python
`lm_eval.simple_evaluate(model="weightsmith", model_args="model=smollm2-135m-instruct")`
runs lm-eval's whole task catalog on our scorer (batched, shared prefixes, adapters
folded in). lm-eval's command line has no plugin discovery for models, so the
`weightsmith-lm-eval` command registers the class and then runs lm-eval's own CLI with
the same arguments:

    weightsmith-lm-eval --model weightsmith --model_args model=smollm2-135m-instruct,adapter=runs/support \\
        --tasks hellaswag --limit 100

model_args: model (required), adapter, device, dtype, batch_size, max_length.
Needs the optional extra: pip install 'weightsmith[lm-eval]'.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval plugin needs lm-eval: pip install 'weightsmith[lm-eval]'") from exc

from weightsmith.eval.scorer import Scorer
from weightsmith.llm import load

logger = logging.getLogger(__name__)


@register_model("weightsmith")
class WeightsmithLM(LM):
    """lm-eval's three request types answered by `weightsmith.eval.scorer.Scorer`."""

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise; its HF backend falls
            # back to the CPU then, and so do we.
            logger.warning("device %s is not available; running on %s", device, "cpu")
            device = "cpu"
        self.llm = load(model, device=device, dtype=dtype, adapter=adapter)
        size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(
            self.llm.model,
            self.llm.tokenizer,
            batch_size=size,
            max_length=int(max_length) if max_length else None,
        )
        self._name = f"{model}+{adapter}" if adapter else model

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [tuple(r) for r in self.scorer.loglikelihood([tuple(req.args) for req in requests])]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until([(req.args[0], dict(req.args[1])) for req in requests])

    # Chat templates (lm-eval's --apply_chat_template)

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.tokenizer.chat_template if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.llm.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def main() -> None:
    """`weightsmith-lm-eval`: lm-eval's CLI with the `weightsmith` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "weightsmith-lm-eval"
    cli_evaluate()
