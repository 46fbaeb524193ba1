"""weightsmith: own the whole life cycle of an open-weight language model.

import weightsmith as ws
llm = ws.load("smollm2-135m-instruct")
llm.generate("Once upon a time", max_tokens=32, temperature=0)
"""

from weightsmith import inspect
from weightsmith.errors import WeightsmithError
from weightsmith.llm import LLM, load
from weightsmith.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "WeightsmithError", "__version__", "inspect", "load"]
