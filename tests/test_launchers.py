"""The bash launchers: syntax, environment knobs in the echoed command (DRY_RUN=1), GPU / launcher checks, secrets
never printed, and the executed command equal to the echoed one (with stand-ins for accelerate / deepspeed)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env

EXP_000 = REPO_ROOT / "experiments" / "000_tiny_smoke"
EXP_009 = REPO_ROOT / "experiments" / "009_text_summary"
TRAIN_000 = EXP_000 / "launch_train.sh"
TRAIN_009 = EXP_009 / "launch_train.sh"
SHELL_SCRIPTS = sorted([*REPO_ROOT.glob("experiments/*/*.sh"), *REPO_ROOT.glob("scripts/*.sh")])
# knobs the caller's environment might carry; each test sets the ones it means
KNOBS = ("CONFIG", "OUTPUT_DIR", "NUM_PROCESSES", "NUM_MACHINES", "MACHINE_RANK", "MASTER_ADDR", "MASTER_PORT",
         "LAUNCHER", "USE_DEEPSPEED", "DS_CONFIG", "REQUIRE_GPU", "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR",
         "WANDB_API_KEY", "OMP_NUM_THREADS", "RESUME", "OVERWRITE", "DRY_RUN", "CUDA_VISIBLE_DEVICES", "PYTHON",
         "HF_TOKEN")


@pytest.fixture()
def fake_bin(tmp_path) -> Path:
    """PATH entries standing in for the machine: nvidia-smi reporting GPUS (none by default), and accelerate /
    deepspeed that record their arguments in CALLS_FILE and exit with FAKE_STATUS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\n[ -n "$FAKE_GPUS" ] || exit 1\n'
                                        'i=0; while [ "$i" -lt "$FAKE_GPUS" ]; do echo "$i"; i=$((i+1)); done\n')
    for name in ("accelerate", "deepspeed"):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name}" "$@" > "$CALLS_FILE"\n'
                                    'echo "OMP=${OMP_NUM_THREADS:-unset} WANDB_MODE=$WANDB_MODE" >> "$CALLS_FILE"\n'
                                    'exit "${FAKE_STATUS:-0}"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


@pytest.fixture()
def launch(fake_bin, tmp_path):
    def run(script: Path, *args: str, gpus: int = 0, dry_run: bool = True, **env_vars: str):
        env = subprocess_env()
        for knob in KNOBS:
            env.pop(knob, None)
        env.update(PATH=f"{fake_bin}:{env['PATH']}", HOME=str(tmp_path / "home"), CALLS_FILE=str(tmp_path / "calls"),
                   DRY_RUN="1" if dry_run else "0")
        env.setdefault("OUTPUT_DIR", str(tmp_path / "run"))
        if gpus:
            env["FAKE_GPUS"] = str(gpus)
        env.update(env_vars)
        return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
    return run


