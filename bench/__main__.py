"""`python -m bench`: run every benchmark in bench/ (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
