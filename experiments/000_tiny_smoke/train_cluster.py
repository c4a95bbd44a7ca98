"""Train the embedded default (tiny Qwen3 + LoRA on a synthetic legal corpus, CPU).

    bash experiments/000_tiny_smoke/launch_train.sh
    python experiments/000_tiny_smoke/train_cluster.py --config experiments/000_tiny_smoke/config.yaml --help

Everything experiment-specific lives in config.yaml; this file only hands over to the shared library.
"""

from longctx.train import main

if __name__ == "__main__":
    main()
