"""Model merging: several fine-tunes (forks) of one base model combined into one model.

`methods` holds the merge methods as tensor functions (linear, task arithmetic, TIES, DARE,
SLERP), `forks` turns each fork (a LoRA adapter, a full checkpoint, the base itself) into its
per-tensor delta, `settings` reads parameters that vary by tensor name and along the layers
(`--t self_attn=0,0.5,1`), and `merge` walks the model. `weightsmith merge --fork` runs it.

Not here: loading the base and saving the result (weightsmith.commands.train).
"""

from weightsmith.merging.forks import Fork, open_forks
from weightsmith.merging.merge import Recipe, merge_forks
from weightsmith.merging.methods import METHODS

__all__ = ["METHODS", "Fork", "Recipe", "merge_forks", "open_forks"]
