"""Every setting of an experiment, as dataclasses with their help: the keys of config.yaml, the flags of
train_cluster.py / eval_checkpoint.py / the planner, and the attributes the code reads (one name everywhere).

    python experiments/009_text_summary/train_cluster.py --config experiments/009_text_summary/config.yaml --help

Parsing (config.yaml + flags) and validation live in longctx.config, which returns one `Settings`: every group a
named field (settings.data.max_seq_length, settings.training.learning_rate). transformers' TrainingArguments is the
last group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


@dataclass
class ModelArguments:
    _argument_group_name = "model"

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
    rope_yarn_factor: float | None = field(
        default=None,
        metadata={"help": "Stretch the model's rotary position embedding with YaRN by this factor, in training and "
                          "evaluation: positions up to factor x its max_position_embeddings (the context it was "
                          "trained for; original_max_position_embeddings in YaRN's terms). 4.0 takes "
                          "Qwen3-4B-Instruct-2507 from 262,144 to 1,048,576 tokens. Unset: the model's own RoPE."},
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
    _argument_group_name = "data"

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
        metadata={"help": "error: stop before training, naming every unusable record (file:line, field, fix). "
                          "skip: leave such records out and list them in OUTPUT_DIR/bad_records.jsonl."},
    )
    datasets_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where datasets caches the tokenized corpus (default: HF_DATASETS_CACHE, else "
                          "~/.cache/huggingface/datasets). Rank 0 of the whole job tokenizes first and the others "
                          "read its cache: with several machines, put it on the shared filesystem."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training records."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation records."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Pad each batch to a multiple of N tokens. Leave unset: padding tokens cost compute, and "
                          "no kernel here needs it (flash-attention and SDPA take any length; the widths that tensor "
                          "cores want multiples of are the model's, not the sequence's)."},
    )


@dataclass
class LoraArguments:
    """The adapter peft builds (longctx.model.loading.apply_lora); saved with it, so evaluation rebuilds the same one."""

    _argument_group_name = "LoRA"

    lora_r: int = field(default=16, metadata={"help": "LoRA rank. Higher: more capacity and memory."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names that get LoRA adapters ('all-linear' for every linear layer)."},
    )


@dataclass
class MemoryArguments:
    """Long-context memory switches (longctx/model/tiling.py, offload.py, sequence_parallel.py);
    `python -m longctx.planner --config ...` shows their effect."""

    _argument_group_name = "memory (long context)"

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
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split each sample's sequence over this many GPUs (Ulysses sequence parallelism: DeepSpeed "
                          "ALST through accelerate and the Trainer): each GPU holds max_seq_length / N tokens of "
                          "activations. Needs DeepSpeed ZeRO 1-3, attention heads and KV heads divisible by N (or "
                          "N divisible by the KV heads), a world size divisible by N, sdpa or flash_attention_2. "
                          "An optimizer step then holds per_device_train_batch_size x gradient_accumulation_steps x "
                          "world size / N samples. 1: off."},
    )


@dataclass
class GenerationArguments:
    """How evaluation generates (longctx.eval). Training checks them at launch and keeps them in run_config.yaml, so
    a bad value fails before the GPU-day, not at evaluation."""

    _argument_group_name = "evaluation (ROUGE: eval_checkpoint.py / eval_all_checkpoints.sh)"

    max_new_tokens: int = field(default=512, metadata={"help": "Longest generated summary (evaluation)."})
    generation_batch_size: int = field(
        default=1, metadata={"help": "Prompts generated together (left padded) in evaluation."}
    )


@dataclass
class RunArguments:
    _argument_group_name = "run (resume, overwrite, watchdog, preemption)"

    resume: Literal["auto", "never"] = field(
        default="auto",
        metadata={"help": "auto: continue the run in output_dir from its newest complete checkpoint, when the data "
                          "and the settings that change the result are those it was started with (else a launch "
                          "error naming what differs). never: refuse an output_dir that already holds a run."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete the run already in output_dir (checkpoints, final adapter, reports, W&B files, "
                          "evaluation outputs) and start afresh, whatever resume says."},
    )
    watchdog_timeout_seconds: float | None = field(
        default=900,
        metadata={"help": "The end of the run (the last eval and save, the final adapter, teardown) must finish "
                          "within this time, or every thread's stack is written to the log and the process exits "
                          "non-zero (no silent hang). Leave room for one evaluation. Unset: no limit."},
    )
    step_timeout_seconds: float | None = field(
        default=None,
        metadata={"help": "Also guard every optimizer step, its eval and save included, with the watchdog "
                          "(seconds; unset: off). Leave room for the slowest step, the first one included."},
    )
    save_every_minutes: float | None = field(
        default=None,
        metadata={"help": "Also save a checkpoint at the end of the first optimizer step that ends this many "
                          "minutes after the last save (wall time, agreed by all ranks), on top of save_steps: at "
                          "long context a step takes tens of minutes. Unset: save_steps only."},
    )


@dataclass
class PlanArguments:
    """What the run plan (`python -m longctx.planner`, `PLAN=1` in the launcher) assumes where this machine cannot
    tell: the GPUs the experiment is sized for, the corpus when its files or their length cache are not at hand, and
    the GPU's speed. Training and evaluation read none of these."""

    _argument_group_name = "run plan (PLAN=1, python -m longctx.planner; training ignores these)"

    plan_gpus: int | None = field(default=None, metadata={"help": (
        "GPUs the experiment is sized for (data-parallel, all machines). The plan uses, in order: --num_gpus, "
        "NUM_PROCESSES x NUM_MACHINES from the environment, this; unset: 1.")})
    plan_validation_records: int | None = field(default=None, metadata={"help": (
        "Validation records to plan for when validation_file is not at hand; unset: max_eval_samples.")})
    plan_train_records: int | None = field(default=None, metadata={"help": (
        "Training records to plan for when train_file is not at hand (a laptop checking the cluster run); the "
        "file's own count wins when it is there.")})
    plan_gpu_peak_tflops: float = field(default=989.0, metadata={
        "help": "Peak dense bf16 TFLOP/s of one GPU (989: H100 / H200 SXM; 312: A100)."})
    plan_tokens_per_sample: int | None = field(default=None, metadata={"help": (
        "Typical prompt + summary tokens of a sample, when the length cache of a previous run "
        "(OUTPUT_DIR/token_lengths.json) does not match the data; unset: max_seq_length.")})
    plan_mfu: float | None = field(default=None, metadata={"help": (
        "Share of the GPU's peak bf16 FLOP/s a step achieves, counted on the FLOPs it executes "
        "(recomputation included). Unset: the figure measured in docs/benchmarks.md, or 0.35 "
        "(assumed) while there is none.")})


class TrainingSettings(TrainingArguments):
    """transformers' TrainingArguments, under a heading of its own in --help (after the project's settings)."""

    _argument_group_name = "transformers TrainingArguments (optimizer, schedule, precision, logging, saving, eval loss)"


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# The order of --help: the project's settings first, then transformers'.
DATACLASSES = (ModelArguments, DataArguments, LoraArguments, MemoryArguments, RunArguments, GenerationArguments,
               PlanArguments, TrainingSettings)


@dataclass
class Settings:
    """One experiment's settings as every module reads them: a named field per group, in the order of --help
    (longctx.config.parse_settings makes it from config.yaml + flags)."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    memory: MemoryArguments
    run: RunArguments
    generation: GenerationArguments
    plan: PlanArguments
    training: TrainingSettings
    config_path: str | None = None  # the config.yaml read, None for flags only

    @classmethod
    def from_groups(cls, groups: tuple, config_path: str | None = None) -> Settings:
        """From the parsed dataclass instances, in DATACLASSES order."""
        return cls(*groups, config_path=config_path)

    def groups(self) -> tuple:
        """The dataclass instances, in DATACLASSES order (what longctx.config.resolved_config flattens)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config_path")
