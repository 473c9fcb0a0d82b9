"""`python -m eva02 ...`: the same command line as `eva02` (also usable under torchrun)."""

import sys

from eva02.cli import main

sys.exit(main())
