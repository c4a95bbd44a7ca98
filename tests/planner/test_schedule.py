"""longctx.planner.flops / schedule: the FLOPs of a Qwen3-4B step at 262,144 tokens, the Trainer's step arithmetic,
checkpoints and evaluations, the time they take and the warnings, each against a computation written out here.

Qwen3-4B-Instruct-2507: hidden h 2,560, 36 layers, 32 query heads and 8 KV heads of width 128 (q 4,096, k / v
1,024), MLP 9,728, vocabulary 151,936. Linear weights of one layer: q 2,560 x 4,096 = 10,485,760; k, v 2,560 x
1,024 = 2,621,440 each; o 4,096 x 2,560 = 10,485,760; gate, up, down 2,560 x 9,728 = 24,903,680 each; sum
100,925,440; N = 36 x 100,925,440 = 3,633,315,840. LoRA r = 16 on the seven: 33,030,144 adapter weights.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from longctx.model.architecture import load_architecture
from longctx.planner.corpus import Corpus
from longctx.planner.flops import forward_flops, linear_weights, training_flops
from longctx.planner.schedule import Batching, Pace, elapsed_seconds, eval_seconds, sample_seconds, schedule, warnings
from support.paths import EXP_009, REPO_ROOT

ARCH = load_architecture("Qwen/Qwen3-4B-Instruct-2507", EXP_009)
S, LORA, LABELS = 262_144, 33_030_144, 512
# The parts, by hand (S^2 = 68,719,476,736; L H d = 36 x 32 x 128 = 147,456):
TWO_N_S = 1_904_903_895_121_920              # 2 N S = 2 x 3,633,315,840 x 262,144
ATTENTION = 20_266_198_323_167_232           # 2 L H d S^2 = 2 x 147,456 x 68,719,476,736 (causal half of 4 L H d S^2)
LORA_S = 33_030_144 * 262_144                # N_lora S = 8,658,780,930,048
HEAD = 398_291_107_840                       # 2 V h P = 2 x 151,936 x 2,560 x 512
MLP_FORWARD = 1_410_123_662_622_720          # 2 N_mlp S = 2 x 36 x 3 x 24,903,680 x 262,144


def test_linear_weights_of_qwen3_4b():
    assert linear_weights(ARCH) == 3_633_315_840


def test_a_262k_step_is_about_1e17_flops_forward_recompute_backward():
    flops = training_flops(ARCH, S, LABELS, LORA, checkpointing=True, tiled_mlp=False)
    # forward: 2 N S + 2 N_lora S + 2 L H d S^2 + 2 V h P
    assert flops.forward == TWO_N_S + 2 * LORA_S + ATTENTION + HEAD == 22_188_817_817_534_464
    # recomputed forward (checkpointing): the layers again, not the LM head
    assert flops.recompute == TWO_N_S + 2 * LORA_S + ATTENTION == 22_188_419_526_426_624
    # backward: input gradients of the frozen weights 2 N S, adapters 4 N_lora S, attention twice its forward, head
    assert flops.backward == TWO_N_S + 4 * LORA_S + 2 * ATTENTION + HEAD == 42_472_333_448_839_168
    assert flops.executed == 86_849_570_792_800_256  # 8.7e16: "about 1e17"
    assert 4 * ATTENTION / flops.executed == pytest.approx(0.9334, abs=1e-4)  # attention dominates
    # tiled_mlp runs each tile's MLP forward once more in its backward
    assert training_flops(ARCH, S, LABELS, LORA, tiled_mlp=True).executed == 86_849_570_792_800_256 + MLP_FORWARD
    assert training_flops(ARCH, S, LABELS, LORA, checkpointing=False).recompute == 0


def test_model_flops_are_the_benchmarks_formula():
    """benchmarks/gpu_long_context.py's MFU formula: T (4 N + 6 N_lora) + 6 L H d T^2 + 4 V h P."""
    spec = importlib.util.spec_from_file_location("gpu_long_context", REPO_ROOT / "benchmarks" / "gpu_long_context.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    arch = {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "head_dim": 128,
            "num_key_value_heads": 8, "intermediate_size": 9728, "vocab_size": 151936}
    expected = 262_144 * (4 * 3_633_315_840 + 6 * 33_030_144) + 3 * ATTENTION + 2 * HEAD  # 64,661,151,266,373,632
    assert benchmark.model_flops(arch, S, LABELS, LORA) == expected == 64_661_151_266_373_632
    assert training_flops(ARCH, S, LABELS, LORA).model == expected


