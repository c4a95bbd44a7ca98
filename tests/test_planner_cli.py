"""python -m longctx.planner and the launcher's PLAN knob: 009's config parsed as training parses it (the same
refusals of a shortened or misspelled flag, training-only flags accepted, bf16 accepted on this GPU-less machine),
the printed figures against the hand computations of tests/test_planner_estimate.py, exit statuses 0 / 2 / 3."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env
from longctx.planner import cli
from longctx.train import parse_and_validate

EXP_000 = REPO_ROOT / "experiments" / "000_tiny_smoke"
EXP_009 = REPO_ROOT / "experiments" / "009_text_summary"
CONFIG_009 = str(EXP_009 / "config.yaml")


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    """The world size comes from --num_gpus or the DeepSpeed config here, not from a caller's launcher variables."""
    for name in ("NUM_PROCESSES", "NUM_MACHINES", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)


def test_009_configured_plan_fits_with_the_hand_computed_figures(capsys):
    assert cli.main(["--config", CONFIG_009]) == 0  # bf16: true is accepted although this machine has no GPU
    out = capsys.readouterr().out
    # the peak computed by hand in test_planner_estimate.py: 60,659,165,798.4 bytes = 56.49 GiB, of 80 GiB 70.6%,
    # 80 - 56.49 = 23.51 GiB to spare; ZeRO-2 over 4 GPUs (009's DeepSpeed config, 4 when no launcher says)
    assert f"  {'estimated peak':<46}{'56.49 GiB':>11}" in out.splitlines()
    assert "  verdict: fits in 80 GiB (71%, 23.51 GiB to spare)." in out.splitlines()
    assert "DeepSpeed ZeRO-2 over 4 GPU(s)" in out
    # 36 layer inputs, each in a 2 GiB pinned block: 72 GiB per process, 4 processes on one machine 288 GiB
    assert ("  host memory for offloaded activations: 72.00 GiB pinned per GPU process (x the GPUs of one machine: "
            "288.00 GiB if all 4 share one)") in out.splitlines()
    for part in ("weights", "LoRA + optimizer", "framework", "checkpointed layer inputs", "logits at label positions",
                 "one layer's recompute (MLP backward)", "one layer's recompute (attention backward)"):
        assert f"    {part:<44}" in out
    assert "architecture: " + str(EXP_009 / "model_architecture.json") in out


def test_009_without_the_switches_does_not_fit_and_names_the_fix(capsys):
    code = cli.main(["--config", CONFIG_009, "--tiled_mlp", "false", "--offload_activations", "false",
                     "--learning_rate", "5e-5"])  # a training-only flag: parsed by TrainingArguments, accepted
    out = capsys.readouterr().out
    assert code == cli.EXIT_DOES_NOT_FIT == 3
    # by hand (test_without_either_switch_...): 130,163,396,812.8 bytes = 121.22 GiB, 41.22 GiB over 80
    assert "  verdict: DOES NOT FIT in 80 GiB (over by 41.22 GiB)." in out.splitlines()
    # both switches give 009's configured peak, 56.49 GiB; 164,864 tokens is the hand-computed longest fitting length
    assert "    --tiled_mlp true --offload_activations true  -> 56.49 GiB" in out.splitlines()
    assert "    --max_seq_length 164864  (with the current switches)" in out.splitlines()


def test_a_cpu_plan_is_not_applicable(capsys):
    assert cli.main(["--config", CONFIG_009, "--device", "cpu", "--tiled_mlp", "false"]) == 0
    assert ("  verdict: CPU run, no GPU memory limit: the plan is not applicable (it does not block)."
            in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("flag, value, meant", [("--lora_drop", "0.1", "--lora_dropout"),
                                                ("--tiled_mpl", "true", "--tiled_mlp")])
def test_a_shortened_or_misspelled_flag_is_refused_as_training_refuses_it(capsys, flag, value, meant):
    expected = f"error: command line: unknown argument(s) ['{flag}', '{value}']. Did you mean '{meant}'?\n"
    # training (000's config: its bf16-free settings parse on this machine) refuses it with this line and exit 2
    with pytest.raises(SystemExit) as training_exit:
        parse_and_validate(["--config", str(EXP_000 / "config.yaml"), flag, value])
    assert training_exit.value.code == 2
    assert capsys.readouterr().err == expected
    assert cli.main(["--config", CONFIG_009, flag, value]) == cli.EXIT_BAD_CONFIG == 2
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
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal, as for every Literal setting
        cli.main(["--config", CONFIG_009, "--device", "gpu"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # after argparse's usage; choices quoted or not by version
    assert "error: argument --device: invalid choice: 'gpu' (choose from " in last_line
    assert "cuda" in last_line and "cpu" in last_line


def test_help_of_python_m_longctx_planner_lists_its_options_and_trainings_settings():
    result = subprocess.run([sys.executable, "-m", "longctx.planner", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "python -m longctx.planner --config experiments/009_text_summary/config.yaml" in result.stdout
    assert "Exit status: 0 fits (or not applicable: CPU), 3 does not fit, 2 bad configuration." in result.stdout
    for flag in ("--gpu_memory_gib", "--num_gpus", "--device", "--label_tokens", "--experiment_dir",  # the planner's
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


def launch_009(tmp_path, *flags, **env):
    return subprocess.run(["bash", str(EXP_009 / "launch_train.sh"), *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180, env=subprocess_env(OUTPUT_DIR=str(tmp_path / "run"), **env))


def test_launcher_plan_1_prints_the_plan_and_exits_0_without_a_gpu(tmp_path):
    result = launch_009(tmp_path, PLAN="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "estimated peak" in result.stdout and "verdict: fits in 80 GiB" in result.stdout
    assert "accelerate launch" not in result.stdout
    result = launch_009(tmp_path, "--tiled_mlp", "false", "--offload_activations", "false", PLAN="1")
    assert result.returncode == 0 and "DOES NOT FIT" in result.stdout  # PLAN=1 prints; it does not judge
    result = launch_009(tmp_path, "--lora_drop", "0.1", PLAN="1")  # checking 009's settings on a laptop
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: command line: unknown argument(s) ['--lora_drop', '0.1']. Did you mean '--lora_dropout'?"]


def test_launcher_stops_with_3_when_the_plan_does_not_fit_unless_overridden(tmp_path):
    path = fake_gpu_path(tmp_path)  # 81,559 MiB / 1,024 = 79.6 GiB
    no_switches = ("--tiled_mlp", "false", "--offload_activations", "false")
    stopped = launch_009(tmp_path, *no_switches, DRY_RUN="1", PATH=path)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "fits in" not in stopped.stdout and "DOES NOT FIT in 79.6 GiB" in stopped.stdout
    assert "PLAN_OVERRIDE=1" in stopped.stderr and "+ accelerate launch" not in stopped.stdout
    overridden = launch_009(tmp_path, *no_switches, DRY_RUN="1", PLAN_OVERRIDE="1", PATH=path)
    assert overridden.returncode == 0, overridden.stderr[-2000:]
    assert "+ accelerate launch" in overridden.stdout and "--tiled_mlp false" in overridden.stdout
    fits = launch_009(tmp_path, DRY_RUN="1", PATH=path)
    assert fits.returncode == 0 and "fits in 79.6 GiB" in fits.stdout and "+ accelerate launch" in fits.stdout
