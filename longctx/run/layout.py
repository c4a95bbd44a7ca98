"""Every name inside OUTPUT_DIR (the run directory), in one place; every module that reads or writes a run imports
its names from here.

    OUTPUT_DIR/
      checkpoint-N/               adapter + optimizer, scheduler, RNG and trainer state; manifest.json written last
        eval_predictions.jsonl      evaluation: one line per validation example
      final_adapter/              the adapter after the last step, verified; manifest.json, final_state.json
      run_config.yaml             every setting's final value (evaluation scores with it)
      run_info.json               git commit, package versions, command, world size, the run's identity
      wandb_run.json              the W&B run's id: every relaunch and every evaluation log into that run
      .run_lock.json              the live launch's lease: a second launch into OUTPUT_DIR is refused
      preempted.json              the run stopped for a signal at a checkpoint: OVERWRITE=1 does not delete it
      wandb/                      the W&B run's files, one folder per launch
      token_lengths.json          length cache: the corpus's token counts, for the next launch's plan
      length_report.jsonl         every sample dropped or truncated for length
      bad_records.jsonl, data_usable/   on_bad_record: skip: the unusable records, the data without them
      eval_results.jsonl          evaluation: one row per scored checkpoint (and `base`, the model without adapter)
      eval_base_predictions.jsonl evaluation: the base model's predictions, one line per validation example
      eval_summary.md, rouge_by_step.png/.csv, rouge_by_length.png/.csv, loss_curve.png/.csv, best_checkpoint
                                  the evaluation's report
      averages/                   evaluation --average / --average_last: averaged adapters, never a training checkpoint
        average-400+450+474/        the exact average of the members' LoRA updates (longctx.model.averaging)
          average.json                members, their steps and adapter sha256, the truncated-SVD error report
          eval_predictions.jsonl      its row's predictions
"""

from __future__ import annotations

import re

# run directory
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoint-<global step>
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FINAL_ADAPTER = "final_adapter"
RUN_CONFIG = "run_config.yaml"
RUN_INFO = "run_info.json"
WANDB_RUN = "wandb_run.json"  # {id, project, name, mode, evaluations}
WANDB_DIR = "wandb"
LENGTH_CACHE = "token_lengths.json"
LENGTH_REPORT = "length_report.jsonl"
BAD_RECORDS_REPORT = "bad_records.jsonl"
USABLE_DATA_DIR = "data_usable"
SHARED_CHECK = ".output_dir_check"  # a token rank 0 writes and every rank must read back
RUN_LOCK = ".run_lock.json"  # the live launch's lease (longctx.run.lock): one live run per OUTPUT_DIR
PREEMPTED = "preempted.json"  # the run stopped for a signal at a checkpoint: its relaunch resumes, never overwrites
RESULTS_FILE = "eval_results.jsonl"
BASE_MODEL = "base"  # the results row of the base model without adapter, scored as global step 0
BASE_PREDICTIONS_FILE = "eval_base_predictions.jsonl"  # the base model's eval_predictions.jsonl
SUMMARY_FILE = "eval_summary.md"
ROUGE_PLOT = "rouge_by_step.png"
ROUGE_CSV = "rouge_by_step.csv"
LOSS_PLOT = "loss_curve.png"
LOSS_CSV = "loss_curve.csv"
LENGTH_PLOT = "rouge_by_length.png"  # ROUGE-Lsum by prompt-length bucket: base, best checkpoint, final adapter
LENGTH_CSV = "rouge_by_length.csv"
BEST_LINK = "best_checkpoint"

# inside a checkpoint or final_adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: every file with its size (and the sha256 of the adapter files)
FINAL_STATE = "final_state.json"  # final_adapter's {global_step}
PREDICTIONS_FILE = "eval_predictions.jsonl"

# averaged adapters (longctx.model.averaging): OUTPUT_DIR/averages/average-<step>+<step>+.../, outside the pattern
# of checkpoint-N, so checkpoint discovery, resume and the loss curve never take one for a training checkpoint
AVERAGES_DIR = "averages"
AVERAGE_PREFIX = "average-"  # + the members' steps joined by "+", ascending: average-400+450+474
AVERAGE_RE = re.compile(r"^average-(\d+(?:\+\d+)+)(?:-[0-9a-f]{8})?$")  # -<sha8>: only when the steps run too long
AVERAGE_INFO = "average.json"  # members (name, step, adapter sha256, rank, scaling), rank, truncated-SVD errors

# What a run and its evaluation write into OUTPUT_DIR besides checkpoint-*: OVERWRITE=1 removes these and the
# checkpoints, nothing else (files the project did not write stay).
RUN_OUTPUTS = (
    FINAL_ADAPTER, f".{FINAL_ADAPTER}.tmp", RUN_CONFIG, RUN_INFO, WANDB_RUN, LENGTH_REPORT, BAD_RECORDS_REPORT,
    USABLE_DATA_DIR, WANDB_DIR, LENGTH_CACHE, PREEMPTED, RESULTS_FILE, SUMMARY_FILE, ROUGE_PLOT, ROUGE_CSV, LOSS_PLOT, LOSS_CSV,
    BEST_LINK, BASE_PREDICTIONS_FILE, LENGTH_PLOT, LENGTH_CSV, AVERAGES_DIR,
)


def checkpoint_name(global_step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{global_step}"
