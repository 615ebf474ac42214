"""`python -m mamba_compiled ...` is the `mamba-compiled` command (also under torchrun -m)."""

import sys

from mamba_compiled.cli import main

sys.exit(main())
