#!/usr/bin/env python3
"""Benchmark hybrid against the other ways of feeding a userspace engine, side by side.
The same as `hybridctl bench` (see its --help). Needs root. Examples:

    sudo .venv/bin/python scripts/bench.py                       # default modes and workloads
    sudo .venv/bin/python scripts/bench.py --quick               # smoke run (CI)
    sudo .venv/bin/python scripts/bench.py --modes hybrid,nfq-all --json out.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybrid.cli.main import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="hybridctl")
