"""experiments/009_text_summary/slurm_train.sbatch (its values) + scripts/slurm_train.sh (the body every experiment's
sbatch file hands over to): for 2 nodes it runs one launcher per node with the job's machine count, each node's
MACHINE_RANK and the first node as MASTER_ADDR, asks for the signal ahead of the time limit and for requeueing, and
requeues the job when the launch stops at a checkpoint (exit 75).

Stand-ins: srun, scontrol and nvidia-smi cannot run here (no SLURM, no GPU). The srun stand-in runs the task once per
node with SLURM_NODEID set, as srun does; scontrol prints the nodes of the allocation and records a requeue. The
launcher itself is the real one (DRY_RUN=1: it checks everything, prints the command it would run, runs nothing).
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from support.env import subprocess_env
from support.paths import EXP_009, EXPERIMENTS_DIR, REPO_ROOT

SBATCH = EXP_009 / "slurm_train.sbatch"
# 009's data and model are not on this machine: the tiny corpus, and the Qwen3-4B fixture (config.json + tokenizer)
TINY_DATA = ["--train_file", ".cache/tiny_smoke/data/train.jsonl", "--validation_file",
             ".cache/tiny_smoke/data/validation.jsonl", "--model_name_or_path", "tests/fixtures/qwen3-4b-instruct-2507"]
SRUN = """#!/usr/bin/env bash
# srun stand-in: the task (what follows srun's own options) once per node, SLURM_NODEID set; its status: the highest
echo "srun $*" >> "$SLURM_RECORD"
while [[ "$1" == --* ]]; do shift; done
[[ -n "${STANDIN_STATUS:-}" ]] && exit "$STANDIN_STATUS"
highest=0
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  status=0
  SLURM_NODEID=$node "$@" > "$SLURM_RECORD.node$node" 2>&1 || status=$?
  (( status > highest )) && highest=$status
done
exit $highest
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: the allocation's nodes; a requeue is recorded
case "$1 $2" in
  "show hostnames") printf 'gpu-a17\\ngpu-b03\\n' ;;
  "requeue "*) echo "requeue $2" >> "$SLURM_RECORD" ;;
esac
"""
NVIDIA_SMI = '#!/bin/sh\ncase "$*" in *memory.total*) echo 81559;; *) printf "0\\n1\\n2\\n3\\n";; esac\n'


@pytest.fixture()
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("nvidia-smi", NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"

    def submit(*flags: str, **env: str) -> subprocess.CompletedProcess:
        environment = subprocess_env(PATH=f"{bin_dir}:{subprocess_env()['PATH']}", SLURM_RECORD=str(record),
                                     SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a17,gpu-b03", SLURM_JOB_NUM_NODES="2",
                                     SLURM_SUBMIT_DIR=str(REPO_ROOT), OUTPUT_DIR=str(tmp_path / "run"), **env)
        return subprocess.run(["bash", str(SBATCH), *flags], cwd=tmp_path, env=environment, capture_output=True,
                              text=True, timeout=600)
    return submit, record


def test_the_header_asks_for_nodes_gpus_the_signal_ahead_and_requeue():
    lines = SBATCH.read_text().splitlines()
    assert lines[1] == "# Submit 009 to SLURM (from the repository root; N nodes x 4 GPUs, one launcher per node):"
    assert lines[2] == "#   sbatch --nodes=2 experiments/009_text_summary/slurm_train.sbatch [--setting value ...]"
    directives = {m.group(1): m.group(2) for m in (re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line) for line in lines)
                  if m}
    assert directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "4"
    assert directives["signal"] == "USR1@3600" and "requeue" in directives


@pytest.mark.e2e
def test_each_node_runs_one_launcher_of_one_job(slurm, tiny_dir):
    submit, record = slurm
    proc = submit(*TINY_DATA, DRY_RUN="1", PLAN="0")  # PLAN=0: this machine's host memory is not a node's
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == "job 4242: 2 node(s), machine 0 at gpu-a17:29500 (restart 0)"
    assert record.read_text().splitlines()[0].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c ")
    for node in (0, 1):
        output = (record.parent / f"record.node{node}").read_text()
        (command,) = [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]
        value = {flag: command[command.index(flag) + 1] for flag in (
            "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port", "--num_processes",
            "--deepspeed_multinode_launcher")}
        assert command[:3] == ["accelerate", "launch", "--quiet"]
        assert value == {"--num_machines": "2", "--machine_rank": str(node), "--main_process_ip": "gpu-a17",
                         "--main_process_port": "29500", "--num_processes": "8",
                         "--deepspeed_multinode_launcher": "standard"}
        assert command[-6:] == TINY_DATA  # the flags given to sbatch reach every node's launcher
        assert ("data:" in output) == (node == 0)  # machine 0 checks the data and OUTPUT_DIR for the job


@pytest.mark.e2e
def test_a_launch_stopped_at_a_checkpoint_is_requeued(slurm):
    submit, record = slurm
    proc = submit(STANDIN_STATUS="75")
    assert proc.returncode == 75
    assert proc.stdout.splitlines()[-1] == "job 4242: stopped at a checkpoint (exit 75); requeued, it resumes from there"
    assert record.read_text().splitlines()[-1] == "requeue 4242"
    assert submit(STANDIN_STATUS="1").returncode == 1
    assert record.read_text().splitlines().count("requeue 4242") == 1  # a failure is not requeued


@pytest.mark.parametrize("sbatch", sorted(EXPERIMENTS_DIR.glob("*/slurm_train.sbatch")),
                         ids=lambda path: path.parent.name)
def test_every_sbatch_file_hands_its_own_experiment_to_the_shared_body(sbatch):
    """The body is tested above through 009's file; each other file must name its own folder (a copied file that
    still named 009 would train 009) and be submitted under its own name."""
    lines = sbatch.read_text().splitlines()
    experiment = f"experiments/{sbatch.parent.name}"
    assert lines[-1] == f'exec bash scripts/slurm_train.sh {experiment} "$@"'
    assert f"#SBATCH --job-name={sbatch.parent.name}" in lines
    assert any(line.startswith("#   sbatch ") and f"{experiment}/slurm_train.sbatch" in line for line in lines[:5])
