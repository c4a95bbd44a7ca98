"""Every setting of an experiment, as dataclasses with their help: the keys of config.yaml, the flags of
train_cluster.py / eval_checkpoint.py / the planner, and the attributes the code reads (one name everywhere).

    python experiments/009_text_summary/train_cluster.py --config experiments/009_text_summary/config.yaml --help

Parsing (config.yaml + flags) and validation live in longctx.config; transformers' TrainingArguments is the last
group of DATACLASSES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen3-4B-Instruct-2507",
        metadata={"help": "Base model: a hub id or a local directory with config + weights."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer, when it is not stored with the model."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template (.jinja file, path from the repository root) for training and evaluation, "
                          "in place of the tokenizer's own: pins the template, so results do not depend on the hub "
                          "snapshot a machine downloads. Unset: the tokenizer's template."},
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = field(
        default="auto",
        metadata={"help": "auto: flash_attention_2 when flash_attn imports on CUDA, else PyTorch sdpa. "
                          "eager materialises seq x seq scores: never use it at long context."},
    )
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": "Weight dtype. auto: bfloat16 on a GPU that supports it, float32 on CPU."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the model repository. Off unless you trust its author."},
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Training records, .jsonl/.json or .parquet (one record per line/row)."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation records, same format. Used for eval loss and ROUGE."}
    )
    document_field: str = field(default="document", metadata={"help": "Record field holding the long input."})
    summary_field: str = field(default="summary", metadata={"help": "Record field holding the target."})
    id_field: str = field(
        default="id", metadata={"help": "Record field naming the record in reports; <split>:<row> when absent."}
    )
    instruction: str = field(
        default="Summarize the following legal document.",
        metadata={"help": "Text placed before the document in the user turn."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system turn."})
    max_seq_length: int = field(
        default=262144,
        metadata={"help": "Longest prompt + summary in tokens. Longer samples follow length_policy."},
    )
    length_policy: Literal["drop", "truncate_document"] = field(
        default="drop",
        metadata={"help": "drop: leave out samples longer than max_seq_length. truncate_document: cut the end of "
                          "the document (never the instruction or the summary). Both are listed in "
                          "OUTPUT_DIR/length_report.jsonl."},
    )
    on_bad_record: Literal["error", "skip"] = field(
        default="error",
        metadata={"help": "error: stop before training at the first unusable record (file, line, field, fix). "
                          "skip: leave such records out and list them in OUTPUT_DIR/bad_records.jsonl."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch to a multiple of N tokens (8 suits tensor cores)."}
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank. Higher: more capacity and memory."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names that get LoRA adapters ('all-linear' for every linear layer)."},
    )


@dataclass
class MemoryArguments:
    """Long-context memory switches (longctx/tiling.py, longctx/offload.py); `python -m longctx.planner --config ...`
    shows their effect."""

    tiled_mlp: bool = field(
        default=False,
        metadata={"help": "Run every decoder layer's MLP over the sequence in tiles of tiled_mlp_tile_tokens "
                          "(DeepSpeed TiledMLP), in the forward and in the checkpointed recompute, so one layer's "
                          "MLP intermediate (tokens x intermediate_size) never exists for the whole sequence. Costs "
                          "one more MLP forward per step. Needs DeepSpeed (or one process) when training."},
    )
    tiled_mlp_tile_tokens: int = field(
        default=8192,
        metadata={"help": "Tokens per MLP tile (batch x sequence tokens are tiled together). Smaller: less memory "
                          "per tile, smaller matmuls. Samples of at most this many tokens run untiled."},
    )
    offload_activations: bool = field(
        default=False,
        metadata={"help": "Keep the checkpointed layer inputs (layers x tokens x hidden_size) in pinned CPU memory "
                          "and bring each back for its layer's recompute (transformers activation_checkpointing_kwargs "
                          "offload -> torch save_on_cpu). Needs activation_checkpointing and that much host RAM per "
                          "process; slower steps."},
    )


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=512, metadata={"help": "Longest generated summary (evaluation)."})
    generation_batch_size: int = field(
        default=1, metadata={"help": "Prompts generated together (left padded) in evaluation."}
    )


@dataclass
class RunArguments:
    resume: Literal["auto", "never"] = field(
        default="auto",
        metadata={"help": "auto: continue from the newest complete checkpoint in output_dir, if any. never: start "
                          "fresh, and refuse an output_dir that already holds checkpoints unless overwrite is set."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "With resume: never, delete the checkpoints, final adapter and reports already in "
                          "output_dir before starting."},
    )
    watchdog_timeout_seconds: float | None = field(
        default=900,
        metadata={"help": "The final save and teardown must finish within this time, or every thread's stack is "
                          "written to the log and the process exits non-zero (no silent hang). Unset: no limit."},
    )
    step_timeout_seconds: float | None = field(
        default=None,
        metadata={"help": "Also guard each optimizer step with the watchdog (seconds; unset: off). Leave room for "
                          "the slowest step, the first one included."},
    )


DATACLASSES = (ModelArguments, DataArguments, LoraArguments, MemoryArguments, GenerationArguments, RunArguments,
               TrainingArguments)
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
