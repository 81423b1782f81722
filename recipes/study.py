#!/usr/bin/env python
"""Train and evaluate a study: several recipe runs, one evaluation, one table and a Pareto plot.

    python recipes/study.py --config recipes/studies/cpu_sigma_sweep.yaml --data-dir ../shared/data --no-download

Rerunning the command skips finished runs and resumes the interrupted one (see kapify.training.study).
"""

import sys

from kapify.training.study import main

if __name__ == "__main__":
    sys.exit(main())
