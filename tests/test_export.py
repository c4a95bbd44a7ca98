"""longctx.export: the merged model loads with plain transformers in a process that cannot import longctx or peft,
and gives base + adapter's logits and greedy tokens; an exported average holds the mean of its members' merged
weights; bad input exits 2 before any weight loads, a merge that does not reproduce the adapter exits 1, and neither
leaves anything behind.

Runs are made in-process on the tiny model (support.adapters: peft adapters with seeded weights), no training."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longctx import export
from longctx.run.checkpoints import write_manifest
from support.adapters import base_model, make_run, merged_weights
from support.env import subprocess_env
from support.paths import REPO_ROOT

EXPORTED = ["chat_template.jinja", "config.json", "generation_config.json", "manifest.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"]
FP32_RTOL = 2**-16  # export's float32 tolerance, as a fraction of the largest |logit| (why: longctx/export.py)

# Runs in a fresh interpreter: -I (no PYTHONPATH, no user site, neither the script's directory nor the working
# directory on sys.path), started outside the repository, and longctx and peft made unimportable (None in
# sys.modules: `import` raises ImportError, importlib.util.find_spec answers None, so transformers sees no peft).
RELOAD = r"""
import json, sys
sys.modules["longctx"] = None
sys.modules["peft"] = None
blocked = {}
for name in ("longctx", "peft"):
    try:
        __import__(name)
        blocked[name] = False
    except ImportError:
        blocked[name] = True
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, document, out = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory).eval()
ids = tokenizer.apply_chat_template([{"role": "user", "content": document}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    tokens = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=32)[0, len(ids):].tolist()
json.dump({"blocked": blocked, "dtype": str(model.dtype), "class": type(model).__name__, "ids": ids,
           "logits": logits.tolist(), "tokens": tokens, "chat_template": tokenizer.chat_template,
           "peft_loaded": "peft" in sys.modules and sys.modules["peft"] is not None}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, tiny_dir) -> Path:
    """checkpoint-10, -20, -30 and final_adapter (= checkpoint-30), random adapters of rank 4 on q, v, down_proj.
    Tests read it; those that change it work on a copy."""
    return make_run(tiny_dir, tmp_path_factory.mktemp("export") / "run")


def run_export(*argv: str) -> int:
    """export.main in this process, from the repository root (where run_config.yaml's paths start); exit status."""
    try:
        export.main([str(a) for a in argv])
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_export_loads_without_longctx_or_peft_and_reproduces_base_plus_adapter(made_run, tiny_dir, tmp_path,
                                                                                    capsys):
    from peft import PeftModel

    out = tmp_path / "export"
    assert run_export("--run_dir", made_run, "--checkpoint", "checkpoint-20", "--output", out) == 0
    printed = capsys.readouterr().out
    assert "verified: max |logit difference| " in printed and "the same " in printed
    assert printed.splitlines()[-1] == f"exported {out}: {', '.join(EXPORTED)}"
    assert sorted(p.name for p in out.iterdir()) == EXPORTED
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the temporary directory is gone
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["source_run"], manifest["checkpoint"], manifest["global_step"], manifest["dtype"]) == (
        str(made_run.resolve()), "checkpoint-20", 20, "float32")
    assert manifest["adapter_sha256"] == sha256(made_run / "checkpoint-20" / "adapter_model.safetensors")
    assert manifest["files"] == {name: {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}
                                 for name in EXPORTED if name != "manifest.json"}
    assert manifest["verification"]["logits_ok"] and manifest["verification"]["chat_prompt_matches_training"]

    document = "Summarize the following legal document.\n\n" + export.PROBE_DOCUMENT
    result = tmp_path / "reload.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-I", "-c", RELOAD, str(out), document, str(result)], cwd=elsewhere,
                          env=subprocess_env(PYTHONPATH=""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(result.read_text())
    assert reloaded["blocked"] == {"longctx": True, "peft": True} and not reloaded["peft_loaded"]
    assert (reloaded["dtype"], reloaded["class"]) == ("torch.float32", "Qwen3ForCausalLM")
    assert reloaded["chat_template"] == (tiny_dir / "model" / "chat_template.jinja").read_text()

    # The reference: the tiny model + the checkpoint's adapter through peft, as evaluation scores it, on the ids the
    # plain process built with the exported tokenizer's chat template.
    ids = torch.tensor([reloaded["ids"]])
    model = PeftModel.from_pretrained(base_model(tiny_dir), str(made_run / "checkpoint-20"),
                                      autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0]
        tokens = model.generate(input_ids=ids, max_new_tokens=32, do_sample=False, eos_token_id=[2],
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
    difference = (torch.tensor(reloaded["logits"]) - expected).abs().max().item()
    assert difference <= FP32_RTOL * expected.abs().max().item()
    assert reloaded["tokens"] == tokens


def test_an_exported_average_holds_the_mean_of_its_members_merged_weights(made_run, tiny_dir, tmp_path, capsys):
    """--average_last 2 of checkpoint-10, -20, -30 + final_adapter (step 30, the same weights as checkpoint-30):
    checkpoint-20 and checkpoint-30. The reference: each merged by peft alone, the tensors averaged."""
    from safetensors.torch import load_file

    out = tmp_path / "export"
    out.mkdir()  # an empty output directory is taken
    assert run_export("--run_dir", made_run, "--average_last", "2", "--output", out) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith(
        "average of checkpoint-20, checkpoint-30: the exact mean of their LoRA updates, an adapter of rank 8 (2 x 4); "
        "truncated to rank 4, the averaged update would be off by ")
    first = merged_weights(tiny_dir, made_run / "checkpoint-20")
    second = merged_weights(tiny_dir, made_run / "checkpoint-30")
    written = load_file(str(out / "model.safetensors"))
    assert set(written) <= set(first) and len(written) >= 20
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["checkpoint"], manifest["global_step"]) == ("average-20+30", 30)
    assert [(m["name"], m["global_step"], m["adapter_sha256"]) for m in manifest["average"]["members"]] == [
        (name, step, sha256(made_run / name / "adapter_model.safetensors"))
        for name, step in (("checkpoint-20", 20), ("checkpoint-30", 30))]
    assert manifest["average"]["r"] == 8 and manifest["average"]["truncated_svd_error"]["rank"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def bad_run(made_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made_run, tmp_path / "run"))


def test_bad_input_exits_2_with_one_line_before_the_weights_load_and_writes_nothing(made_run, tiny_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    def no_weights(*_args, **_kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(export, "load_base_model", no_weights)
    run = bad_run(made_run, tmp_path)
    with (run / "checkpoint-10" / "adapter_model.safetensors").open("ab") as f:
        f.write(b"x")  # altered after its manifest was written
    config = json.loads((run / "checkpoint-20" / "adapter_config.json").read_text())
    (run / "checkpoint-20" / "adapter_config.json").write_text(json.dumps({**config,
                                                                          "base_model_name_or_path": "org/other"}))
    write_manifest(run / "checkpoint-20", 20, None)  # complete, but of another base model
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    out = tmp_path / "export"
    size = (run / "checkpoint-10" / "adapter_model.safetensors").stat().st_size
    cases = [
        (["--checkpoint", "checkpoint-99", "--output", out],
         f"setting 'checkpoint' = 'checkpoint-99': no such checkpoint in {run}; its complete checkpoints are: "
         f"checkpoint-20, checkpoint-30, final_adapter."),
        (["--checkpoint", "checkpoint-10", "--output", out],
         f"setting 'checkpoint' = 'checkpoint-10': {run / 'checkpoint-10'} is incomplete: adapter_model.safetensors "
         f"has {size} bytes, manifest.json says {size - 1} (truncated or altered); its complete checkpoints "
         f"are: checkpoint-20, checkpoint-30, final_adapter."),
        (["--checkpoint", "checkpoint-30", "--output", taken],
         f"setting 'output' = '{taken}': not empty (1 entries, e.g. notes.txt); choose a new directory, or remove it "
         f"first."),
        (["--average", "checkpoint-20", "checkpoint-30", "--output", out],
         f"setting 'average' = [checkpoint-20, checkpoint-30]: checkpoint-20 and checkpoint-30 differ in "
         f"base_model_name_or_path ('org/other' vs '{tiny_dir / 'model'}'); average checkpoints of one base model "
         f"with the same LoRA targets (one run)."),
        (["--average_last", "5", "--output", out],
         f"setting 'average_last' = 5: {run} holds only 2 complete checkpoint(s) of distinct steps (checkpoint-20, "
         f"checkpoint-30); use --average_last 2 or fewer."),
        (["--checkpoint", "checkpoint-30", "--average_last", "2", "--output", out],
         "settings 'checkpoint' and 'average_last' exclude each other: give one of them."),
        (["--checkpoint", "checkpoint-30", "--output", out, "--ouptut", out],
         "command line: unknown setting '--ouptut'. Did you mean '--output'?"),
    ]
    for flags, line in cases:
        assert run_export("--run_dir", run, *flags) == 2
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"error: {line}\n")
    # a chat template other than the one the run trained with (run_info.json records its sha256)
    (run / "run_info.json").write_text(json.dumps({"chat_template_sha256": "0" * 64}))
    assert run_export("--run_dir", run, "--checkpoint", "checkpoint-30", "--output", out) == 2
    template = sha256(REPO_ROOT / ".cache" / "tiny_smoke" / "model" / "chat_template.jinja")
    assert capsys.readouterr().err == (
        f"error: the built-in chat template of tokenizer '.cache/tiny_smoke/model' (sha256 {template[:12]}) is not "
        f"the template the run trained with (sha256 000000000000 in {run / 'run_info.json'}); restore that template "
        f"(each checkpoint holds a copy, chat_template.jinja) before exporting.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]  # no output, no temporary directory
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_a_merge_that_does_not_reproduce_the_adapter_exits_1_and_writes_nothing(made_run, tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """A broken merge: the adapter dropped instead of merged (peft's unload). The written model is then the base
    model, so the largest logit difference is exactly the adapter's own effect on the probe, computed here."""
    from peft import LoraModel, PeftModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "export"
    assert run_export("--run_dir", made_run, "--checkpoint", "checkpoint-20", "--output", out) == 1
    from longctx.data.tokenizer import load_tokenizer
    from longctx.export import probe_prompt, run_settings

    model_args, data, _ = run_settings(made_run)
    probe = torch.tensor([probe_prompt(load_tokenizer(model_args), data, model_args).ids])
    with torch.no_grad():
        base = base_model(tiny_dir)(input_ids=probe).logits[0]
        reference = PeftModel.from_pretrained(base_model(tiny_dir), str(made_run / "checkpoint-20"))(
            input_ids=probe).logits[0]
    effect, largest = (base - reference).abs().max().item(), reference.abs().max().item()
    assert capsys.readouterr().err == (
        f"error: verification failed: max |logit difference| {effect:.3g} > tolerance {FP32_RTOL * largest:.3g} "
        f"(rtol {FP32_RTOL:.3g} x the largest |logit| {largest:.3g}, float32; the adapter itself moves the logits by "
        f"up to {effect:.3g}); nothing was written to {out}.\n")
    assert list(tmp_path.iterdir()) == []
