"""Train Qwen3-4B-Instruct-2507 + LoRA on long legal documents -> summaries, 262,144 tokens, 4xH100 ZeRO-2.

    bash experiments/009_text_summary/launch_train.sh
    python experiments/009_text_summary/train_cluster.py --config experiments/009_text_summary/config.yaml --help

Everything experiment-specific lives in config.yaml; this file only hands over to the shared library.
"""

from longctx.train import main

if __name__ == "__main__":
    main()