def echoed(result) -> list[str]:
    """The command the launcher printed ('+ cmd args...'), split into words."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, result.stdout + result.stderr
    return shlex.split(lines[0][2:])


def value_after(words: list[str], flag: str) -> str:
    assert flag in words, (flag, words)
    return words[words.index(flag) + 1]


def status_line(result) -> str:
    (line,) = [line for line in result.stdout.splitlines() if "W&B mode:" in line]
    return line


# --- syntax -------------------------------------------------------------------------------------------------------


def test_there_are_launchers_to_check():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in SHELL_SCRIPTS}
    assert {"scripts/launch_train.sh", "scripts/eval_all_checkpoints.sh", "experiments/000_tiny_smoke/launch_train.sh",
            "experiments/009_text_summary/launch_train.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- training launcher: knobs in the echoed command -----------------------------------------------------------------


def test_dry_run_prints_and_runs_nothing(launch, tmp_path):
    result = launch(TRAIN_009, REQUIRE_GPU="0")
    assert result.returncode == 0, result.stderr
    words = echoed(result)
    assert words[:2] == ["accelerate", "launch"]
    assert str(EXP_009 / "train_cluster.py") in words
    assert not (tmp_path / "calls").exists()  # neither accelerate nor deepspeed was started


def test_output_dir_and_config_overrides(launch, tmp_path):
    config = tmp_path / "my_config.yaml"
    config.write_text("lora_r: 8\n")
    out = tmp_path / "elsewhere" / "run1"
    words = echoed(launch(TRAIN_009, REQUIRE_GPU="0", OUTPUT_DIR=str(out), CONFIG=str(config)))
    assert value_after(words, "--output_dir") == str(out)
    assert value_after(words, "--config") == str(config)


def test_defaults_single_cpu_process(launch):
    result = launch(TRAIN_009, REQUIRE_GPU="0")
    words = echoed(result)
    assert value_after(words, "--num_processes") == "1"
    assert "--cpu" in words
    assert "--use_deepspeed" not in words and "--deepspeed" not in words
    assert value_after(words, "--config") == str(EXP_009 / "config.yaml")
    assert value_after(words, "--main_process_port") == "29500"
    assert "OMP_NUM_THREADS=unset" in status_line(result)


def test_two_processes_on_cpu_use_deepspeed_and_one_thread_each(launch):
    result = launch(TRAIN_009, REQUIRE_GPU="0", NUM_PROCESSES="2")
    words = echoed(result)
    ds_config = str(EXP_009 / "ds_config_zero2.json")
    assert value_after(words, "--num_processes") == "2"
    assert "--use_deepspeed" in words
    assert value_after(words, "--deepspeed_config_file") == ds_config
    assert value_after(words, "--deepspeed") == ds_config
    assert "--cpu" not in words
    assert "OMP_NUM_THREADS=1" in status_line(result)


def test_explicit_omp_num_threads_is_kept(launch):
    result = launch(TRAIN_009, REQUIRE_GPU="0", NUM_PROCESSES="2", OMP_NUM_THREADS="3")
    assert "OMP_NUM_THREADS=3" in status_line(result)


def test_four_gpus_default_to_four_processes_under_zero2(launch):
    words = echoed(launch(TRAIN_009, gpus=4))
    assert value_after(words, "--num_processes") == "4"
    assert "--use_deepspeed" in words and "--cpu" not in words
    assert value_after(words, "--deepspeed") == str(EXP_009 / "ds_config_zero2.json")


def test_cuda_visible_devices_sets_the_process_count(launch):
    words = echoed(launch(TRAIN_009, gpus=4, CUDA_VISIBLE_DEVICES="0,2"))
    assert value_after(words, "--num_processes") == "2"


def test_deepspeed_launcher(launch):
    words = echoed(launch(TRAIN_009, REQUIRE_GPU="0", LAUNCHER="deepspeed", NUM_PROCESSES="2", MASTER_PORT="29611"))
    assert words[0] == "deepspeed"
    assert "accelerate" not in words
    assert value_after(words, "--num_gpus") == "2"
    assert value_after(words, "--master_port") == "29611"
    assert value_after(words, "--deepspeed") == str(EXP_009 / "ds_config_zero2.json")


def test_master_port_and_address(launch):
    words = echoed(launch(TRAIN_009, REQUIRE_GPU="0", MASTER_PORT="29777", MASTER_ADDR="10.0.0.7"))
    assert value_after(words, "--main_process_port") == "29777"
    assert value_after(words, "--main_process_ip") == "10.0.0.7"


def test_extra_flags_are_forwarded_last(launch):
    words = echoed(launch(TRAIN_009, "--learning_rate", "5e-5", "--max_steps", "3", REQUIRE_GPU="0",
                          NUM_PROCESSES="2"))
    assert words[-4:] == ["--learning_rate", "5e-5", "--max_steps", "3"]
    assert words.index("--deepspeed") < words.index("--learning_rate")
    assert words.index(str(EXP_009 / "train_cluster.py")) < words.index("--config")


def test_wandb_offline_without_credentials(launch):
    assert "W&B mode: offline" in status_line(launch(TRAIN_009, REQUIRE_GPU="0"))


def test_wandb_online_with_key_and_secrets_never_printed(launch):
    secrets = {"WANDB_API_KEY": "sk-test-SECRET123", "HF_TOKEN": "hf_SECRET456"}
    for dry_run in (True, False):
        result = launch(TRAIN_009, REQUIRE_GPU="0", NUM_PROCESSES="2", dry_run=dry_run, **secrets)
        assert result.returncode == 0, result.stderr
        assert "W&B mode: online" in status_line(result)
        for value in secrets.values():
            assert value not in result.stdout and value not in result.stderr
            assert "SECRET" not in result.stdout + result.stderr


def test_009_without_gpus_refuses_and_points_to_000(launch, tmp_path):
    result = launch(TRAIN_009)
    assert result.returncode == 1
    assert "experiments/000_tiny_smoke" in result.stderr
    assert not (tmp_path / "calls").exists()


def test_invalid_launcher_exits_2(launch):
    result = launch(TRAIN_009, REQUIRE_GPU="0", LAUNCHER="torchrun")
    assert result.returncode == 2
    assert "LAUNCHER=torchrun" in result.stderr


def test_000_launcher_builds_assets_then_launches(launch, tiny_dir):
    result = launch(TRAIN_000)  # tiny_dir exists, so the asset build is a no-op
    assert result.returncode == 0, result.stderr
    assert "tiny assets ready" in result.stdout
    words = echoed(result)
    assert value_after(words, "--config") == str(EXP_000 / "config.yaml")
    assert str(EXP_000 / "train_cluster.py") in words


def test_executed_command_equals_echoed_one_and_status_propagates(launch, tmp_path):
    result = launch(TRAIN_009, "--max_steps", "3", REQUIRE_GPU="0", NUM_PROCESSES="2", dry_run=False, FAKE_STATUS="3")
    assert result.returncode == 3
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[:-1] == echoed(result)
    assert calls[-1] == "OMP=1 WANDB_MODE=offline"  # what the training processes see


def test_executed_deepspeed_command_equals_echoed_one(launch, tmp_path):
    result = launch(TRAIN_009, REQUIRE_GPU="0", LAUNCHER="deepspeed", NUM_PROCESSES="2", dry_run=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls").read_text().splitlines()[:-1] == echoed(result)


# --- evaluation launcher -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", [EXP_000, EXP_009], ids=lambda p: p.name)
def test_eval_launcher_dry_run(launch, tmp_path, experiment):
    out = tmp_path / "some_run"
    result = launch(experiment / "eval_all_checkpoints.sh", "--max_new_tokens", "16", OUTPUT_DIR=str(out))
    assert result.returncode == 0, result.stderr
    words = echoed(result)
    assert words[1] == str(experiment / "eval_checkpoint.py")
    assert value_after(words, "--run_dir") == str(out)
    assert "--all_checkpoints" in words
    assert value_after(words, "--config") == str(experiment / "config.yaml")  # no run_config.yaml in the run yet
    assert words[-2:] == ["--max_new_tokens", "16"]


def test_eval_launcher_uses_the_runs_own_config(launch, tmp_path):
    out = tmp_path / "trained_run"
    out.mkdir()
    (out / "run_config.yaml").write_text("lora_r: 8\n")
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", OUTPUT_DIR=str(out)))
    assert value_after(words, "--config") == str(out / "run_config.yaml")
    explicit = tmp_path / "explicit.yaml"
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", OUTPUT_DIR=str(out), CONFIG=str(explicit)))
    assert value_after(words, "--config") == str(explicit)


def test_eval_launcher_several_processes(launch, tmp_path):
    out = tmp_path / "some_run"
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", OUTPUT_DIR=str(out), NUM_PROCESSES="2"))
    assert words[:2] == ["accelerate", "launch"]
    assert value_after(words, "--num_processes") == "2"
    assert value_after(words, "--run_dir") == str(out) and "--all_checkpoints" in words