def test_an_evaluation_forward_has_no_recomputation_or_backward():
    assert forward_flops(ARCH, S, LABELS, LORA) == TWO_N_S + 2 * LORA_S + ATTENTION + HEAD


def test_seconds_of_one_009_sample():
    # executed FLOPs with tiled_mlp: 86,849,570,792,800,256 + 1,410,123,662,622,720 = 88,259,694,455,422,976
    # at 0.35 x 989 TFLOP/s = 346.15e12 FLOP/s: 254.975 s; offload copies: 36 layer inputs of 262,144 x 2,560 x 2
    # bytes, each to the host and back: 2 x 36 x 1,342,177,280 = 96,636,764,160 bytes at 25e9 B/s = 3.865 s
    seconds, copies = sample_seconds(ARCH, [S], LABELS, LORA, 0.35 * 989e12, checkpointing=True, tiled_mlp=True,
                                     offload=True, act_bytes=2)
    assert copies == pytest.approx(3.86547, abs=1e-5)
    assert seconds == pytest.approx(88_259_694_455_422_976 / 346.15e12 + 3.86547, abs=1e-4)
    assert seconds == pytest.approx(258.84, abs=0.01)  # a few minutes; x 8 samples per GPU: about half an hour


def test_009_schedule_for_1000_records():
    # 1,000 samples, 1 per GPU, 4 GPUs: ceil(1,000 / 4) = 250 micro-batches per GPU and epoch; accumulation 8:
    # ceil(250 / 8) = 32 steps per epoch (31 of 8 micro-batches, the last of 250 - 31 x 8 = 2); 2 epochs: 64 steps.
    # save_steps = eval_steps = 0.1: ceil(64 x 0.1) = ceil(6.4) = 7 -> steps 7, 14, ..., 63 and the last, 64: 10 each
    b = Batching(per_device_batch=1, grad_accum=8, gpus=4, epochs=2, save_steps=0.1, eval_strategy="steps",
                 eval_steps=0.1)
    plan = schedule(1000, b)
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (250, 32, 64)
    assert plan.save_every == plan.eval_every == 7
    assert plan.checkpoints == plan.evaluations == [7, 14, 21, 28, 35, 42, 49, 56, 63, 64]
    assert plan.micro_batches_in_step[30:33] == [8, 2, 8] and sum(plan.micro_batches_in_step) == 500
    # the old 009 defaults, save_steps = eval_steps = 200 on the same 64 steps: only the end of the run
    old = schedule(1000, Batching(1, 8, 4, 2, save_steps=200, eval_strategy="steps", eval_steps=200))
    assert old.checkpoints == old.evaluations == [64]


