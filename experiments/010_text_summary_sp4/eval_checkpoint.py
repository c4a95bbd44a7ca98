"""Score one checkpoint (or, with --all_checkpoints, every checkpoint of the run) with ROUGE; see longctx/eval/.

    python experiments/010_text_summary_sp4/eval_checkpoint.py --config experiments/010_text_summary_sp4/config.yaml \
        --checkpoint runs/010_text_summary_sp4/checkpoint-200
"""

from longctx.eval.cli import main

if __name__ == "__main__":
    main()
