"""Compare runs: the jobs of a sweep, or any run folders; names the most robust run.

    python compare.py outputs/lidc/multirun/2026-01-01_12-00-00
    python compare.py runA runB runC --out comparison/ [--metric dice] [--eps 0.004] [--attack pgd10_linf]

Writes compare.md, compare.csv, compare.png and compare_<attack>_<metric>.png (see medrobust.reporting.comparison).
"""

from __future__ import annotations

import logging

from medrobust.reporting.comparison import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    main()
