"""The bash launchers: syntax, --help, knobs and their checks (one line, exit 2), the echoed command (DRY_RUN=1),
secrets never printed, and, through the real accelerate and DeepSpeed launchers, what each launched rank actually
sees (CUDA_VISIBLE_DEVICES, ranks, world size) and the status and reason a failing rank hands back.

Stand-ins: nvidia-smi only (a real one cannot run on a machine without GPUs); it reports FAKE_GPUS GPUs so that the
launcher's GPU paths can be checked with DRY_RUN=1. Everything that runs goes through the real accelerate and
DeepSpeed; DeepSpeed's runner counts the devices of its CPU accelerator from LOCAL_SIZE, which stands in for the GPU
count where it must (the ids in CUDA_VISIBLE_DEVICES are checked against it).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from support.env import subprocess_env
from support.launching import experiment_with
from support.paths import EXP_000, EXP_009, EXPERIMENTS_DIR, REPO_ROOT, TRAIN_000, TRAIN_009

LAUNCHER = REPO_ROOT / "scripts" / "launch_train.sh"
SHELL_SCRIPTS = sorted([*EXPERIMENTS_DIR.glob("*/*.sh"), *REPO_ROOT.glob("scripts/*.sh")])
# knobs the caller's environment might carry; each test sets the ones it means
KNOBS = ("CONFIG", "OUTPUT_DIR", "NUM_PROCESSES", "NUM_MACHINES", "MACHINE_RANK", "MASTER_ADDR", "MASTER_PORT",
         "LAUNCHER", "USE_DEEPSPEED", "DS_CONFIG", "REQUIRE_GPU", "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR",
         "WANDB_API_KEY", "OMP_NUM_THREADS", "RESUME", "OVERWRITE", "DRY_RUN", "CUDA_VISIBLE_DEVICES", "PYTHON",
         "HF_TOKEN", "PLAN", "PLAN_OVERRIDE", "PREEMPT_GRACE_SECONDS")
# Each rank of a probe experiment records what it sees, and exits before training.
PROBE = """
import json, os, sys
from pathlib import Path

Path(os.environ["PROBE_DIR"], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(
    {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}))
sys.exit(0)
"""


@pytest.fixture()
def fake_bin(tmp_path) -> Path:
    """nvidia-smi reporting FAKE_GPUS GPUs of 80 GB (none when unset)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text('#!/bin/sh\n[ -n "$FAKE_GPUS" ] || exit 1\n'
                      'case "$*" in *memory.total*) echo 81559; exit 0;; esac\n'
                      'i=0; while [ "$i" -lt "$FAKE_GPUS" ]; do echo "$i"; i=$((i+1)); done\n')
    script.chmod(0o755)
    return bin_dir


