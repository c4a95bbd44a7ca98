"""scripts/gpu_check.sh (benchmarks/gpu_check.py): every GPU-only measurement in one call. Here, without a GPU: its
CPU smoke run goes through every step at tiny sizes; a step that hangs or dies is reported and the next one runs;
the carried wheels are this project's pins, and only what the machine lacks or has at another version is installed."""

from __future__ import annotations

import json
import subprocess

import pytest

from support.env import subprocess_env
from support.paths import REPO_ROOT

STEPS = ["lora_262144", "lora_131072", "lora_65536", "ours_32768", "baseline_32768", "generate_65536",
         "generate_262144", "cuda_tests"]


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), *args], cwd=REPO_ROOT,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=300)


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_the_cpu_smoke_run_goes_through_every_step_and_writes_the_table(tmp_path):
    proc = gpu_check("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = rows_of(tmp_path)
    assert [r["step"] for r in rows] == [*STEPS, "environment"]
    assert all(r["status"] == "ok" for r in rows[:-1]), rows
    assert rows[-1]["command"] == f"bash scripts/gpu_check.sh --cpu-smoke --out {tmp_path}"
    assert rows[-1]["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"  # as the launchers set it
    # the evaluation path: the adapter is loaded in the base's dtype (fp32 on this CPU, bf16 on a GPU)
    assert {r["adapter_dtype"] for r in rows if r["step"].startswith("generate")} == {"torch.float32"}
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert table[0].startswith("Device: cpu (smoke); torch 2.13.0")
    assert table[3] == ("| step | tokens | status | peak allocated GiB | peak reserved GiB | planned GiB | planned / "
                        "allocated | seconds | notes |")
    assert [line.split(" | ")[0].lstrip("| ") for line in table[5:]] == STEPS


@pytest.mark.e2e
def test_a_step_that_hangs_or_dies_is_reported_and_the_next_one_runs_in_a_fresh_process(tmp_path):
    """Four steps of one group: the second hangs (past its 20 s), the third's process dies as it reports (status 3):
    each is reported, and the step after each runs in a fresh process."""
    proc = gpu_check("--cpu-smoke", "--out", str(tmp_path), "--only", "lora_262144", "lora_131072", "lora_65536",
                     "ours_32768", GPU_CHECK_FAULT="lora_131072:hang,lora_65536:exit")
    assert proc.returncode == 1
    rows = rows_of(tmp_path)
    assert [(r["step"], r["status"]) for r in rows[:-1]] == [("lora_262144", "ok"), ("lora_131072", "timeout"),
                                                              ("lora_65536", "error"), ("ours_32768", "ok")]
    assert rows[1]["error"] == "no result within 20 s"
    assert rows[2]["error"] == "the process ended with status 3 (see lora.log)"
    assert proc.stderr.strip().splitlines()[-1] == (f"error: 2 step(s) did not pass: lora_131072, lora_65536; see "
                                                    f"{tmp_path}")


def test_the_carried_wheels_are_this_projects_pins():
    import importlib.metadata

    pins = dict(line.split("==") for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name: version.split("#")[0].strip() for name, version in pins.items()}
    carried = dict(line.split("==") for line in (REPO_ROOT / "scripts" / "gpu_check_requirements.txt").read_text()
                   .splitlines() if "==" in line and not line.startswith("#"))
    for name in ("transformers", "peft", "accelerate", "deepspeed"):
        assert carried[name] == pins[name], name
    # DeepSpeed's needs, at the versions the project runs with here
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson"):
        assert carried[name] == importlib.metadata.version(name), name
    assert "torch" not in carried  # the GPU machine keeps its own CUDA build


def test_only_the_packages_the_machine_lacks_or_has_at_another_version_are_installed(tmp_path):
    import importlib.metadata
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    here = importlib.metadata.version("peft")
    for name in (f"peft-{here}-py3-none-any.whl", "transformers-99.0.0-py3-none-any.whl",
                 "not_installed_anywhere-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    chosen = [text for _, text in gpu_check.wheels_to_install(tmp_path)]
    assert chosen == ["not_installed_anywhere 1.0 (was absent)",
                      f"transformers 99.0.0 (was {importlib.metadata.version('transformers')})"]
