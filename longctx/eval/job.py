"""One evaluation invocation, checked: the evaluation's own settings (EvalArguments), and `parse_job`, which turns
the command line into an EvalJob. Every check that needs no weights (settings, the validation file, the checkpoint
given) runs here, before any process group or model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoints
from ..checkpoints import FINAL_ADAPTER, Checkpoint
from ..chat import check_template
from ..config import (ConfigError, parse_config, validate_attention_masks, validate_chat_template, validate_data,
                      validate_generation)
from ..records import check_records
from ..settings import DATACLASSES, DataArguments, GenerationArguments, LoraArguments, ModelArguments
from . import results


@dataclass
class EvalArguments:
    run_dir: str | None = field(
        default=None, metadata={"help": "Training output directory to score (default: output_dir of the config)."}
    )
    checkpoint: str | None = field(default=None, metadata={"help": "One adapter directory to score."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "As in training: 'wandb' logs ROUGE per checkpoint to W&B, into the "
                                                "training run when RUN_DIR/wandb_run.json names it."}
    )
    run_name: str | None = field(default=None, metadata={"help": "As in training: names the W&B run group."})
    all_checkpoints: bool = field(
        default=False, metadata={"help": "Score every complete checkpoint-N of run_dir in step order, then "
                                         "final_adapter."}
    )
    force: bool = field(
        default=False, metadata={"help": "Score again checkpoints that eval_results.jsonl already holds with the same "
                                         "validation data and generation settings (their rows are replaced)."}
    )
    follow: bool = field(
        default=False, metadata={"help": "Keep polling run_dir and score each new checkpoint as training saves it; "
                                         "stop once final_adapter is scored."}
    )
    follow_poll_seconds: float = field(
        default=60.0, metadata={"help": "With --follow: seconds between looks at run_dir."}
    )
    follow_timeout_seconds: float | None = field(
        default=None, metadata={"help": "With --follow: give up (exit 1) after this many seconds without a new "
                                        "checkpoint, e.g. when training died. Unset: wait for final_adapter."}
    )
    preflight: bool = field(
        default=False, metadata={"help": "Check the settings and list what needs scoring, loading no model: exit 0 "
                                         "when there is work, 3 when every checkpoint is already scored (report "
                                         "refreshed), 2 on a bad setting. The launcher runs it before starting "
                                         "several processes."}
    )


@dataclass
class EvalJob:
    """One evaluation invocation, checked: what to score, where, with which settings."""

    model_args: ModelArguments
    data: DataArguments
    lora: LoraArguments
    gen: GenerationArguments
    ev: EvalArguments
    run_dir: Path
    single: Checkpoint | None  # --checkpoint
    settings: dict  # results.eval_settings
    fingerprint: str

    @property
    def results_path(self) -> Path:
        return self.run_dir / results.RESULTS_FILE


def all_setting_names() -> set[str]:
    """Every training setting: run_config.yaml holds them all, and evaluation accepts (and ignores) the others."""
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}


def _check_positive(ev: EvalArguments) -> None:
    if ev.follow_poll_seconds <= 0:
        raise ConfigError(f"setting 'follow_poll_seconds' = {ev.follow_poll_seconds!r}: use a positive number.")
    if ev.follow_timeout_seconds is not None and ev.follow_timeout_seconds <= 0:
        raise ConfigError(f"setting 'follow_timeout_seconds' = {ev.follow_timeout_seconds!r}: use a positive "
                          f"number, or leave it unset to wait for {FINAL_ADAPTER}.")


def parse_job(argv: list[str] | None) -> EvalJob:
    """Settings + data checks, no weights. Raises ConfigError / DataError."""
    (model_args, data, lora, gen, ev), _config_path, extra = parse_config(
        argv, (ModelArguments, DataArguments, LoraArguments, GenerationArguments, EvalArguments),
        tolerated_keys=all_setting_names())
    validate_data(data, need_train=False)
    validate_chat_template(model_args)
    check_records(data.validation_file, data)
    validate_generation(gen)
    validate_attention_masks(model_args, data, gen)
    _check_positive(ev)
    single = None
    if ev.checkpoint:
        if ev.follow:
            raise ConfigError("settings 'checkpoint' and 'follow' exclude each other: --follow watches a whole run "
                              "(--run_dir); drop one of them.")
        path = Path(ev.checkpoint)
        problem = checkpoints.adapter_problem(path, require_manifest=False)  # also adapters saved elsewhere
        if problem:
            raise ConfigError(f"setting 'checkpoint' = {str(path)!r}: {problem}")
        single = Checkpoint(path, checkpoints.global_step_of(path) or 0)
        run_dir = Path(ev.run_dir) if ev.run_dir else path.resolve().parent
    elif ev.all_checkpoints or ev.follow:
        run_dir = Path(ev.run_dir or extra.get("output_dir") or "")
        if not run_dir.is_dir():
            raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: no such directory; set OUTPUT_DIR (or "
                              f"--run_dir) to the training run's output directory.")
    else:
        raise ConfigError("setting 'checkpoint' is unset: pass --checkpoint DIR, or --all_checkpoints.")
    settings = results.eval_settings(model_args, data, gen, check_template(model_args, data))
    return EvalJob(model_args, data, lora, gen, ev, run_dir, single, settings, results.fingerprint(settings))