@pytest.fixture()
def launch(fake_bin, tmp_path):
    def run(script: Path, *args: str, gpus: int = 0, dry_run: bool = True, **env_vars: str):
        env = subprocess_env()
        for knob in KNOBS:
            env.pop(knob, None)
        env.update(PATH=f"{fake_bin}:{env['PATH']}", HOME=str(tmp_path / "home"), DRY_RUN="1" if dry_run else "0")
        env.setdefault("OUTPUT_DIR", str(tmp_path / "run"))
        if gpus:
            env["FAKE_GPUS"] = str(gpus)
        env.update(env_vars)
        return subprocess.run(["bash", str(script), *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
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


# --- syntax, help, the README's knob table --------------------------------------------------------------------------


def test_there_are_launchers_to_check():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in SHELL_SCRIPTS}
    assert {"scripts/launch_train.sh", "scripts/eval_all_checkpoints.sh", "experiments/000_tiny_smoke/launch_train.sh",
            "experiments/009_text_summary/launch_train.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def knobs_of(script: Path) -> dict[str, str]:
    """NAME -> meaning, read from the script's knob block (what --help prints)."""
    block = script.read_text().split("# knobs:\n", 1)[1].split("# end of knobs", 1)[0]
    return dict(re.findall(r'^([A-Z_]+)="\$\{[A-Z_]+:-.*\}"\s*#\s*(.*)$', block, flags=re.M))


@pytest.mark.e2e
@pytest.mark.parametrize("script,experiment_script", [
    (LAUNCHER, TRAIN_009), (REPO_ROOT / "scripts" / "eval_all_checkpoints.sh", EXP_009 / "eval_all_checkpoints.sh")],
    ids=["training", "evaluation"])
def test_help_lists_every_knob_with_its_value_and_meaning_and_fits_a_screen(launch, script, experiment_script):
    result = launch(experiment_script, "--help", dry_run=False)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    knobs = knobs_of(script)
    rows = [line for line in lines if re.match(r"^  [A-Z_]+ ", line)]
    assert [row.split()[0] for row in rows] == list(knobs)
    for row, meaning in zip(rows, knobs.values()):
        assert row.endswith(meaning)
    assert len(lines) <= 40  # a screen, not the 965 lines of the planner's and the trainer's help
    assert f"{EXP_009 / ('train_cluster.py' if script == LAUNCHER else 'eval_checkpoint.py')} --help" in lines[-2] + \
        lines[-1] + result.stdout


def test_the_readme_knob_table_is_the_launchers(tmp_path):
    """Every knob of scripts/launch_train.sh is in the README's table, and the table names no other."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("| knob | default | meaning |", 1)[1].split("\n\n", 1)[0]
    named = set()
    for row in table.splitlines()[2:]:
        named.update(re.findall(r"`([A-Z_]+)`", row.split("|")[1]))
    assert named == set(knobs_of(LAUNCHER))


# --- knobs checked: one line, exit 2, nothing started ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("env,message", [
    ({"LAUNCHER": "torchrun"}, "error: LAUNCHER=torchrun; use one of: accelerate deepspeed."),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "2"},
     "error: MACHINE_RANK=2; with NUM_MACHINES=2 use 0 .. 1 (machine 0 at MASTER_ADDR)."),
    ({"NUM_PROCESSES": "0"}, "error: NUM_PROCESSES=0; use a whole number >= 1."),
    ({"LAUNCHER": "deepspeed", "NUM_MACHINES": "2"},
     "error: LAUNCHER=deepspeed with NUM_MACHINES=2: DeepSpeed's runner starts the other machines over ssh/pdsh from "
     "a hostfile; use LAUNCHER=accelerate (the default) on every machine: one job through torchrun's rendezvous, "
     "no ssh."),
], ids=["launcher", "machine-rank", "processes", "deepspeed-multi-node"])
def test_a_wrong_knob_is_one_line_and_exit_2(launch, env, message):
    result = launch(TRAIN_000, dry_run=False, **env)
    assert (result.returncode, result.stderr) == (2, message + "\n")
    assert "+ " not in result.stdout


@pytest.mark.e2e
def test_009_without_gpus_refuses_in_one_line_and_points_to_000(launch):
    result = launch(TRAIN_009, dry_run=False)
    assert (result.returncode, result.stderr) == (2, (
        "error: 009_text_summary is sized for CUDA GPUs and this machine has none (nvidia-smi found no GPU); PLAN=1 "
        "prints its plan here, and bash experiments/000_tiny_smoke/launch_train.sh runs the same code path on a CPU "
        "in minutes.\n"))


# --- the echoed command (DRY_RUN=1: checks run, nothing is launched) ------------------------------------------------


@pytest.mark.e2e
def test_one_cpu_process_runs_python_directly_with_the_experiments_settings(launch, tmp_path):
    config = tmp_path / "my_config.yaml"
    config.write_text((EXP_000 / "config.yaml").read_text())
    out = tmp_path / "elsewhere" / "run1"
    result = launch(TRAIN_000, "--learning_rate", "5e-5", "--max_steps", "3", OUTPUT_DIR=str(out),
                    CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    words = echoed(result)
    assert words[:2] == ["python", str(EXP_000 / "train_cluster.py")]
    assert value_after(words, "--output_dir") == str(out) and value_after(words, "--config") == str(config)
    assert words[-4:] == ["--learning_rate", "5e-5", "--max_steps", "3"]  # flags last: they win over the file
    assert "--deepspeed" not in words and "OMP_NUM_THREADS=unset" in status_line(result)
    assert not out.exists()  # DRY_RUN: nothing written


@pytest.mark.e2e
def test_two_cpu_processes_use_deepspeed_and_one_thread_each(launch):
    words = echoed(result := launch(TRAIN_000, NUM_PROCESSES="2", MASTER_PORT="29611", MASTER_ADDR="10.0.0.7"))
    ds_config = str(EXP_000 / "ds_config_zero2.json")
    assert words[:3] == ["accelerate", "launch", "--quiet"]
    assert value_after(words, "--num_processes") == "2" and value_after(words, "--main_process_port") == "29611"
    assert value_after(words, "--main_process_ip") == "10.0.0.7"
    assert value_after(words, "--deepspeed_config_file") == ds_config and value_after(words, "--deepspeed") == ds_config
    assert value_after(words, "--num_cpu_threads_per_process") == "1"
    assert "--deepspeed_multinode_launcher" not in words
    assert "OMP_NUM_THREADS=1" in status_line(result)


@pytest.mark.e2e
def test_several_machines_use_deepspeeds_standard_launcher(launch):
    words = echoed(launch(TRAIN_000, NUM_PROCESSES="1", NUM_MACHINES="2", MACHINE_RANK="1",
                          MASTER_ADDR="10.0.0.7"))
    assert value_after(words, "--num_processes") == "2" and value_after(words, "--num_machines") == "2"
    assert value_after(words, "--machine_rank") == "1"
    assert value_after(words, "--deepspeed_multinode_launcher") == "standard"  # torchrun, not pdsh


# 009's data files and model are not on this machine; the preflight reads them, so its GPU paths read the tiny
# corpus and the Qwen3-4B fixture
TINY_DATA = ("--train_file", ".cache/tiny_smoke/data/train.jsonl", "--validation_file",
             ".cache/tiny_smoke/data/validation.jsonl",
             # the real Qwen3-4B config.json and tokenizer (no weights): what the preflight reads on the GPU machine
             "--model_name_or_path", "tests/fixtures/qwen3-4b-instruct-2507")


@pytest.mark.e2e
def test_four_gpus_four_processes_under_zero2_and_cuda_visible_devices_narrows_them(launch, tiny_dir):
    # PLAN=0: this machine's host memory is not the cluster's (the plan's host check is tested in test_planner_*)
    words = echoed(launch(TRAIN_009, *TINY_DATA, gpus=4, PLAN="0"))
    assert value_after(words, "--num_processes") == "4" and "--use_deepspeed" in words
    assert "--num_cpu_threads_per_process" not in words
    narrowed = launch(TRAIN_009, *TINY_DATA, gpus=4, CUDA_VISIBLE_DEVICES="0,2", PLAN="0")
    assert value_after(echoed(narrowed), "--num_processes") == "2"


@pytest.mark.e2e
def test_deepspeed_launcher_takes_the_gpus_asked_for(launch, tiny_dir):
    words = echoed(launch(TRAIN_009, *TINY_DATA, gpus=4, LAUNCHER="deepspeed", CUDA_VISIBLE_DEVICES="1,3", PLAN="0"))
    assert words[0] == "deepspeed" and value_after(words, "--include") == "localhost:1,3"
    assert "--num_gpus" not in words  # it would make DeepSpeed's runner drop CUDA_VISIBLE_DEVICES
    words = echoed(launch(TRAIN_009, *TINY_DATA, gpus=4, LAUNCHER="deepspeed", PLAN="0"))
    assert value_after(words, "--num_gpus") == "4"


@pytest.mark.e2e
def test_wandb_mode_and_secrets_never_printed(launch):
    assert "W&B mode: offline" in status_line(launch(TRAIN_000))
    secrets = {"WANDB_API_KEY": "sk-test-SECRET123", "HF_TOKEN": "hf_SECRET456"}
    result = launch(TRAIN_000, **secrets)
    assert result.returncode == 0, result.stderr
    assert "W&B mode: online" in status_line(result)
    assert "SECRET" not in result.stdout + result.stderr


@pytest.mark.e2e
def test_000_launcher_builds_assets_then_launches(launch, tiny_dir):
    result = launch(TRAIN_000)  # tiny_dir exists, so the asset build is a no-op
    assert result.returncode == 0, result.stderr
    assert value_after(echoed(result), "--config") == str(EXP_000 / "config.yaml")


@pytest.mark.e2e
@pytest.mark.parametrize("env,expected", [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_ALLOC_CONF": "pinned_max_cached_size_mb:64"}, "pinned_max_cached_size_mb:64,expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, "expandable_segments:False"),  # the user's choice
], ids=["unset", "added", "kept"])
def test_training_and_evaluation_run_with_expandable_segments(launch, tiny_dir, env, expected):
    """Samples of every length up to 262,144 tokens would fragment the CUDA caching allocator: both launchers add
    expandable segments to the allocator setting torch reads first (PYTORCH_ALLOC_CONF), keeping what it held."""
    for knob in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env.setdefault(knob, "")
    train = launch(TRAIN_000, **env)
    assert train.returncode == 0, train.stderr
    assert status_line(train).endswith(f"; PYTORCH_ALLOC_CONF={expected})")
    evaluation = launch(EXP_000 / "eval_all_checkpoints.sh", **env)
    assert evaluation.returncode == 0, evaluation.stderr
    assert f"  (PYTORCH_ALLOC_CONF={expected})" in evaluation.stdout.splitlines()


# --- through the real launchers -------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("launcher,env", [("accelerate", {}), ("deepspeed", {"LOCAL_SIZE": "4"})])
def test_the_gpus_asked_for_are_the_ones_each_rank_sees(launch, tmp_path, launcher, env):
    """CUDA_VISIBLE_DEVICES=1,3 and two processes: each rank of the real launch sees GPUs 1 and 3 (its LOCAL_RANK
    indexes into them); DeepSpeed's runner would otherwise have given them 0,1."""
    probes = tmp_path / "probes"
    probes.mkdir()
    result = launch(LAUNCHER, experiment_with(tmp_path, PROBE), "--report_to", "none", dry_run=False,
                    LAUNCHER=launcher, NUM_PROCESSES="2", CUDA_VISIBLE_DEVICES="1,3", MASTER_PORT="29612",
                    PROBE_DIR=str(probes), **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = sorted((json.loads(p.read_text()) for p in probes.glob("rank-*.json")), key=lambda r: r["RANK"])
    assert seen == [{"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "1,3"},
                    {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "1,3"}]


@pytest.mark.e2e
def test_a_failing_rank_hands_its_status_and_reason_to_the_launcher(launch, tmp_path, tiny_dir):
    """An error inside training after launch: the launcher's last line is the rank's one-line reason (after
    accelerate's and torchrun's own report), and its exit status is the training process's."""
    failing = "import longctx.train\nlongctx.train.load_base_model = lambda *a, **k: 1 / 0\n"
    result = launch(LAUNCHER, experiment_with(tmp_path, failing), "--report_to", "none", dry_run=False,
                    NUM_PROCESSES="2", MASTER_PORT="29613")
    assert result.returncode == 1
    assert re.fullmatch(r"error: rank [01]: ZeroDivisionError: division by zero", result.stderr.splitlines()[-1])


# --- evaluation launcher -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_eval_launcher_dry_run_uses_the_runs_own_config(launch, tmp_path):
    out = tmp_path / "some_run"
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", "--max_new_tokens", "16", OUTPUT_DIR=str(out)))
    assert words[1] == str(EXP_009 / "eval_checkpoint.py") and value_after(words, "--output_dir") == str(out)
    assert value_after(words, "--config") == str(EXP_009 / "config.yaml")  # no run_config.yaml in the run yet
    assert "--all_checkpoints" in words and words[-2:] == ["--max_new_tokens", "16"]
    out.mkdir()
    (out / "run_config.yaml").write_text("lora_r: 8\n")
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", OUTPUT_DIR=str(out)))
    assert value_after(words, "--config") == str(out / "run_config.yaml")
    words = echoed(launch(EXP_009 / "eval_all_checkpoints.sh", OUTPUT_DIR=str(out), NUM_PROCESSES="2"))
    assert words[:3] == ["accelerate", "launch", "--quiet"] and value_after(words, "--num_processes") == "2"
