"""python -m longctx.planner --config experiments/009_text_summary/config.yaml (longctx/planner/cli.py)."""

import sys

from .cli import main

sys.exit(main())
