"""Score one checkpoint (or, with --all_checkpoints, every checkpoint of the run) with ROUGE; see longctx/eval/.

    python experiments/000_tiny_smoke/eval_checkpoint.py --config experiments/000_tiny_smoke/config.yaml \
        --checkpoint runs/000_tiny_smoke/checkpoint-50
"""

from longctx.eval.cli import main

if __name__ == "__main__":
    main()
