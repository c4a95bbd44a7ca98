"""The run plan: everything checkable about a training run before a GPU is taken, as one text and an exit status.

    make_run_plan(settings, machine) -> RunPlan(text, exit_status)

`python -m longctx.planner` prints it, and the launcher runs it before every launch (PLAN=check) or alone (PLAN=1):
the same settings give the same text wherever it runs, because the GPU count comes from the launch (--num_gpus,
or NUM_PROCESSES x NUM_MACHINES) and otherwise from the GPUs the experiment is sized for (plan_gpus), never from
the GPUs of the machine that prints it. Sections: the per-GPU memory of a step (estimate.py, advice.py), the
pinned host memory of activation offload against the machine's (host.py), the schedule and its time (corpus.py,
schedule.py, flops.py), the evaluation of a checkpoint (evaluation.py), and warnings.
Exit status: 0 go, 3 does not fit (GPU memory, or host memory where --host_memory_gib is given), 2 bad setting.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import exit_status
from ..config import validate_attention_masks, validate_memory, validate_sequence_parallel
from ..errors import ConfigError, DataError
from ..model.architecture import load_architecture, with_rope_yarn
from ..model.sequence_parallel import padded_length
from ..settings import GenerationArguments, LoraArguments, ModelArguments, PlanArguments, Settings
from .advice import fits, format_estimate
from .corpus import load_corpus
from .disk import DiskNeed
from .estimate import GIB, LORA_MODULES, StepShape, adapter_parameters, estimate, human_bytes, lora_parameter_count
from .evaluation import (
    EvalMemory,
    check_context_length,
    evaluation_memory,
    evaluation_seconds,
    format_evaluation,
    format_training_evaluation,
    training_evaluation_memory,
)
from .flops import default_mfu, training_flops
from .host import format_host, host_memory
from .schedule import (
    Batching,
    Pace,
    checkpoint_bytes,
    eval_seconds,
    format_schedule,
    sample_seconds,
    schedule,
    warnings,
)


@dataclass
class MachineArguments:
    """What the plan assumes of the machine and the launch, which the settings do not say: the launcher passes what
    it knows; `python -m longctx.planner` takes them as flags. The experiment's own plan_* settings are
    PlanArguments."""

    gpu_memory_gib: float = field(
        default=80.0, metadata={"help": "Memory of one GPU in GiB (the launcher passes the real one; default: the "
                                        "80 GB H100 / A100 the reference experiment targets)."})
    num_gpus: int | None = field(
        default=None, metadata={"help": "GPUs of this launch (the launcher passes NUM_PROCESSES x NUM_MACHINES on a "
                                        "machine with GPUs); unset: NUM_PROCESSES x NUM_MACHINES from the "
                                        "environment, else plan_gpus, else 1."})
    device: Literal["cuda", "cpu"] = field(
        default="cuda", metadata={"help": "cuda: plan for a GPU; cpu: print the breakdown, the limit does not apply."})
    label_tokens: int | None = field(
        default=None, metadata={"help": "Summary tokens per sample (logit rows); default: max_new_tokens."})
    experiment_dir: str | None = field(
        default=None, metadata={"help": "Folder with the model_architecture.json (used when the model's config.json "
                                        "cannot be read offline) and ds_config_zero2.json; default: the config's."})
    host_memory_gib: float | None = field(
        default=None, metadata={"help": "Host memory available to the training processes of this machine in GiB "
                                        "(MemAvailable; the launcher passes it on a machine with GPUs). With "
                                        "offload_activations, a plan that needs more stops with exit 3. Unset: "
                                        "not compared."})
    processes_per_machine: int | None = field(
        default=None, metadata={"help": "Training processes sharing one machine's host memory; unset: "
                                        "NUM_PROCESSES from the environment, else every GPU of the plan."})


@dataclass
class RunPlan:
    text: str            # what is printed (an "error: ..." line when exit_status is BAD_INPUT)
    exit_status: int     # longctx.exit_status: OK, DOES_NOT_FIT (GPU or host memory), BAD_INPUT


def planned_gpus(options: MachineArguments, plan: PlanArguments, env=os.environ) -> tuple[int, str]:
    """(GPUs of the plan, where that number comes from): the launch's when it is known, else the experiment's."""
    if options.num_gpus:
        return options.num_gpus, "--num_gpus"
    if env.get("NUM_PROCESSES"):
        processes, machines = int(env["NUM_PROCESSES"]), int(env.get("NUM_MACHINES") or 1)
        return processes * machines, f"NUM_PROCESSES x NUM_MACHINES = {processes} x {machines}"
    if plan.plan_gpus:
        return plan.plan_gpus, "plan_gpus, the GPUs the experiment is sized for"
    return 1, "no launch size and no plan_gpus: 1"


def _deepspeed_config(configured: str | dict | None, experiment_dir: Path | None,
                      device: str) -> tuple[dict[str, Any], str | None]:
    """The DeepSpeed config in use: the configured one, else the experiment's ds_config_zero2.json on GPUs (the
    launcher adds it there by default)."""
    if isinstance(configured, dict):
        return configured, "inline"
    candidate = configured
    if candidate is None and device == "cuda" and experiment_dir is not None:
        default = experiment_dir / "ds_config_zero2.json"
        candidate = str(default) if default.is_file() else None
    if candidate is None:
        return {}, None
    try:
        return json.loads(Path(candidate).read_text(encoding="utf-8")), candidate
    except (OSError, ValueError) as err:
        raise ConfigError(f"setting 'deepspeed' = {candidate!r}: cannot read it ({err}).") from err


def shown_path(path: str | os.PathLike) -> str:
    """A path as typed from the working directory, so that an absolute and a relative spelling print alike."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def lora_targets(lora: LoraArguments) -> tuple[str, ...]:
    return tuple(LORA_MODULES if lora.lora_target_modules == ["all-linear"] else lora.lora_target_modules)


