"""`python -m weightsmith ...`: the `weightsmith` command (what torchrun's `-m` runs)."""

from __future__ import annotations

import sys

from weightsmith.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
