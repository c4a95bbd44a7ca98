"""python -m longctx.planner and the launcher's PLAN knob: 009's config parsed as training parses it (the same
refusals of a shortened or misspelled flag, training-only flags accepted, bf16 accepted on this GPU-less machine),
the printed figures against the hand computations of tests/test_planner_estimate.py and test_planner_schedule.py,
the GPU count of the plan, the same text from the launcher as from the command line, exit statuses 0 / 2 / 3."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from longctx import exit_status
from longctx.planner import cli
from longctx.train import main as train_main
from support import paths
from support.env import subprocess_env
from support.paths import EXP_000, EXP_009, REPO_ROOT

CONFIG_009, CONFIG_010, CONFIG_011 = str(paths.CONFIG_009), str(paths.CONFIG_010), str(paths.CONFIG_011)


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """The world size comes from --num_gpus or plan_gpus here, not from a caller's launcher variables; the pinned
    allocator has torch's defaults."""
    for name in ("NUM_PROCESSES", "NUM_MACHINES", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "PYTORCH_ALLOC_CONF",
                 "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


def test_009_configured_plan_fits_with_the_hand_computed_figures(capsys):
    assert cli.main(["--config", CONFIG_009]) == 0  # bf16: true is accepted although this machine has no GPU
    out = capsys.readouterr().out
    # the peak computed by hand in test_planner_estimate.py: 60,659,165,798.4 bytes = 56.49 GiB, of 80 GiB 70.6%,
    # 80 - 56.49 = 23.51 GiB to spare; ZeRO-2 over 4 GPUs (009's DeepSpeed config, 4 when no launcher says)
    assert f"  {'estimated peak':<46}{'56.49 GiB':>11}" in out.splitlines()
    assert "  verdict: fits in 80 GiB (71%, 23.51 GiB to spare)." in out.splitlines()
    assert "DeepSpeed ZeRO-2 over 4 GPU(s)" in out  # plan_gpus: 4 in 009's config, on this GPU-less machine
    for part in ("weights", "LoRA + optimizer", "framework", "checkpointed layer inputs", "logits at label positions",
                 "one layer's recompute (MLP backward)", "one layer's recompute (attention backward)"):
        assert f"    {part:<44}" in out
    assert "architecture: " + str(EXP_009 / "model_architecture.json") in out


def test_009_without_the_switches_does_not_fit_and_names_the_fix(capsys):
    code = cli.main(["--config", CONFIG_009, "--tiled_mlp", "false", "--offload_activations", "false",
                     "--learning_rate", "5e-5"])  # a training-only flag: parsed by TrainingArguments, accepted
    out = capsys.readouterr().out
    assert code == exit_status.DOES_NOT_FIT == 3
    # by hand (test_without_either_switch_...): 130,163,396,812.8 bytes = 121.22 GiB, 41.22 GiB over 80
    assert "  verdict: DOES NOT FIT in 80 GiB (over by 41.22 GiB)." in out.splitlines()
    # both switches give 009's configured peak, 56.49 GiB; 164,864 tokens is the hand-computed longest fitting length
    assert "    --tiled_mlp true --offload_activations true  -> 56.49 GiB" in out.splitlines()
    assert "    --max_seq_length 164864  (with the current switches)" in out.splitlines()


def test_009_without_the_switches_fits_with_each_sample_over_two_gpus(capsys):
    assert cli.main(["--config", CONFIG_009, "--tiled_mlp", "false", "--offload_activations", "false"]) == 3
    # SP 2: 131,072 tokens per GPU, no switches: checkpointed inputs 25,568,477,184 + MLP backward 239,112 x 131,072
    # = 31,340,888,064 (the peak phase; the attention backward with its 5,368,709,120 all-to-all is 25,758,269,440);
    # framework 2,410,612,736 + 5% x 56,909,365,248; + weights and LoRA: 70,408,563,302.4 bytes = 65.57 GiB
    assert ("    --sequence_parallel_size 2  -> 65.57 GiB (each sample over 2 of the 4 GPUs)"
            in capsys.readouterr().out.splitlines())


def test_010_and_011_plans_fit_with_the_hand_computed_peaks(capsys):
    """The peaks of test_planner_estimate.py (test_010_... and test_011_peak_per_gpu_is_the_sum_of_the_parts)."""
    assert cli.main(["--config", CONFIG_010]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("  65,536 tokens per GPU (each sample split over 4 GPUs: sequence_parallel_size), bf16/fp16 activations, "
            "LoRA r=16 on 7 module types, DeepSpeed ZeRO-2 over 4 GPU(s), attention: flash_attention_2/sdpa") in out
    assert f"  {'estimated peak':<46}{'37.75 GiB':>11}" in out
    assert "  verdict: fits in 80 GiB (47%, 42.25 GiB to spare)." in out
    assert not any(line.startswith("Host memory") for line in out)  # no offload: nothing pinned
    # test_a_sequence_parallel_schedule
    assert ("  1 sample(s) x 32 gradient accumulation x 4 GPU(s) / 4 (sequence_parallel_size: GPUs sharing each "
            "sample) = 32 samples per optimizer step") in out
    assert ("  1,000 micro-batches per GPU and epoch (each 1/4 of a sample's tokens) -> 32 optimizer steps per "
            "epoch; 64 steps in all (2 epochs)") in out
    assert cli.main(["--config", CONFIG_011]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("Run plan for experiments/011_million_tokens/config.yaml: Qwen/Qwen3-4B-Instruct-2507 on 8 "
                      "GPU(s) (plan_gpus, the GPUs the experiment is sized for)")
    assert f"  {'estimated peak':<46}{'60.71 GiB':>11}" in out
    assert "  verdict: fits in 80 GiB (76%, 19.29 GiB to spare)." in out
    # rope_yarn_factor 4: 4 x 262,144 = 1,048,576 positions, less max_new_tokens 512
    assert ("  - evaluation refuses prompts over 1,048,064 tokens (max_position_embeddings 1,048,576 - max_new_tokens "
            "512); samples up to max_seq_length 1,048,576 may have such prompts") in out
    assert not any("rotary embedding covers" in line for line in out)


def test_011_on_four_gpus_with_offload_pins_a_quarter_of_each_sample(capsys):
    assert cli.main(["--config", CONFIG_011, "--plan_gpus", "4", "--sequence_parallel_size", "4",
                     "--offload_activations", "true", "--plan_tokens_per_sample", "1048576"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"  {'estimated peak':<46}{'66.99 GiB':>11}" in out  # 009's 262,144 tokens per GPU + 10 GiB all-to-all
    # each GPU offloads its 262,144 tokens: 36 inputs of 262,144 x 2,560 x 2 = 1.25 GiB, in 2 GiB pinned blocks
    assert ("  samples of 1,048,576 tokens: 36 layer inputs of 1.25 GiB, each rounded up to a cached block of "
            "2.00 GiB") in out
    assert any(line.startswith("  pinned per process 72.00 GiB") for line in out)


def test_one_step_takes_as_long_with_each_sample_over_four_gpus_as_with_one_sample_per_gpu(capsys):
    """32 samples per step either way, each sample's FLOPs shared by the GPUs that hold it: 8 samples per GPU side
    by side, or 32 quarter samples one after another."""
    def step_line(*flags: str) -> str:
        cli.main(["--config", CONFIG_010, *flags])
        return next(line for line in capsys.readouterr().out.splitlines() if "one optimizer step" in line)

    # one 200,000-token sample: 5.16e16 FLOPs at 346.15e12 FLOP/s = 149.1 s; a quarter of it x 32 = 1,193 s
    assert step_line() == "    one sample 37 s on 4 GPUs; one optimizer step 19.9 min; one epoch 10.4 h"
    alone = step_line("--sequence_parallel_size", "1", "--gradient_accumulation_steps", "8")
    assert alone == "    one sample 2.5 min; one optimizer step 19.9 min; one epoch 10.4 h"


@pytest.mark.parametrize("flags, message", [
    (["--plan_gpus", "6"], "error: setting 'sequence_parallel_size' = 4: the launch has 6 processes (NUM_PROCESSES x "
                           "NUM_MACHINES), not a multiple of 4; launch a multiple of 4 processes, or set "
                           "sequence_parallel_size to a divisor of 6."),
    (["--sequence_parallel_size", "3", "--plan_gpus", "3"],
     "error: setting 'sequence_parallel_size' = 3: Qwen/Qwen3-4B-Instruct-2507 has 32 attention heads and 8 KV heads; "
     "each of the 3 GPUs of a sample attends with heads / 3 of them, so both must divide by it (or 3 by the KV "
     "heads, which are then replicated): use one of [2, 4, 8, 16, 32]."),
])
def test_the_plan_refuses_sequence_parallelism_its_gpus_or_heads_cannot_run(capsys, flags, message):
    assert cli.main(["--config", CONFIG_010, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


PLAN_009_SCHEDULE = [  # the hand computation of test_planner_schedule.test_009_schedule_for_1000_records
    "Schedule on 4 GPU(s):",
    "  train: data/legal_summaries/train.jsonl is absent: records from plan_train_records, tokens per sample from "
    "plan_tokens_per_sample",
    "    1,000 records: 1,000 kept, 0 dropped, 0 truncated for length; planned at 200,000 tokens per sample",
    "  validation: data/legal_summaries/validation.jsonl is absent: records from plan_validation_records / "
    "max_eval_samples, tokens per sample from plan_tokens_per_sample",
    "    64 samples per evaluation; planned at 200,000 tokens per sample",
    "  1 sample(s) x 8 gradient accumulation x 4 GPU(s) = 32 samples per optimizer step",
    "  250 micro-batches per GPU and epoch -> 32 optimizer steps per epoch; 64 steps in all (2 epochs)",
    # 33,030,144 adapter weights x (2 adapter + 2 DeepSpeed model states + 12 fp32 master and Adam) = 528,482,304
    # bytes = 0.49 GiB; 10 of them 4.92 GiB
    "  checkpoints (save_steps 0.1 -> every 7 steps): 10, at steps 7, 14, 21, 28, 35, 42, 49, 56, 63, 64 (end); "
    "about 0.49 GiB each, 4.92 GiB in all",
    "  evaluations (eval_steps 0.1 -> every 7 steps): 10, at steps 7, 14, 21, 28, 35, 42, 49, 56, 63, 64 (end)",
]


def test_009_plan_for_1000_records_of_200k_tokens(capsys):
    assert cli.main(["--config", CONFIG_009]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("Schedule on 4 GPU(s):")
    assert out[start:start + len(PLAN_009_SCHEDULE)] == PLAN_009_SCHEDULE
    # one sample: 2 N T + ... with tiled_mlp (test_planner_schedule): 52.7e15 FLOPs at 0.35 x 989e12 = 152.2 s,
    # + offload copies 2 x 36 x 200,000 x 2,560 x 2 bytes / 25e9 B/s = 2.9 s: 155.2 s = 2.6 min; a step of 8 per GPU:
    # 1,241 s = 20.7 min; 250 per GPU and epoch: 38,790 s = 10.8 h; 500 in all: 21.5 h; each evaluation 10.2 min
    # (test_eval_seconds_spread_over_the_gpus), 10 of them: 102 min; 77,581 + 6,131 = 83,712 s = 23.3 h
    time = out[start + len(PLAN_009_SCHEDULE):start + len(PLAN_009_SCHEDULE) + 6]
    assert time[0] == ("  time (estimate) at MFU 0.35 of 989 TFLOP/s per GPU (assumed, not measured: FlashAttention-2 "
                       "reaches about 35% of an H100's bf16 peak (FlashAttention-3 paper); docs/benchmarks.md has no "
                       "GPU measurement yet):")
    assert time[2:] == ["    one sample 2.6 min (offload copies 3 s); one optimizer step 20.7 min; one epoch 10.8 h",
                        "    training 21.5 h + 10 evaluation(s) of 10.2 min = 23.2 h in all",
                        "    first checkpoint at step 7, after 2.6 h",
                        "Evaluation plan per GPU (eval_checkpoint.py / eval_all_checkpoints.sh): the longest prompt "
                        "262,144 tokens (max_seq_length: no length cache) + max_new_tokens 512, "
                        "generation_batch_size 1"]
    # 7 steps x 20.7 min + one evaluation of 10.2 min = 155 min: later than 2 h, so the plan says so
    assert ("  - the first checkpoint comes at step 7, after 2.6 h (estimated): a crash before it loses all of that; "
            "lower save_steps") in out


@pytest.mark.parametrize("flags, env, expected", [
    ([], {}, "on 4 GPU(s) (plan_gpus, the GPUs the experiment is sized for)"),
    (["--num_gpus", "8"], {"NUM_PROCESSES": "2"}, "on 8 GPU(s) (--num_gpus)"),
    ([], {"NUM_PROCESSES": "4", "NUM_MACHINES": "2"}, "on 8 GPU(s) (NUM_PROCESSES x NUM_MACHINES = 4 x 2)"),
    (["--plan_gpus", "0"], {}, "on 1 GPU(s) (no launch size and no plan_gpus: 1)"),
])
def test_the_gpu_count_of_the_plan(capsys, monkeypatch, flags, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["--config", CONFIG_009, *flags]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"Run plan for experiments/009_text_summary/config.yaml: Qwen/Qwen3-4B-Instruct-2507 {expected}"


def test_a_cpu_plan_is_not_applicable(capsys):
    assert cli.main(["--config", CONFIG_009, "--device", "cpu", "--tiled_mlp", "false"]) == 0
    assert ("  verdict: CPU run, no GPU memory limit: the plan is not applicable (it does not block)."
            in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("flag, value, meant", [("--lora_drop", "0.1", "--lora_dropout"),
                                                ("--tiled_mpl", "true", "--tiled_mlp")])
def test_a_shortened_or_misspelled_flag_is_refused_as_training_refuses_it(capsys, flag, value, meant):
    expected = f"error: command line: unknown setting '{flag}'. Did you mean '{meant}'?\n"
    # training (000's config: its bf16-free settings parse on this machine) refuses it with this line and exit 2
    with pytest.raises(SystemExit) as training_exit:
        train_main(["--config", str(EXP_000 / "config.yaml"), flag, value])
    assert training_exit.value.code == 2
    assert capsys.readouterr().err == expected
    assert cli.main(["--config", CONFIG_009, flag, value]) == exit_status.BAD_INPUT == 2
    captured = capsys.readouterr()
    assert captured.err == expected and captured.out == ""


@pytest.mark.parametrize("flags, message", [
    (["--offload_activations", "true", "--activation_checkpointing", "false"],
     "error: setting 'offload_activations' = True: it offloads the inputs kept by activation checkpointing; set "
     "activation_checkpointing: true too.\n"),
    (["--model_name_or_path", "nobody/not-a-model"],
     "error: setting 'model_name_or_path' = 'nobody/not-a-model': no config.json there, none in the local hub cache, "
     "and no model_architecture.json for it next to the config; download the model, or add model_architecture.json "
     "(its config.json values + \"model_name_or_path\") to the experiment.\n"),
])
def test_a_bad_setting_exits_2_with_one_line(capsys, flags, message):
    assert cli.main(["--config", CONFIG_009, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


def test_a_value_outside_a_settings_choices_exits_2_as_in_training(capsys):
    assert cli.main(["--config", CONFIG_009, "--device", "gpu"]) == 2  # one line, as training refuses any bad value
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()  # choices quoted or not, by Python version
    assert line.startswith("error: command line: argument --device: invalid choice: 'gpu' (choose from ")
    assert line.endswith("); see --help for every setting.") and "cuda" in line and "cpu" in line


def test_help_of_python_m_longctx_planner_lists_its_options_and_trainings_settings():
    result = subprocess.run([sys.executable, "-m", "longctx.planner", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python -m longctx.planner --config experiments/009_text_summary/config.yaml" in result.stdout
    assert ("Exit status: 0 fits (or not applicable: CPU), 3 does not fit (GPU or host memory), 2 bad configuration."
            in result.stdout)
    for flag in ("--gpu_memory_gib", "--num_gpus", "--device", "--label_tokens", "--experiment_dir",  # the planner's
                 "--host_memory_gib", "--processes_per_machine",
                 "--plan_gpus", "--plan_train_records", "--plan_tokens_per_sample", "--plan_mfu",  # PlanArguments
                 "--tiled_mlp", "--lora_dropout", "--max_seq_length", "--learning_rate", "--bf16", "--config"):
        assert f"\n  {flag} " in result.stdout, flag


# --- the launcher -------------------------------------------------------------------------------------------------


def fake_gpu_path(tmp_path, memory_mib: int = 81559) -> str:
    """A stand-in nvidia-smi reporting one GPU of this size, so that the launcher plans (and checks) for a GPU: this
    machine has no GPU and its nvidia-smi cannot run, and the launcher's GPU branch reads only these two queries."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncase \"$*\" in *memory.total*) echo {memory_mib};; *index*) echo 0;; esac\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


# 009's data files are not on this machine; a launch (not PLAN=1) checks them, so it reads the tiny corpus
TINY_DATA = ("--train_file", ".cache/tiny_smoke/data/train.jsonl", "--validation_file",
             ".cache/tiny_smoke/data/validation.jsonl",
             # the real Qwen3-4B config.json and tokenizer (no weights): what the preflight reads on the GPU machine
             "--model_name_or_path", "tests/fixtures/qwen3-4b-instruct-2507")


def launch_009(tmp_path, *flags, **env):
    return subprocess.run(["bash", str(EXP_009 / "launch_train.sh"), *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180, env=subprocess_env(OUTPUT_DIR=str(tmp_path / "run"), **env))


@pytest.mark.e2e
def test_the_launcher_prints_the_same_plan_as_the_command_line_on_a_laptop(tmp_path):
    """009 on this GPU-less machine: the launcher's PLAN=1 and `python -m longctx.planner` with the same settings
    (the launcher passes OUTPUT_DIR as --output_dir) print the same text, planned for 009's 4 GPUs."""
    launched = launch_009(tmp_path, "--learning_rate", "5e-5", PLAN="1")
    assert launched.returncode == 0, launched.stderr[-2000:]
    direct = subprocess.run([sys.executable, "-m", "longctx.planner", "--config", "experiments/009_text_summary/"
                             "config.yaml", "--output_dir", str(tmp_path / "run"), "--learning_rate", "5e-5"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert direct.returncode == 0, direct.stderr[-2000:]
    assert launched.stdout == direct.stdout
    lines = launched.stdout.splitlines()
    assert ("Run plan for experiments/009_text_summary/config.yaml: Qwen/Qwen3-4B-Instruct-2507 on 4 GPU(s) "
            "(plan_gpus, the GPUs the experiment is sized for)") in lines
    assert "  verdict: fits in 80 GiB (71%, 23.51 GiB to spare)." in lines
    assert "accelerate launch" not in launched.stdout


@pytest.mark.e2e
def test_the_launcher_plans_011s_sequence_parallel_run_on_a_laptop(tmp_path):
    """011 splits each sample over 8 GPUs under DeepSpeed, which a GPU-less launcher leaves off: its PLAN=1 still
    plans the cluster run (DeepSpeed's config from the experiment), its in-training evaluation included."""
    launched = subprocess.run(["bash", str(REPO_ROOT / "experiments" / "011_million_tokens" / "launch_train.sh")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                              env=subprocess_env(OUTPUT_DIR=str(tmp_path / "run"), PLAN="1"))
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "  verdict: fits in 80 GiB (76%, 19.29 GiB to spare)." in launched.stdout.splitlines()
    assert ("In-training evaluation per GPU (the eval loss every eval_steps): 1 x 1,048,576 tokens, the longest "
            "validation sample (max_seq_length: no length cache), whole on each GPU (sequence parallelism is off in "
            "evaluation: training splits each sample over 8)") in launched.stdout.splitlines()


@pytest.mark.e2e
def test_launcher_plan_1_prints_a_plan_that_does_not_fit_and_refuses_a_bad_flag(tmp_path):
    result = launch_009(tmp_path, "--tiled_mlp", "false", "--offload_activations", "false", PLAN="1")
    assert result.returncode == 0 and "DOES NOT FIT" in result.stdout  # PLAN=1 prints; it does not judge
    result = launch_009(tmp_path, "--lora_drop", "0.1", PLAN="1")  # checking 009's settings on a laptop
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: command line: unknown setting '--lora_drop'. Did you mean '--lora_dropout'?"]


@pytest.mark.e2e
def test_launcher_stops_with_3_when_the_plan_does_not_fit_unless_overridden(tmp_path, tiny_dir):
    path = fake_gpu_path(tmp_path)  # 81,559 MiB / 1,024 = 79.6 GiB
    no_switches = (*TINY_DATA, "--tiled_mlp", "false", "--offload_activations", "false")
    stopped = launch_009(tmp_path, *no_switches, DRY_RUN="1", PATH=path)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "verdict: DOES NOT FIT in 79.6 GiB" in stopped.stdout
    assert "PLAN_OVERRIDE=1" in stopped.stderr and "+ accelerate launch" not in stopped.stdout
    overridden = launch_009(tmp_path, *no_switches, DRY_RUN="1", PLAN_OVERRIDE="1", PATH=path)
    assert overridden.returncode == 0, overridden.stderr[-2000:]
    assert "+ accelerate launch" in overridden.stdout and "--tiled_mlp false" in overridden.stdout
    # the GPU count is the launch's now (1 GPU found): 131,072 tokens with tiled_mlp and the inputs on the GPU fit
    fits = launch_009(tmp_path, *TINY_DATA, "--offload_activations", "false", "--max_seq_length", "131072",
                      DRY_RUN="1", PATH=path)
    assert fits.returncode == 0, fits.stdout[-3000:] + fits.stderr[-2000:]
    assert "fits in 79.6 GiB" in fits.stdout and "+ accelerate launch" in fits.stdout
    assert "on 1 GPU(s) (--num_gpus)" in fits.stdout



def test_the_in_training_evaluation_of_011_has_its_own_line_and_verdict(capsys):
    """011 trains each 1,048,576-token sample split over 8 GPUs, but evaluation runs whole samples on each GPU.
    Its forward working set by hand (Qwen3-4B: hidden 2,560, 32 x 128 query and 8 x 128 KV widths, bf16):
    residual 2 x 2,560 x 2 = 10,240 bytes per token; attention (2 x 4,096 + 2 x 1,024) x 2 + (4,096 + 1,024) x 4
    = 40,960; tiled MLP: one 8,192-token tile, smaller; 1,048,576 x (10,240 + 40,960) = 50 x 2^30 = 50.00 GiB."""
    assert cli.main(["--config", CONFIG_011]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("In-training evaluation per GPU (the eval loss every eval_steps): 1 x 1,048,576 tokens, the "
                         "longest validation sample (max_seq_length: no length cache), whole on each GPU (sequence "
                         "parallelism is off in evaluation: training splits each sample over 8)")
    assert lines[header + 5].startswith(f"    {'forward working set':<26}{'50.00 GiB':>11}   one layer at a time: "
                                        f"1,048,576 tokens x 10,240 bytes residual + its larger part (attention")
    assert lines[header + 6].startswith(f"    {'estimated peak':<26}") and ": fits in 80 GiB" in lines[header + 6]


def test_an_in_training_evaluation_that_does_not_fit_stops_the_plan_with_its_fixes(capsys):
    """The training step of 011 is 60.71 GiB (its plan), its evaluation's peak by hand: weights 4.02 B x 2 bytes =
    7.49 GiB + LoRA + optimizer 0.12 GiB (the step's) + framework 1 + 0.5 (NCCL) + 0.75 (ZeRO buckets) + 5% of
    50 = 4.75 GiB + the forward working set 50.00 GiB (the test above; larger than the logits' 0.72 GiB) = 62.36
    GiB. On a 61 GiB GPU the step fits and the evaluation does not (1.36 GiB over), and the plan says so (exit 3)."""
    code = cli.main(["--config", CONFIG_011, "--gpu_memory_gib", "61"])
    lines = capsys.readouterr().out.splitlines()
    assert code == exit_status.DOES_NOT_FIT
    assert any(line.startswith("  verdict: fits in 61 GiB") for line in lines)  # the training step
    (verdict,) = [line for line in lines if line.startswith(f"    {'estimated peak':<26}")]
    assert verdict.endswith(": DOES NOT FIT in 61 GiB (over by 1.36 GiB): validation samples shorter than "
                            "1,048,576 tokens (a validation_file of shorter documents); or eval_strategy no (then "
                            "score the checkpoints afterwards: eval_all_checkpoints.sh)"), verdict


def test_the_in_training_evaluation_of_010_peaks_in_its_untiled_mlp(capsys):
    """010: 262,144 tokens, tiled_mlp off, adapters in bf16 under ZeRO. MLP by hand (intermediate 9,728): act +
    up_proj's output 2 x 9,728 x 2 + LoRA update 9,728 x 2 + their sum 9,728 x 2 = 77,824 bytes per token, over the
    attention's 40,960; + residual 10,240 = 88,064 x 262,144 tokens = 21.50 GiB."""
    assert cli.main(["--config", CONFIG_010]) == 0
    out = capsys.readouterr().out
    assert (f"    {'forward working set':<26}{'21.50 GiB':>11}   one layer at a time: 262,144 tokens x 10,240 bytes "
            f"residual + its larger part (MLP: act, up_proj, its LoRA update and their sum)  <- peak") in out
