"""Train Qwen3-4B-Instruct-2507 + LoRA on long legal documents -> summaries, 262,144 tokens, 4xH100 ZeRO-2, each
sample split over the 4 GPUs (sequence_parallel_size 4).

    bash experiments/010_text_summary_sp4/launch_train.sh
    python experiments/010_text_summary_sp4/train_cluster.py --config experiments/010_text_summary_sp4/config.yaml --help

Everything experiment-specific lives in config.yaml; this file only hands over to the shared library.
"""

from longctx.train import main

if __name__ == "__main__":
    main()
