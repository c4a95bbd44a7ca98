"""Score one checkpoint (or, with --all_checkpoints, every checkpoint of the run) with ROUGE; see longctx/eval/.

    python experiments/009_text_summary/eval_checkpoint.py --config experiments/009_text_summary/config.yaml \
        --checkpoint runs/009_text_summary/checkpoint-200
"""

from longctx.eval.cli import main

if __name__ == "__main__":
    main()