def experiment_dir_of(settings: Settings, options: MachineArguments) -> Path | None:
    """Where model_architecture.json and ds_config_zero2.json are: --experiment_dir, else the config's folder."""
    if options.experiment_dir:
        return Path(options.experiment_dir)
    return Path(settings.config_path).resolve().parent if settings.config_path else None


def step_shape_from_settings(settings: Settings, options: MachineArguments, world: int) -> tuple[StepShape, str]:
    """(the step's shape on one GPU, the title of the memory plan)."""
    model, data, lora = settings.model, settings.data, settings.lora
    memory, generation, training = settings.memory, settings.generation, settings.training
    experiment_dir = experiment_dir_of(settings, options)
    arch = with_rope_yarn(load_architecture(model.model_name_or_path, experiment_dir), model.rope_yarn_factor)
    ds, ds_path = _deepspeed_config(training.deepspeed, experiment_dir, options.device)
    zero_settings = ds.get("zero_optimization", {})
    zero = int(zero_settings.get("stage", 0))
    bucket = zero_settings.get("reduce_bucket_size", 0)
    bucket = arch.hidden_size ** 2 if bucket == "auto" else int(float(bucket))  # DeepSpeed's "auto": hidden^2
    dtype = model.torch_dtype
    if dtype == "auto":
        dtype = "bfloat16" if options.device == "cuda" else "float32"
    weight_bytes = 4 if dtype == "float32" else 2
    act_bytes = 2 if (weight_bytes == 2 or training.bf16 or training.fp16) else 4
    attention = model.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2/sdpa" if options.device == "cuda" else "sdpa"
    targets = lora_targets(lora)
    batch = training.per_device_train_batch_size
    labels = options.label_tokens if options.label_tokens is not None else generation.max_new_tokens
    sp = memory.sequence_parallel_size
    if sp != 1:
        validate_sequence_parallel(memory, model, data, world, zero_settings if ds_path else None, ds_path, arch)
    shape = StepShape(
        arch=arch, tokens=batch * padded_length(data.max_seq_length, sp) // sp, label_tokens=batch * labels,
        act_bytes=act_bytes, sp_size=sp,
        weight_bytes=weight_bytes, lora_r=lora.lora_r, lora_targets=targets, lora_dropout=lora.lora_dropout,
        checkpointing=bool(training.activation_checkpointing), offload=memory.offload_activations,
        tiled_mlp=memory.tiled_mlp, tile_tokens=memory.tiled_mlp_tile_tokens, attention=attention,
        device=options.device, world_size=world, zero_stage=zero, reduce_bucket_elements=bucket,
        lora_params_fp32=(zero == 0 and weight_bytes == 2),
    )
    where = "per GPU" if options.device == "cuda" else "per process (CPU)"
    title = (f"Memory plan {where}: {data.max_seq_length:,} tokens x {batch} per micro-batch"
             + (f", split over {sp} GPUs" if sp > 1 else "")
             + (f" (DeepSpeed: {shown_path(ds_path)})" if ds_path and ds_path != "inline" else ""))
    return shape, title


