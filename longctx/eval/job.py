"""One evaluation invocation, checked: the evaluation's own options (EvalArguments), what changes its scores
(`scoring_settings`, fingerprinted), and `parse_job`, which turns the command line into an EvalJob. Every check that
needs no weights (settings, the validation file, the checkpoint given) runs here, before any process group or model.
How evaluation works as a whole: docs/evaluation.md."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import parse_config, validate_attention_masks, validate_chat_template, validate_data, validate_generation
from ..data.chat import check_template
from ..data.records import check_records
from ..errors import ConfigError
from ..model import averaging
from ..model.loading import resolve_dtype
from ..run import checkpoints
from ..run.checkpoints import Checkpoint
from ..run.layout import FINAL_ADAPTER, RESULTS_FILE
from ..settings import DATACLASSES, DataArguments, GenerationArguments, LoraArguments, ModelArguments
from ..utils.hashing import fingerprint, sha256_file
from .analysis import length_settings_problem
from .metrics import scoring_version

PROMPT_SETTINGS = ("max_eval_samples", "document_field", "summary_field", "id_field", "instruction", "system_prompt",
                   "max_seq_length", "length_policy")


@dataclass
class EvalArguments:
    """The options of the evaluation command (eval_checkpoint.py, eval_all_checkpoints.sh); every other flag is a
    setting of the run (run_config.yaml)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "The training run to score (OUTPUT_DIR): default, output_dir of the config; "
                                        "with --checkpoint, the checkpoint's own directory unless given as a flag."}
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
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a process waits for the others at a collective (as in training; the "
                                        "run's own value from run_config.yaml): the processes' shares of a "
                                        "checkpoint end at different times. NCCL's own default is 10 minutes."}
    )
    no_base: bool = field(
        default=False, metadata={"help": "Do not score the base model. By default --all_checkpoints and --follow "
                                         "score it once per run (no adapter, the same prompts and generation), as "
                                         "row 'base' at step 0: what fine-tuning is measured against."}
    )
    length_buckets: list[int] | None = field(
        default=None, metadata={"help": "Prompt-token edges of the report's ROUGE-Lsum by prompt length, e.g. "
                                        "32768 65536 131072 262144 (buckets up to each edge, then above the last). "
                                        "Unset: quantiles of the prompt lengths (up to 4) with at least "
                                        "length_bucket_min_examples each."}
    )
    length_bucket_min_examples: int = field(
        default=5, metadata={"help": "Fewest examples in a prompt-length bucket; one with fewer is merged with a "
                                     "neighbour. 5: 12 validation examples give 2 buckets, 400 give quartiles."}
    )
    average: list[str] | None = field(
        default=None, metadata={"help": "Also score the exact average of these checkpoints' LoRA updates as one more "
                                        "row, e.g. checkpoint-400 checkpoint-450 final_adapter (its adapter: "
                                        "OUTPUT_DIR/averages/average-400+450+474; longctx/model/averaging.py)."}
    )
    average_last: int | None = field(
        default=None, metadata={"help": "Also score the exact average of the run's last K complete checkpoints (one "
                                        "per step: final_adapter only where no checkpoint-N has its step)."}
    )
    preflight: bool = field(
        default=False, metadata={"help": "Check the settings and list what needs scoring, loading no model: exit 0 "
                                         "when there is work, 4 when every checkpoint is already scored (report "
                                         "refreshed), 2 on a bad setting. The launcher runs it before starting "
                                         "several processes."}
    )


@dataclass
class EvalJob:
    """One evaluation invocation, checked: what to score, where, with which settings."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    generation: GenerationArguments
    options: EvalArguments
    output_dir: Path
    single: Checkpoint | None  # --checkpoint
    scoring_settings: dict  # scoring_settings(): everything that changes the scores
    fingerprint: str  # of scoring_settings: rows with another one were scored differently

    @property
    def results_path(self) -> Path:
        return self.output_dir / RESULTS_FILE

    @property
    def scores_average(self) -> bool:
        return self.options.average is not None or self.options.average_last is not None

    @property
    def scores_base(self) -> bool:
        """The base model is scored with the run (--all_checkpoints, --follow), not for one --checkpoint."""
        return self.single is None and not self.options.no_base


def scoring_settings(model: ModelArguments, data: DataArguments, generation: GenerationArguments,
                     template: dict[str, str]) -> dict:
    """Everything that changes the predictions or their scores. A row scored with equal settings is reused instead of
    scored again. `template`: longctx.data.chat.template_record (the template's path and the sha256 of its text)."""
    return {
        "validation_sha256": sha256_file(data.validation_file),
        **{name: getattr(data, name) for name in PROMPT_SETTINGS},
        "model_name_or_path": model.model_name_or_path,
        "tokenizer_name_or_path": model.tokenizer_name_or_path,
        "chat_template": template["chat_template"], "chat_template_sha256": template["chat_template_sha256"],
        "dtype": str(resolve_dtype(model.torch_dtype)).replace("torch.", ""),
        # only when set, so the rows of runs without it keep their fingerprint
        **({"rope_yarn_factor": model.rope_yarn_factor} if model.rope_yarn_factor else {}),
        "max_new_tokens": generation.max_new_tokens,
        "generation_batch_size": generation.generation_batch_size,
        "decoding": "greedy",
        "scoring": scoring_version(),
    }



def all_setting_names() -> set[str]:
    """Every training setting: run_config.yaml holds them all, and evaluation accepts (and ignores) the others."""
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}


