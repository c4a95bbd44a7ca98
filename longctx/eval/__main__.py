"""python -m longctx.eval --config RUN_DIR/run_config.yaml --run_dir RUN_DIR --all_checkpoints (see cli.py)."""

from .cli import main

main()
