"""Train Qwen3-4B-Instruct-2507 + LoRA on documents of up to 1,048,576 tokens (YaRN RoPE scaling x4) -> summaries,
8xH100 ZeRO-2, each sample split over the 8 GPUs (sequence_parallel_size 8).

    bash experiments/011_million_tokens/launch_train.sh
    python experiments/011_million_tokens/train_cluster.py --config experiments/011_million_tokens/config.yaml --help

Everything experiment-specific lives in config.yaml; this file only hands over to the shared library.
"""

from longctx.train import main

if __name__ == "__main__":
    main()
