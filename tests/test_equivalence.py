"""One process with gradient accumulation 2 (the session's reference run), two processes without it, and two
"machines" of one process each see the same samples in each optimizer step, so they must give the same per-step
loss and grad_norm and the same adapter: under plain DDP and under DeepSpeed ZeRO-2, through the real launcher. A
wrong process-count or accumulation factor in the loss, or a loss normalised per micro-batch instead of per
optimizer step, changes these numbers by whole factors.

The two machines are two launcher invocations on this machine (NUM_MACHINES=2, MACHINE_RANK 0 and 1,
MASTER_ADDR=127.0.0.1): the real accelerate launch with DeepSpeed's `standard` multi-node launcher and torchrun's
rendezvous, as on a cluster."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from longctx.run import layout
from support.launching import REFERENCE, Started, assert_same_steps, experiment_with, run, step_metrics
from support.paths import REPO_ROOT
from support.paths import TRAIN_000 as TRAIN

pytestmark = pytest.mark.e2e
# The reference run's samples and schedule, without what does not change the numbers (evaluation, W&B).
SAME_STEPS = [*REFERENCE, "--eval_strategy", "no", "--report_to", "none"]
# Each rank of a two-machine run records who it is, which process read the data files, and when it tokenized.
PROBE = """
import json, os, time
from pathlib import Path

import longctx.train as train

out = Path(os.environ["PROBE_DIR"])
rank = os.environ["RANK"]
(out / f"rank-{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "CUDA_VISIBLE_DEVICES")}))
real_check, real_tokenize = train.check_records, train.tokenize_split

def check_records(*args, **kwargs):
    (out / f"scanned-by-{rank}").touch()
    return real_check(*args, **kwargs)

def tokenize_split(*args, **kwargs):
    start = time.monotonic()
    result = real_tokenize(*args, **kwargs)
    with (out / f"tokenized-{rank}.jsonl").open("a") as f:
        f.write(json.dumps([start, time.monotonic()]) + "\\n")
    return result

train.check_records, train.tokenize_split = check_records, tokenize_split
"""


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / layout.FINAL_ADAPTER / layout.ADAPTER_WEIGHTS)


def assert_same_adapter(run_dir, reference_dir) -> None:
    reference, trained = adapter(reference_dir), adapter(run_dir)
    assert trained.keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=0, msg=name)


def two_machines(command: list, output_dir, port: str, **env: str) -> tuple[list[Started], list[int]]:
    """The same launcher command as machine 0 and machine 1 of a job of two (one process each), run to the end;
    output_dir(rank) is each machine's OUTPUT_DIR. Returns the finished machines and their exit statuses."""
    machines = [Started(["bash", *command], OUTPUT_DIR=output_dir(rank), NUM_MACHINES="2", MACHINE_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NUM_PROCESSES="1", **env) for rank in (0, 1)]
    try:
        return machines, [machine.finish(timeout=600) for machine in machines]
    finally:
        for machine in machines:
            machine.kill()


def test_the_samples_carry_different_label_counts(tiny_dir, tiny_tokenizer):
    """Otherwise a per-micro-batch mean and the per-step normalisation would coincide and prove nothing."""
    records = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:16]]
    counts = {len(tiny_tokenizer(r["summary"])["input_ids"]) for r in records}
    assert len(counts) > 3, counts


@pytest.mark.parametrize("backend,env,port", [("ddp", {"USE_DEEPSPEED": "0"}, "29531"),
                                              ("zero2", {"USE_DEEPSPEED": "1"}, "29532")])
def test_two_processes_equal_one_process_with_accumulation(reference_run, tmp_path, backend, env, port):
    out = tmp_path / backend
    proc = run(["bash", TRAIN, *SAME_STEPS, "--gradient_accumulation_steps", "1"], OUTPUT_DIR=str(out),
               NUM_PROCESSES="2", MASTER_PORT=port, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("--use_deepspeed" in proc.stdout) == (backend == "zero2")
    assert "processes: 2" in proc.stdout
    worst = assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    assert_same_adapter(out, reference_run[0])
    if backend == "zero2":  # ZeRO-2 state in the checkpoint: one optimizer shard per rank
        assert len(list((out / "checkpoint-7" / "global_step7").glob("*optim_states.pt"))) == 2
    print(f"{backend}: largest per-step difference {worst:.2g}")


def test_two_machines_form_one_job_equal_to_one_machine(reference_run, tmp_path):
    """Each launcher starts one process; together they are one world of 2 that shards the data, writes one
    checkpoint series, and gives the reference's numbers. Machine 0 alone read the data files (in its preflight,
    then global rank 0 for the job) and tokenized first; no environment file was written."""
    exp, out, probes, cache = (experiment_with(tmp_path, PROBE), tmp_path / "run", tmp_path / "probes",
                               tmp_path / "shared_datasets_cache")
    probes.mkdir()
    machines, statuses = two_machines([REPO_ROOT / "scripts" / "launch_train.sh", exp, *SAME_STEPS,
                                       "--gradient_accumulation_steps", "1", "--datasets_cache_dir", cache],
                                      lambda rank: str(out), "29541", PROBE_DIR=str(probes))
    assert statuses == [0, 0], "\n".join(m.output()[-3000:] for m in machines)
    assert list(cache.rglob("*.arrow"))  # the tokenized corpus went to the datasets_cache_dir setting
    ranks = [json.loads((probes / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(p["RANK"], p["WORLD_SIZE"], p["LOCAL_RANK"], p["GROUP_RANK"]) for p in ranks] == [
        ("0", "2", "0", "0"), ("1", "2", "0", "1")]
    assert sorted(p.name for p in probes.glob("scanned-by-*")) == ["scanned-by-0"]
    (rank0_train, _), (rank1_train, _) = ([json.loads(line) for line in
                                          (probes / f"tokenized-{r}.jsonl").read_text().splitlines()] for r in (0, 1))
    assert rank1_train[0] >= rank0_train[1]  # rank 1 (machine 1) started tokenizing after rank 0 had finished
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    assert "processes: 2" in machines[0].output() and "a new run" in machines[0].output()
    assert "data:" not in machines[1].output()  # machine 1's preflight checked the settings only
    assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    assert_same_adapter(out, reference_run[0])
    assert not list(REPO_ROOT.glob(".deepspeed_env")) and not list(tmp_path.rglob(".deepspeed_env"))


def test_machines_that_do_not_share_output_dir_stop_naming_it(tmp_path, tiny_dir):
    """Machine-local storage: each machine's OUTPUT_DIR is another directory. Rank 0 writes a token there, rank 1
    cannot read it back: both stop before the model loads, with the same one-line reason."""
    machines, statuses = two_machines([TRAIN, *SAME_STEPS], lambda rank: str(tmp_path / f"local-{rank}"), "29542")
    assert statuses == [2, 2], "\n".join(m.output()[-3000:] for m in machines)
    for rank, machine in enumerate(machines):  # each machine names its own OUTPUT_DIR
        expected = f"error: OUTPUT_DIR {tmp_path / f'local-{rank}'} is not one shared directory: rank 1 ("
        last = machine.lines[-1]
        assert last.startswith(expected) and last.endswith(
            ") cannot see the file rank 0 wrote there. Put OUTPUT_DIR on a filesystem every machine mounts at the "
            "same path (checkpoints and resume need it)."), machine.output()[-2000:]
        assert "Loading weights" not in machine.output()
