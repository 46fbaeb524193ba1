"""`python -m weightsmith ...`: the `weightsmith` command (what torchrun's `-m` runs)."""

from __future__ import annotations

import sys

from weightsmith.cli.main import main

if __name__ == "__main__":
    code = main()
    if code == 3:  # a launched rank that lost contact ends before shutdown can abort it
        from weightsmith.train.distributed import exit_rank

        exit_rank(code)
    sys.exit(code)