def make_run_plan(settings: Settings, options: MachineArguments | None = None,
                  record_counts: dict[str, int] | None = None) -> RunPlan:
    """The run plan of an experiment's settings on a machine (`options`; None: the defaults). `record_counts`:
    {"train": n, "validation": n} already counted by longctx.data.records.check_records, so the files are not read
    again. Bad settings or data come back as BAD_INPUT with one "error: ..." line; nothing raises."""
    try:
        return _make_run_plan(settings, options or MachineArguments(), record_counts or {})
    except (ConfigError, DataError) as err:
        return RunPlan(f"error: {err}", exit_status.BAD_INPUT)


def _make_run_plan(settings: Settings, options: MachineArguments, record_counts: dict[str, int]) -> RunPlan:
    model, data, generation = settings.model, settings.data, settings.generation
    training, memory, plan = settings.training, settings.memory, settings.plan
    validate_memory(memory, training)
    validate_attention_masks(model, data, generation)
    gpus, gpus_source = planned_gpus(options, plan)
    shape, title = step_shape_from_settings(settings, options, gpus)
    step_memory = estimate(shape)
    cuda = shape.device == "cuda"
    limit = options.gpu_memory_gib if cuda else None
    status = exit_status.DOES_NOT_FIT if limit is not None and not fits(step_memory, limit) else exit_status.OK
    devices = f"{gpus} GPU(s)" if cuda else f"{gpus} process(es) (CPU)"
    config_path = settings.config_path
    lines = [f"Run plan for {shown_path(config_path) if config_path else 'the command line'}: "
             f"{model.model_name_or_path} on {devices} ({gpus_source})",
             format_estimate(step_memory, limit, title, data.max_seq_length)]

    corpus_args = (model, data, training.output_dir)
    train = load_corpus("train", *corpus_args, plan.plan_train_records, plan.plan_tokens_per_sample,
                        record_counts.get("train"))
    validation = load_corpus("validation", *corpus_args, plan.plan_validation_records or data.max_eval_samples,
                             plan.plan_tokens_per_sample, record_counts.get("validation"))
    if cuda:
        eval_lines, eval_fits = _training_evaluation_lines(settings, shape, step_memory, validation, options)
        lines.append("\n".join(eval_lines))
        status = status if eval_fits else exit_status.DOES_NOT_FIT
    if cuda and shape.offload and train.kept:
        per_row = training.per_device_train_batch_size
        input_bytes_per_token = shape.act_bytes * shape.arch.hidden_size  # one layer input
        # the corpus's own lengths when the cache gives them, else the typical sample and the longest allowed
        lengths = set(train.lengths) if train.lengths is not None else {train.typical_tokens, data.max_seq_length}
        sp = shape.sp_size  # a GPU offloads the inputs of its slice of the sequence: bytes of the slice, by sample
        tokens_of = {padded_length(t, sp) // sp * per_row * input_bytes_per_token: t * per_row for t in lengths}
        processes = options.processes_per_machine or int(os.environ.get("NUM_PROCESSES") or gpus)
        host = host_memory(shape.arch.num_hidden_layers, tokens_of, processes)
        kept_on_gpu = estimate(shape.replace(offload=False)).peak_bytes
        verdict = "fits" if kept_on_gpu <= limit * GIB else "does not fit"
        host_lines, host_fits = format_host(host, tokens_of, options.host_memory_gib,
                                            f"then {human_bytes(kept_on_gpu)} per GPU: {verdict} in {limit:g} GiB")
        lines.append("\n".join(host_lines))
        status = status if host_fits else exit_status.DOES_NOT_FIT

    warned: list[str] = []
    context = shape.arch.max_position_embeddings
    if context is not None and data.max_seq_length > context:
        warned.append(f"max_seq_length {data.max_seq_length:,} is past the {context:,} positions the model's rotary "
                      f"embedding covers{' (with rope_yarn_factor)' if model.rope_yarn_factor else ''}: positions "
                      f"beyond are untrained; set rope_yarn_factor (YaRN) to at least "
                      f"{data.max_seq_length / (context / (model.rope_yarn_factor or 1)):g}")
    if train.records is None:
        lines.append(f"Schedule: not planned: {train.source}; set plan_train_records (and plan_tokens_per_sample).")
    elif train.kept == 0:
        lines.append(f"Schedule: not planned: {train.source}")
        warned.append(f"every one of the {train.records:,} training samples is planned longer than max_seq_length "
                      f"{data.max_seq_length:,} and dropped (length_policy: drop): training would stop; raise "
                      f"max_seq_length, set length_policy: truncate_document, or correct plan_tokens_per_sample")
    else:
        lines.append("\n".join(_schedule_and_evaluation(settings, shape, options, (gpus, devices), train,
                                                        validation, warned)))
    if warned:
        lines.append("\n".join(["Warnings:"] + [f"  - {w}" for w in warned]))
    return RunPlan("\n".join(lines), status)


def _schedule_and_evaluation(settings: Settings, shape: StepShape, options: MachineArguments,
                             gpus_and_name: tuple[int, str], train, validation, warned: list[str]) -> list[str]:
    """The schedule and time lines, then (on a GPU) the evaluation plan; warnings go to `warned`."""
    generation, training, plan = settings.generation, settings.training, settings.plan
    gpus, devices = gpus_and_name
    arch, lora = shape.arch, lora_parameter_count(shape)
    batching = batching_of(training, gpus, shape.sp_size)
    run = schedule(train.kept, batching)
    labels = options.label_tokens if options.label_tokens is not None else generation.max_new_tokens
    deepspeed = shape.zero_stage > 0
    ckpt = checkpoint_bytes(lora, deepspeed, training.save_only_model)
    pace, basis = None, ["not estimated for a CPU run (plan_mfu and plan_gpu_peak_tflops describe a GPU)"]
    if shape.device == "cuda":
        mfu, mfu_source = default_mfu(plan.plan_mfu)
        rate = mfu * plan.plan_gpu_peak_tflops * 1e12
        per_sample, copies = sample_seconds(arch, train.sample_tokens(), labels, lora, rate, shape.checkpointing,
                                            shape.tiled_mlp, shape.offload, shape.act_bytes)
        sp = shape.sp_size  # a sample's FLOPs (and its offload copies) are shared by the sp GPUs that hold it
        pace = Pace(per_sample / sp, copies / sp, eval_seconds(arch, validation, labels, lora, rate, batching),
                    per_sample / sp * batching.per_device_batch)
        longest = max(train.sample_tokens())
        flops = training_flops(arch, longest, labels, lora, shape.checkpointing, shape.tiled_mlp)
        basis = [f"MFU {mfu:g} of {plan.plan_gpu_peak_tflops:g} TFLOP/s per GPU ({mfu_source}):",
                 f"a sample of {longest:,} tokens (the longest planned) executes {_flops(flops.executed)} FLOPs"
                 + (f", shared by the {shape.sp_size} GPUs that hold it," if shape.sp_size > 1 else "") + " = "
                 f"forward {_flops(flops.forward)} + recomputed forward {_flops(flops.recompute)} + backward "
                 f"{_flops(flops.backward)} (model FLOPs, without the recomputation: {_flops(flops.model)})"]
    lines = format_schedule(run, batching, train, validation, pace, ckpt, basis, devices)
    warned += warnings(run, pace)
    if shape.device == "cuda":
        lines += _evaluation_lines(settings, shape, options, gpus, validation, len(run.checkpoints) + 1, warned)
    return lines


def _training_evaluation_lines(settings: Settings, shape: StepShape, step_memory, validation,
                               options: MachineArguments) -> tuple[list[str], bool]:
    """The in-training evaluation forward (the eval loss every eval_steps) on one GPU: whole samples even under
    sequence parallelism, the longest validation sample from the length cache, else max_seq_length. (lines, fits)"""
    training, data = settings.training, settings.data
    strategy = str(getattr(training.eval_strategy, "value", training.eval_strategy))
    if strategy == "no":
        return ["In-training evaluation: off (eval_strategy no): nothing to plan"], True
    known = validation.lengths is not None and validation.lengths
    longest = max(validation.lengths) if known else data.max_seq_length
    tokens = padded_length(longest, shape.sp_size)  # the collator pads to a multiple of the SP size
    batch = training.per_device_eval_batch_size
    labels = options.label_tokens if options.label_tokens is not None else settings.generation.max_new_tokens
    memory = training_evaluation_memory(step_memory, tokens, batch, labels)
    limit = options.gpu_memory_gib
    advice = []
    if batch > 1:
        advice.append("per_device_eval_batch_size 1")
    if not shape.tiled_mlp and "MLP" in memory.part("forward working set").note:
        advice.append("tiled_mlp true")
    advice += [f"validation samples shorter than {longest:,} tokens (a validation_file of shorter documents)",
               "eval_strategy no (then score the checkpoints afterwards: eval_all_checkpoints.sh)"]
    whole = (", whole on each GPU (sequence parallelism is off in evaluation: training splits each sample over "
             f"{shape.sp_size})" if shape.sp_size > 1 else "")
    header = (f"In-training evaluation per GPU (the eval loss every eval_steps): {batch} x {tokens:,} tokens, the "
              f"longest validation sample ({'length cache' if known else 'max_seq_length: no length cache'}){whole}")
    return (format_training_evaluation(memory, limit, header, advice),
            limit is None or memory.peak_bytes <= limit * GIB)


def batching_of(training, gpus: int, sp_size: int) -> Batching:
    """The Trainer's batching and its save / evaluation strategy, from TrainingArguments."""
    def value(strategy) -> str:
        return str(getattr(strategy, "value", strategy))

    return Batching(
        per_device_batch=training.per_device_train_batch_size, grad_accum=training.gradient_accumulation_steps,
        gpus=gpus, epochs=training.num_train_epochs, max_steps=training.max_steps,
        drop_last=training.dataloader_drop_last, save_strategy=value(training.save_strategy),
        save_steps=training.save_steps, eval_strategy=value(training.eval_strategy), eval_steps=training.eval_steps,
        eval_delay=training.eval_delay or 0, per_device_eval_batch=training.per_device_eval_batch_size, sp=sp_size)


def disk_need(settings: Settings, options: MachineArguments | None = None,
              record_counts: dict[str, int] | None = None, existing_checkpoints: int = 0) -> tuple[DiskNeed, int]:
    """(what the run writes into OUTPUT_DIR, the tokens of the corpus it tokenizes), from the same schedule as the
    run plan: the checkpoints it saves, each of the size the adapter and optimizer give."""
    options, counts, training = options or MachineArguments(), record_counts or {}, settings.training
    gpus, _ = planned_gpus(options, settings.plan)
    shape, _ = step_shape_from_settings(settings, options, gpus)
    corpus = [load_corpus(split, settings.model, settings.data, training.output_dir, records,
                          settings.plan.plan_tokens_per_sample, counts.get(split))
              for split, records in (("train", settings.plan.plan_train_records),
                                     ("validation", settings.plan.plan_validation_records
                                      or settings.data.max_eval_samples))]
    saved = len(schedule(corpus[0].kept, batching_of(training, gpus, shape.sp_size)).checkpoints) \
        if corpus[0].records else 0
    kept = min(saved, training.save_total_limit + 1) if training.save_total_limit else saved
    lora = lora_parameter_count(shape)
    need = DiskNeed(checkpoint_bytes(lora, shape.zero_stage > 0, training.save_only_model), saved, kept,
                    existing_checkpoints, lora * shape.weight_bytes)
    return need, sum(sum(c.sample_tokens()) for c in corpus if c.records)


def _flops(value: float) -> str:
    return f"{value:.3g}".replace("e+", "e")


def make_evaluation_plan(model: ModelArguments, lora: LoraArguments, generation: GenerationArguments,
                         prompt_tokens: Sequence[int], gpus: int, experiment_dir: str | os.PathLike | None = None,
                         gpu_memory_gib: float = 80.0, checkpoints: int = 1, where: str = "",
                         plan: PlanArguments | None = None) -> RunPlan:
    """The evaluation plan of eval_checkpoint.py / eval_all_checkpoints.sh from the tokenized validation prompts (a
    tokenizer, no weights), for `gpus` evaluation processes scoring `checkpoints` adapters. BAD_INPUT with one
    "error: ..." line when a prompt + max_new_tokens runs past max_position_embeddings (`where` names the file in
    it), DOES_NOT_FIT when it does not fit one GPU of `gpu_memory_gib`, else OK. `plan` gives the MFU."""
    try:
        arch = with_rope_yarn(load_architecture(model.model_name_or_path, experiment_dir), model.rope_yarn_factor)
        longest = max(prompt_tokens)
        check_context_length(arch, longest, generation.max_new_tokens, where)
    except ConfigError as err:
        return RunPlan(f"error: {err}", exit_status.BAD_INPUT)
    weight_bytes = 4 if model.torch_dtype == "float32" else 2
    adapter = adapter_parameters(arch, lora.lora_r, lora_targets(lora))
    lines, memory = _evaluation_section(model, generation, plan or PlanArguments(), arch, weight_bytes, adapter,
                                        prompt_tokens, (longest, "longest prompt"), gpus, gpu_memory_gib, checkpoints)
    fits_one_gpu = memory.peak_bytes <= gpu_memory_gib * GIB
    return RunPlan("\n".join(lines), exit_status.OK if fits_one_gpu else exit_status.DOES_NOT_FIT)


def _evaluation_section(model: ModelArguments, generation: GenerationArguments, plan: PlanArguments, arch,
                        weight_bytes: int, lora: int, prompts: Sequence[int], longest: tuple[int, str], gpus: int,
                        gpu_memory_gib: float, scorings: int) -> tuple[list[str], EvalMemory]:
    """The evaluation plan's lines and memory; `longest`: (tokens of the longest prompt, where that comes from)."""
    flash = model.attn_implementation in ("auto", "flash_attention_2")  # auto without flash-attn: validated
    memory = evaluation_memory(arch, longest[0], generation.max_new_tokens, generation.generation_batch_size, weight_bytes, lora,
                               flash)
    mfu, _ = default_mfu(plan.plan_mfu)
    seconds = evaluation_seconds(arch, prompts, generation.max_new_tokens, generation.generation_batch_size, gpus,
                                 mfu * plan.plan_gpu_peak_tflops * 1e12, weight_bytes, lora)
    header = (f"Evaluation plan per GPU (eval_checkpoint.py / eval_all_checkpoints.sh): the longest prompt "
              f"{longest[0]:,} tokens ({longest[1]}) + max_new_tokens {generation.max_new_tokens}, generation_batch_size "
              f"{generation.generation_batch_size}")
    return format_evaluation(memory, gpu_memory_gib, seconds, len(prompts), gpus, scorings, header), memory


def _evaluation_lines(settings: Settings, shape: StepShape, options: MachineArguments, gpus: int, validation,
                      scorings: int, warned: list[str]) -> list[str]:
    """The run plan's evaluation section: the longest validation prompt from the length cache, else bounded by
    max_seq_length; a prompt the evaluation would refuse is a warning here, not a stop."""
    data, generation = settings.data, settings.generation
    arch = shape.arch
    known = validation.longest_prompt is not None
    longest = validation.longest_prompt if known else data.max_seq_length
    prompts = validation.prompt_lengths or validation.sample_tokens()
    lines, memory = _evaluation_section(settings.model, generation, settings.plan, arch, shape.weight_bytes,
                                        lora_parameter_count(shape), prompts,
                                        (longest, "length cache" if known else "max_seq_length: no length cache"),
                                        gpus, options.gpu_memory_gib, scorings)
    limit = arch.max_position_embeddings
    if limit is not None and longest + generation.max_new_tokens > limit:
        warned.append(f"evaluation refuses prompts over {limit - generation.max_new_tokens:,} tokens "
                      f"(max_position_embeddings {limit:,} - max_new_tokens {generation.max_new_tokens})"
                      + (f"; the longest validation prompt has {longest:,}" if known else
                         f"; samples up to max_seq_length {data.max_seq_length:,} may have such prompts"))
    if memory.peak_bytes > options.gpu_memory_gib * GIB:
        warned.append("evaluation does not fit one GPU (evaluation plan above)")
    return lines
