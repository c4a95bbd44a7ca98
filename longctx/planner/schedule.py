"""The schedule of a training run, as transformers' Trainer will run it, and how long it takes.

Steps (transformers 5.23: Trainer.set_initial_training_values, TrainerState.compute_steps, DefaultFlowCallback;
accelerate's BatchSamplerShard with even_batches):
  micro-batches per GPU and epoch  ceil(ceil(kept / per_device_train_batch_size) / GPUs)   (floors with
                                   dataloader_drop_last); x sequence_parallel_size N: DeepSpeed's adapter hands
                                   each GPU the N batches of its SP group one at a time, each a 1/N slice of a
                                   sample, so a step holds batch x accumulation x GPUs / N samples
  optimizer steps per epoch        ceil(micro-batches / gradient_accumulation_steps); the last of an epoch takes
                                   the remaining micro-batches
  steps in all                     max_steps when set, else ceil(num_train_epochs x steps per epoch)
  save_steps / eval_steps          a value below 1 is a ratio of the steps in all: ceil(steps x ratio)
  checkpoints                      every save_steps, and at the last step (save_strategy: steps); every epoch end
                                   (epoch)
  evaluations                      every eval_steps from eval_delay on, and at the last step when it is not one
                                   already; every epoch end (epoch). At a step with both, the evaluation runs first.
Time: every kept sample's executed FLOPs (longctx.planner.flops) at the planned utilisation, + the offload copies
(each layer input to the host in the forward and back for its recompute, on the compute stream), spread evenly
over the GPUs (under SP a sample's work is shared by the N GPUs that hold it); each evaluation runs a forward of
every validation sample, spread over the GPUs (SP is off in evaluation: each GPU takes whole samples).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .corpus import Corpus
from .estimate import human_bytes
from .flops import forward_flops, human_duration, training_flops

# Host <-> GPU copies of offloaded activations: PCIe 5.0 x16 carries up to 64 GB/s each way; 25 GB/s assumed.
OFFLOAD_BYTES_PER_SECOND = 25e9
FEW_CHECKPOINTS = 5
LATE_FIRST_CHECKPOINT_HOURS = 2.0


@dataclass
class Batching:
    """How the Trainer feeds samples: everything the step count depends on besides the corpus."""

    per_device_batch: int
    grad_accum: int
    gpus: int
    epochs: float
    max_steps: int = -1
    drop_last: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    eval_strategy: str = "no"
    eval_steps: float | None = None
    eval_delay: float = 0
    per_device_eval_batch: int = 1
    sp: int = 1                   # sequence_parallel_size: GPUs sharing each sample


@dataclass
class Schedule:
    micro_batches_per_epoch: int          # per GPU
    steps_per_epoch: int
    total_steps: int
    save_every: int | None
    eval_every: int | None
    checkpoints: list[int]
    evaluations: list[int]
    micro_batches_in_step: list[int] = field(repr=False)   # per GPU, steps 1..total_steps


def _interval(value: float | None, total_steps: int) -> int | None:
    if value is None or value <= 0:
        return None
    return math.ceil(total_steps * value) if value < 1 else int(value)


def _epoch_ends(steps_per_epoch: int, total_steps: int) -> list[int]:
    return sorted({*range(steps_per_epoch, total_steps + 1, steps_per_epoch), total_steps})


def schedule(kept: int, b: Batching) -> Schedule:
    """The optimizer steps, checkpoints and evaluations of a run over `kept` samples (module docstring)."""
    batches = kept // b.per_device_batch if b.drop_last else math.ceil(kept / b.per_device_batch)
    per_gpu = (batches // b.gpus if b.drop_last else math.ceil(batches / b.gpus)) * b.sp
    steps_per_epoch = max(math.ceil(per_gpu / b.grad_accum), 1)
    total = b.max_steps if b.max_steps > 0 else math.ceil(b.epochs * steps_per_epoch)
    last_of_epoch = per_gpu - (steps_per_epoch - 1) * b.grad_accum
    micro = [last_of_epoch if step % steps_per_epoch == 0 else b.grad_accum for step in range(1, total + 1)]
    save_every = _interval(b.save_steps, total) if b.save_strategy == "steps" else None
    eval_every = _interval(b.eval_steps, total) if b.eval_strategy == "steps" else None
    if b.save_strategy == "steps" and save_every:
        checkpoints = sorted({*range(save_every, total + 1, save_every), total})
    elif b.save_strategy == "epoch":
        checkpoints = _epoch_ends(steps_per_epoch, total)
    else:
        checkpoints = []
    if b.eval_strategy == "steps" and eval_every:
        evaluations = [s for s in sorted({*range(eval_every, total + 1, eval_every), total}) if s >= b.eval_delay]
    elif b.eval_strategy == "epoch":
        evaluations = _epoch_ends(steps_per_epoch, total)
    else:
        evaluations = []
    return Schedule(per_gpu, steps_per_epoch, total, save_every, eval_every, checkpoints, evaluations, micro)


@dataclass
class Pace:
    """Seconds per unit of work on one GPU."""

    sample_seconds: float          # one training sample (mean over the corpus), offload copies included
    offload_seconds: float         # of which the offload copies
    eval_seconds: float            # one evaluation (forward of the validation share of one GPU)
    micro_batch_seconds: float     # per_device_train_batch_size samples


def sample_seconds(arch, tokens: list[int], label_tokens: int, lora_params: int, flops_per_second: float,
                   checkpointing: bool, tiled_mlp: bool, offload: bool, act_bytes: int) -> tuple[float, float]:
    """(mean seconds of one training sample, of which the offload copies) over the given sample lengths."""
    if not tokens:
        return 0.0, 0.0
    counts = Counter(tokens)  # a corpus has far fewer distinct lengths than samples
    compute = sum(n * training_flops(arch, t, min(label_tokens, t), lora_params, checkpointing, tiled_mlp).executed
                  for t, n in counts.items()) / flops_per_second
    copies = (sum(2 * arch.num_hidden_layers * t * arch.hidden_size * act_bytes * n for t, n in counts.items())
              / OFFLOAD_BYTES_PER_SECOND if offload else 0.0)
    return (compute + copies) / len(tokens), copies / len(tokens)


def eval_seconds(arch, validation: Corpus, label_tokens: int, lora_params: int, flops_per_second: float,
                 b: Batching) -> float:
    """One in-training evaluation: the loss of every validation sample (forward, logits at the label positions),
    each GPU taking ceil(ceil(samples / batch) / GPUs) micro-batches."""
    tokens = validation.sample_tokens()
    if not tokens:
        return 0.0
    per_gpu = math.ceil(math.ceil(len(tokens) / b.per_device_eval_batch) / b.gpus) * b.per_device_eval_batch
    mean = sum(n * forward_flops(arch, t, min(label_tokens, t), lora_params)
               for t, n in Counter(tokens).items()) / len(tokens)
    return per_gpu * mean / flops_per_second


def elapsed_seconds(plan: Schedule, pace: Pace, step: int) -> float:
    """From the start to the end of `step`, its evaluation included."""
    train = sum(plan.micro_batches_in_step[:step]) * pace.micro_batch_seconds
    return train + sum(1 for s in plan.evaluations if s <= step) * pace.eval_seconds


def checkpoint_bytes(lora_params: int, deepspeed: bool, save_only_model: bool) -> float:
    """One checkpoint on disk: the adapter (bf16 under DeepSpeed, else fp32), and unless save_only_model the
    optimizer: DeepSpeed's model states (bf16 adapters) + fp32 master weights and Adam moments; else Adam's two
    fp32 moments."""
    adapter = lora_params * (2 if deepspeed else 4)
    if save_only_model:
        return adapter
    return adapter + lora_params * ((2 + 12) if deepspeed else 8)


def steps_text(steps: list[int], total: int) -> str:
    shown = [f"{s}{' (end)' if s == total else ''}" for s in steps]
    return ", ".join(shown if len(shown) <= 12 else [*shown[:4], "...", *shown[-2:]])


def warnings(plan: Schedule, pace: Pace | None) -> list[str]:
    """What the user should know before committing GPUs to this schedule."""
    out = []
    if len(plan.checkpoints) < FEW_CHECKPOINTS:
        out.append(f"only {len(plan.checkpoints)} checkpoint(s) in {plan.total_steps} steps: a crash loses the work "
                   f"since the last one, and eval_all_checkpoints.sh scores only these; lower save_steps (a ratio "
                   f"such as 0.1 saves every tenth of the run)")
    if plan.checkpoints and pace is not None:
        first = elapsed_seconds(plan, pace, plan.checkpoints[0])
        if first > LATE_FIRST_CHECKPOINT_HOURS * 3600:
            out.append(f"the first checkpoint comes at step {plan.checkpoints[0]}, after {human_duration(first)} "
                       f"(estimated): a crash before it loses all of that; lower save_steps")
    orphans = sorted(set(plan.evaluations) - set(plan.checkpoints))
    if orphans and plan.checkpoints:
        out.append(f"evaluations at steps {steps_text(orphans, plan.total_steps)} have no checkpoint to score or "
                   f"resume from; give save_steps and eval_steps the same value")
    return out


def format_schedule(plan: Schedule, b: Batching, train: Corpus, validation: Corpus, pace: Pace | None,
                    ckpt_bytes: float, time_basis: list[str], devices: str) -> list[str]:
    """The schedule lines of the run plan: samples, steps, checkpoints, evaluations, time. `time_basis`: the lines
    saying what the time rests on; `devices`: "4 GPU(s)" or "1 process(es) (CPU)"."""
    per_step = b.per_device_batch * b.grad_accum * b.gpus // b.sp
    shared = f" / {b.sp} (sequence_parallel_size: GPUs sharing each sample)" if b.sp > 1 else ""
    lines = [f"Schedule on {devices}:",
             f"  train: {train.source}",
             f"    {train.records:,} records: {train.kept:,} kept, {train.dropped:,} dropped, {train.truncated:,} "
             f"truncated for length; {_tokens_text(train)}",
             f"  validation: {validation.source}",
             f"    {validation.kept:,} samples per evaluation; {_tokens_text(validation)}",
             f"  {b.per_device_batch} sample(s) x {b.grad_accum} gradient accumulation x {devices}{shared} = "
             f"{per_step} samples per optimizer step",
             f"  {plan.micro_batches_per_epoch:,} micro-batches per GPU and epoch"
             + (f" (each 1/{b.sp} of a sample's tokens)" if b.sp > 1 else "") + f" -> {plan.steps_per_epoch:,} "
             f"optimizer steps per epoch; {plan.total_steps:,} steps in all"
             + (" (max_steps)" if b.max_steps > 0 else f" ({b.epochs:g} epochs)")]
    lines.append(f"  checkpoints ({_when(b.save_strategy, b.save_steps, 'save_steps', plan.save_every)}): "
                 f"{len(plan.checkpoints)}"
                 + (f", at steps {steps_text(plan.checkpoints, plan.total_steps)}; about "
                    f"{human_bytes(ckpt_bytes)} each, {human_bytes(ckpt_bytes * len(plan.checkpoints))} in all"
                    if plan.checkpoints else ""))
    lines.append(f"  evaluations ({_when(b.eval_strategy, b.eval_steps, 'eval_steps', plan.eval_every)}): "
                 f"{len(plan.evaluations)}"
                 + (f", at steps {steps_text(plan.evaluations, plan.total_steps)}" if plan.evaluations else ""))
    if pace is None:
        lines += [f"  time: {time_basis[0]}", *time_basis[1:]]
    else:
        train_seconds = sum(plan.micro_batches_in_step) * pace.micro_batch_seconds
        evals = len(plan.evaluations) * pace.eval_seconds
        step = b.grad_accum * pace.micro_batch_seconds
        lines += [f"  time (estimate) at {time_basis[0]}", *(f"    {line}" for line in time_basis[1:]),
                  f"    one sample {human_duration(pace.sample_seconds)}" + (f" on {b.sp} GPUs" if b.sp > 1 else "")
                  + (f" (offload copies {human_duration(pace.offload_seconds)})" if pace.offload_seconds else "")
                  + f"; one optimizer step {human_duration(step)}; one epoch "
                  f"{human_duration(plan.micro_batches_per_epoch * pace.micro_batch_seconds)}",
                  f"    training {human_duration(train_seconds)} + {len(plan.evaluations)} evaluation(s) of "
                  f"{human_duration(pace.eval_seconds)} = {human_duration(train_seconds + evals)} in all"]
        if plan.checkpoints:
            first = plan.checkpoints[0]
            lines.append(f"    first checkpoint at step {first}, after "
                         f"{human_duration(elapsed_seconds(plan, pace, first))}")
    return lines


def _when(strategy: str, steps: float | None, name: str, every: int | None) -> str:
    if strategy != "steps":
        return f"strategy {strategy}"
    return f"{name} {steps:g} -> every {every} steps" if every else f"{name} {steps}"


def _tokens_text(corpus: Corpus) -> str:
    tokens = corpus.sample_tokens()
    if corpus.lengths is None:
        return f"planned at {corpus.typical_tokens:,} tokens per sample"
    if not tokens:
        return "no sample kept"
    return f"{sum(tokens) / len(tokens):,.0f} tokens per sample on average, longest {max(tokens):,}"

