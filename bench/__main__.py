"""`python -m bench`: the benchmark (bench/run.py)."""

import sys

from .run import main

sys.exit(main())