def test_an_uneven_schedule_and_its_warnings():
    # 1,001 samples, 2 per GPU batch: ceil(1,001 / 2) = 501 batches; 4 GPUs: ceil(501 / 4) = 126 per GPU and epoch;
    # accumulation 4: ceil(126 / 4) = 32 steps per epoch, the last with 126 - 31 x 4 = 2 micro-batches;
    # 1.5 epochs: ceil(1.5 x 32) = 48 steps. save_steps 0.25: ceil(48 x 0.25) = 12 -> 12, 24, 36, 48.
    # eval_steps 10 from eval_delay 25: 30, 40, and the last step 48 (48 is no multiple of 10)
    b = Batching(per_device_batch=2, grad_accum=4, gpus=4, epochs=1.5, save_steps=0.25, eval_strategy="steps",
                 eval_steps=10, eval_delay=25)
    plan = schedule(1001, b)
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (126, 32, 48)
    assert plan.checkpoints == [12, 24, 36, 48] and plan.evaluations == [30, 40, 48]
    # time: 200 s per micro-batch, 100 s per evaluation. Step 12 ends after 12 x 4 = 48 micro-batches = 9,600 s.
    # Step 36 after the 126 micro-batches of epoch 1 + 4 steps of 4 = 142 -> 28,400 s, + the evaluation at 30
    pace = Pace(sample_seconds=100, offload_seconds=0, eval_seconds=100, micro_batch_seconds=200)
    assert elapsed_seconds(plan, pace, 12) == 9_600
    assert elapsed_seconds(plan, pace, 36) == 28_400 + 100
    assert warnings(plan, pace) == [
        "only 4 checkpoint(s) in 48 steps: a crash loses the work since the last one, and eval_all_checkpoints.sh "
        "scores only these; lower save_steps (a ratio such as 0.1 saves every tenth of the run)",
        "the first checkpoint comes at step 12, after 2.7 h (estimated): a crash before it loses all of that; lower "
        "save_steps",  # 9,600 s = 2.67 h > 2 h
        "evaluations at steps 30, 40 have no checkpoint to score or resume from; give save_steps and eval_steps the "
        "same value"]
    # at 100 s per micro-batch the first checkpoint comes after 4,800 s = 1.3 h: no warning about it
    quick = Pace(sample_seconds=50, offload_seconds=0, eval_seconds=100, micro_batch_seconds=100)
    assert not any("first checkpoint" in w for w in warnings(plan, quick))


def test_drop_last_and_max_steps():
    # dataloader_drop_last: 1,001 // 2 = 500 batches, 500 // 4 = 125 per GPU, ceil(125 / 4) = 32 steps per epoch;
    # max_steps 40 wins over the epochs; save_strategy epoch saves at each epoch end (32) and at the end (40)
    b = Batching(per_device_batch=2, grad_accum=4, gpus=4, epochs=3, max_steps=40, drop_last=True,
                 save_strategy="epoch")
    plan = schedule(1001, b)
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (125, 32, 40)
    assert plan.checkpoints == [32, 40] and plan.evaluations == []


def test_eval_seconds_spread_over_the_gpus():
    # 64 validation samples of 200,000 tokens, 1 per batch, 4 GPUs: 16 forwards per GPU, each
    # 2 N T + 2 N_lora T + 2 L H d T^2 + 2 V h P = 1,453,326,336,000,000 + 13,212,057,600,000
    # + 11,796,480,000,000,000 + 398,291,107,840 = 13,263,416,684,707,840 FLOPs; 16 of them at 346.15e12 FLOP/s
    validation = Corpus("validation", 64, 0, 0, 200_000, None, None, "test")
    seconds = eval_seconds(ARCH, validation, LABELS, LORA, 346.15e12, Batching(1, 8, 4, 2))
    assert seconds == pytest.approx(16 * 13_263_416_684_707_840 / 346.15e12)
    assert math.isclose(seconds / 60, 10.22, abs_tol=0.01)  # 10 min per evaluation, not "about a minute"


def test_a_sequence_parallel_schedule():
    # 010: 1,000 samples, 4 GPUs, sequence_parallel_size 4: each GPU's dataloader gets ceil(1,000 / 4) = 250 batches,
    # and DeepSpeed's adapter hands each GPU the 4 batches of its group one at a time, a quarter of a sample each:
    # 250 x 4 = 1,000 micro-batches per GPU and epoch. Accumulation 32: ceil(1,000 / 32) = 32 steps per epoch (31 of
    # 32 micro-batches, the last of 1,000 - 31 x 32 = 8); 1 x 32 x 4 / 4 = 32 samples per step, as 009's 1 x 8 x 4
    plan = schedule(1000, Batching(per_device_batch=1, grad_accum=32, gpus=4, epochs=2, sp=4))
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (1000, 32, 64)
    assert plan.micro_batches_in_step[30:33] == [32, 8, 32]
    # the CPU run of tests/test_sequence_parallel.py: 14 samples, 2 processes, SP 2, accumulation 2: 7 batches per
    # process x 2 = 14 micro-batches, ceil(14 / 2) = 7 steps (the steps that run logs)
    cpu = schedule(14, Batching(per_device_batch=1, grad_accum=2, gpus=2, epochs=1, sp=2))
    assert (cpu.micro_batches_per_epoch, cpu.total_steps) == (14, 7)