def _check_options(options: EvalArguments) -> None:
    if options.follow_poll_seconds <= 0:
        raise ConfigError(f"setting 'follow_poll_seconds' = {options.follow_poll_seconds!r}: use a positive number.")
    if options.follow_timeout_seconds is not None and options.follow_timeout_seconds <= 0:
        raise ConfigError(f"setting 'follow_timeout_seconds' = {options.follow_timeout_seconds!r}: use a positive "
                          f"number, or leave it unset to wait for {FINAL_ADAPTER}.")
    problem = length_settings_problem(options.length_buckets, options.length_bucket_min_examples)
    if problem:
        raise ConfigError(problem)
    averages = [name for name in ("average", "average_last") if getattr(options, name) is not None]
    if len(averages) == 2:
        raise ConfigError("settings 'average' and 'average_last' exclude each other: give one of them.")
    for other in ("checkpoint", "follow"):
        if averages and getattr(options, other):
            raise ConfigError(f"settings '{averages[0]}' and '{other}' exclude each other: an average is one more row "
                              f"of a whole run scored once (--all_checkpoints, as eval_all_checkpoints.sh runs it); "
                              f"drop one of them.")
    if options.average_last is not None and options.average_last < 2:
        raise ConfigError(f"setting 'average_last' = {options.average_last}: use 2 or more.")


def parse_job(argv: list[str] | None) -> EvalJob:
    """Settings + data checks, no weights. Raises ConfigError / DataError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    (model, data, lora, generation, options), _config_path, _ = parse_config(
        argv, (ModelArguments, DataArguments, LoraArguments, GenerationArguments, EvalArguments),
        tolerated_keys=all_setting_names())
    validate_data(data, need_train=False)
    validate_chat_template(model)
    check_records(data.validation_file, data)
    validate_generation(generation)
    validate_attention_masks(model, data, generation)
    _check_options(options)
    single = None
    if options.checkpoint:
        if options.follow:
            raise ConfigError("settings 'checkpoint' and 'follow' exclude each other: --follow watches a whole run "
                              "(--output_dir); drop one of them.")
        path = Path(options.checkpoint)
        problem = checkpoints.adapter_problem(path, require_manifest=False)  # also adapters saved elsewhere
        if problem:
            raise ConfigError(f"setting 'checkpoint' = {str(path)!r}: {problem}")
        single = Checkpoint(path, checkpoints.global_step_of(path) or 0)
        given = any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in argv)  # not the config's
        output_dir = Path(options.output_dir) if given else path.resolve().parent
    elif options.all_checkpoints or options.follow:
        output_dir = Path(options.output_dir or "")
        if not output_dir.is_dir():
            raise ConfigError(f"setting 'output_dir' = {str(output_dir)!r}: no such directory; set OUTPUT_DIR (or "
                              f"--output_dir) to the training run's output directory.")
        if options.average is not None:  # complete, of distinct steps, averageable: before any weight
            averaging.load_members(averaging.named_checkpoints(output_dir, options.average))
    elif options.average is not None or options.average_last is not None:
        raise ConfigError("an average is one more row of a whole run: add --all_checkpoints (eval_all_checkpoints.sh "
                          "passes it).")
    else:
        raise ConfigError("setting 'checkpoint' is unset: pass --checkpoint DIR, or --all_checkpoints.")
    settings = scoring_settings(model, data, generation, check_template(model, data))
    return EvalJob(model, data, lora, generation, options, output_dir, single, settings, fingerprint(settings))
