"""Score one checkpoint (or, with --all_checkpoints, every checkpoint of the run) with ROUGE; see longctx/eval/.

    python experiments/011_million_tokens/eval_checkpoint.py --config experiments/011_million_tokens/config.yaml \
        --checkpoint runs/011_million_tokens/checkpoint-200
"""

from longctx.eval.cli import main

if __name__ == "__main__":
    main()
