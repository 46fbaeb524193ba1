"""`python -m weightsmith ...`: the `weightsmith` command (what torchrun's `-m` runs)."""

from __future__ import annotations

import sys

from weightsmith.cli.main import main

if __name__ == "__main__":
    code = main()
    # A launched rank that finished or lost contact ends before shutdown can abort it (a rank
    # has imported the module; other commands do not pay for importing torch here).
    distributed = sys.modules.get("weightsmith.train.distributed")
    if code in (0, 3) and distributed is not None:
        distributed.exit_rank(code)
    sys.exit(code)
