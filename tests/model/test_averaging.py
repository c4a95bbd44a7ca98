"""longctx.model.averaging: the exact average of LoRA updates as one stacked adapter (checked on hand-made tensors,
then against peft's own merges on the tiny model), the truncated-SVD report, the choice of members and what is
refused, the written directory (atomic, manifest, reused only for the same members), and OVERWRITE removing it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longctx.errors import ConfigError
from longctx.model import averaging
from longctx.run.checkpoints import Checkpoint, adapter_problem, find_checkpoints, write_manifest
from longctx.run.directory import start_afresh
from support.adapters import base_model, make_adapter, make_run, merged_weights

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


def hand_member(tmp_path: Path, name: str, step: int, a: list, b: list, r: int, alpha: float,
                **config) -> averaging.Member:
    """A member from hand-written A (r x 2) and B (2 x r) of one 2 x 2 module."""
    path = tmp_path / name
    path.mkdir()
    save_file({f"{MODULE}.lora_A.weight": torch.tensor(a), f"{MODULE}.lora_B.weight": torch.tensor(b)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": ["q_proj"], **config}))
    write_manifest(path, step, None)
    return averaging.Member(name, path, step, json.loads((path / "adapter_config.json").read_text()),
                            averaging.recorded_sha256(path))


def test_the_stacked_adapter_is_the_mean_of_the_updates_by_hand(tmp_path):
    """Member 1: A = [[1, 0]], B = [[2], [0]], r 1, alpha 1 (scaling 1): update [[2, 0], [0, 0]].
    Member 2: A = [[0, 1]], B = [[0], [4]], r 1, alpha 0.5 (scaling 0.5): update [[0, 0], [0, 2]].
    Mean update: [[1, 0], [0, 1]]. Stacked: A = [[1, 0], [0, 1]]; B = [1 x [2, 0] / 2 | 0.5 x [0, 4] / 2] =
    [[1, 0], [0, 1]]; B @ A = identity, rank 2, lora_alpha 2 (scaling 1).
    Averaging the factors instead: A = [[0.5, 0.5]], B = [[1], [2]] (scalings 1 and 0.5 cannot even be applied to
    one mean): B @ A = [[0.5, 0.5], [1, 1]], not the mean.
    Truncated to rank 1: singular values (1, 1), error sqrt(1 / 2) = 0.70711."""
    one = hand_member(tmp_path, "checkpoint-10", 10, [[1.0, 0.0]], [[2.0], [0.0]], r=1, alpha=1)
    two = hand_member(tmp_path, "checkpoint-20", 20, [[0.0, 1.0]], [[0.0], [4.0]], r=1, alpha=0.5)
    tensors = averaging.averaged_tensors([one, two])
    a, b = tensors[f"{MODULE}.lora_A.weight"], tensors[f"{MODULE}.lora_B.weight"]
    assert a.tolist() == [[1.0, 0.0], [0.0, 1.0]] and b.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert (b @ a).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    naive = torch.tensor([[1.0], [2.0]]) @ torch.tensor([[0.5, 0.5]])
    assert naive.tolist() == [[0.5, 0.5], [1.0, 1.0]]  # what averaging A and B separately would give
    config = averaging.averaged_config([one, two])
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 2, False)
    report = averaging.truncation_error(tensors, rank=1)
    assert report.largest == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert (report.rank, report.module, report.modules) == (1, "model.layers.0.self_attn.q_proj", 1)
    assert averaging.truncation_error(tensors, rank=2).largest == pytest.approx(0.0, abs=1e-12)


def test_rslora_scaling_is_alpha_over_the_square_root_of_the_rank(tmp_path):
    """r 4, alpha 8: scaling 8 / 4 = 2, with use_rslora 8 / sqrt(4) = 4."""
    plain = hand_member(tmp_path, "checkpoint-1", 1, [[1.0, 0.0]] * 4, [[1.0] * 4] * 2, r=4, alpha=8)
    rs = hand_member(tmp_path, "checkpoint-2", 2, [[1.0, 0.0]] * 4, [[1.0] * 4] * 2, r=4, alpha=8, use_rslora=True)
    assert (plain.scaling, rs.scaling) == (2.0, 4.0)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 300, 42, 7, 911, 64, 3, 250, 18, 77, 501]])


def test_averaging_a_checkpoint_with_itself_gives_its_logits(tiny_dir, tmp_path):
    """(s B A + s B A) / 2 = s B A: stacked, A = [A; A] and B = [s B / 2 | s B / 2]. The update has rank r, so the
    truncated-SVD error at rank r is 0 (float64 round-off)."""
    from peft import PeftModel

    path = make_adapter(tiny_dir, tmp_path / "checkpoint-10", seed=1, step=10, r=4, lora_alpha=8)
    members = averaging.load_members([Checkpoint(path, 10), Checkpoint(path, 10)])
    report = averaging.write_average(members, tmp_path / "average")
    assert report.rank == 4 and report.largest < 1e-6
    alone = logits(PeftModel.from_pretrained(base_model(tiny_dir), str(path)).eval(), IDS)
    average = logits(PeftModel.from_pretrained(base_model(tiny_dir), str(tmp_path / "average")).eval(), IDS)
    assert (alone - logits(base_model(tiny_dir), IDS)).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(average, alone, rtol=0, atol=1e-5)


def test_the_average_of_two_equals_the_mean_of_their_merged_weights(tiny_dir, tmp_path):
    """The reference: each member merged by peft on its own, the weight tensors averaged. Members of different rank,
    alpha and rslora, so each one's own scaling must be applied: (r 4, alpha 8) scaling 2, (r 8, alpha 8, rslora)
    8 / sqrt(8) = 2.83. The stacked adapter (rank 12), merged, and run unmerged (peft's LoRA path), equals it:
    weights to 1e-6, logits to 1e-5 (float32 round-off of the two summation orders, 2 layers)."""
    from peft import PeftModel

    one = make_adapter(tiny_dir, tmp_path / "checkpoint-10", seed=1, step=10, r=4, lora_alpha=8)
    two = make_adapter(tiny_dir, tmp_path / "checkpoint-20", seed=2, step=20, r=8, lora_alpha=8, use_rslora=True)
    first, second = merged_weights(tiny_dir, one), merged_weights(tiny_dir, two)
    reference = {name: (first[name] + second[name]) / 2 for name in first}

    members = averaging.load_members([Checkpoint(one, 10), Checkpoint(two, 20)])
    averaging.write_average(members, tmp_path / "average")
    assert json.loads((tmp_path / "average" / "adapter_config.json").read_text())["r"] == 12
    stacked = PeftModel.from_pretrained(base_model(tiny_dir), str(tmp_path / "average")).eval()
    unmerged = logits(stacked, IDS)
    merged = stacked.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    changed = [name for name in reference if not torch.equal(first[name], second[name])]
    assert len(changed) == 6  # q_proj, v_proj, down_proj of 2 layers: what the members adapt
    for name in reference:
        torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=1e-6)

    mean_model = base_model(tiny_dir)
    mean_model.load_state_dict(reference)
    expected = logits(mean_model, IDS)
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=1e-5)


def test_last_distinct_takes_one_checkpoint_per_step_preferring_checkpoint_n():
    found = [Checkpoint(Path(f"run/checkpoint-{s}"), s) for s in (10, 20, 30)] + [
        Checkpoint(Path("run/final_adapter"), 30)]
    assert [c.name for c in averaging.last_distinct(found, 2)] == ["checkpoint-20", "checkpoint-30"]
    only_final = found[:2] + [Checkpoint(Path("run/final_adapter"), 35)]
    assert [c.name for c in averaging.last_distinct(only_final, 2)] == ["checkpoint-20", "final_adapter"]
    assert [c.name for c in averaging.last_distinct(found, 9)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]


def test_names_are_the_members_steps_and_long_ones_end_in_a_hash(tmp_path):
    def members(steps):
        return [averaging.Member(f"checkpoint-{s}", tmp_path, s, {"r": 1, "lora_alpha": 1}, "") for s in steps]

    assert averaging.average_name(members([450, 400, 474])) == "average-400+450+474"
    long = averaging.average_name(members(range(1000, 40000, 1000)))  # 39 members: 201 characters spelt out
    digest = __import__("hashlib").sha256("+".join(str(s) for s in range(1000, 40000, 1000)).encode()).hexdigest()
    assert long == f"average-1000+39000-{digest[:8]}"


def test_named_checkpoints_refuse_unknown_incomplete_and_same_step_members(tiny_dir, tmp_path):
    run = make_run(tiny_dir, tmp_path / "run", steps=(10, 20))
    (run / "checkpoint-20" / "manifest.json").unlink()
    with pytest.raises(ConfigError) as caught:
        averaging.named_checkpoints(run, ["checkpoint-10", "checkpoint-99"])
    assert str(caught.value) == (f"setting 'average' = [checkpoint-10, checkpoint-99]: no such checkpoint in {run}; "
                                 f"its complete checkpoints are: checkpoint-10, final_adapter.")
    with pytest.raises(ConfigError) as caught:
        averaging.named_checkpoints(run, ["checkpoint-10", "checkpoint-20"])
    assert str(caught.value) == (f"setting 'average' = [checkpoint-10, checkpoint-20]: {run / 'checkpoint-20'} is "
                                 f"incomplete: manifest.json is missing (the save did not finish); its complete "
                                 f"checkpoints are: checkpoint-10, final_adapter.")
    with pytest.raises(ConfigError) as caught:
        averaging.named_checkpoints(run, ["final_adapter", "checkpoint-10", "final_adapter"])
    assert str(caught.value) == ("setting 'average' = [final_adapter, checkpoint-10, final_adapter]: final_adapter "
                                 "and final_adapter are both step 20 (the same weights, or the same name twice); name "
                                 "each checkpoint once.")
    with pytest.raises(ConfigError) as caught:
        averaging.named_checkpoints(run, ["checkpoint-10"])
    assert str(caught.value) == ("setting 'average' = [checkpoint-10]: an average needs 2 or more checkpoints; name "
                                 "two or more complete checkpoints of the run.")
    with pytest.raises(ConfigError) as caught:
        averaging.named_checkpoints(run, ["checkpoint-10", "best_checkpoint"])
    assert str(caught.value) == (f"setting 'average' = [checkpoint-10, best_checkpoint]: 'best_checkpoint' is not a "
                                 f"checkpoint name; name checkpoints of {run} as checkpoint-N or final_adapter.")


@pytest.mark.parametrize(("config", "why"), [
    ({"use_dora": True}, "it sets use_dora = True (DoRA: a learned magnitude rescales the whole weight, the update "
                         "is not s * B @ A)"),
    ({"modules_to_save": ["lm_head"]}, "it sets modules_to_save = ['lm_head'] (fully trained copies of modules "
                                       "besides the LoRA update)"),
    ({"init_lora_weights": "pissa"}, "it sets init_lora_weights = 'pissa', which changes the base weights (only True, "
                                     "False, 'gaussian' and 'eva' leave them as they are)"),
    ({"bias": "lora_only"}, "it sets bias = 'lora_only' (trained biases besides the LoRA update)"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3', not LORA"),
])
def test_adapters_other_than_plain_lora_are_refused(tmp_path, config, why):
    hand_member(tmp_path, "checkpoint-10", 10, [[1.0, 0.0]], [[1.0], [0.0]], r=1, alpha=1)
    hand_member(tmp_path, "checkpoint-20", 20, [[1.0, 0.0]], [[1.0], [0.0]], r=1, alpha=1, **config)
    with pytest.raises(ConfigError) as caught:
        averaging.load_members([Checkpoint(tmp_path / "checkpoint-10", 10), Checkpoint(tmp_path / "checkpoint-20", 20)])
    assert str(caught.value) == (f"setting 'average' = [checkpoint-10, checkpoint-20]: checkpoint-20 is not a plain "
                                 f"LoRA adapter: {why}; only plain LoRA updates (s * B @ A) can be averaged exactly.")


def test_members_of_different_base_models_or_targets_are_refused(tmp_path):
    hand_member(tmp_path, "checkpoint-10", 10, [[1.0, 0.0]], [[1.0], [0.0]], r=1, alpha=1,
                base_model_name_or_path="org/model-a")
    hand_member(tmp_path, "checkpoint-20", 20, [[1.0, 0.0]], [[1.0], [0.0]], r=1, alpha=1,
                base_model_name_or_path="org/model-b")
    hand_member(tmp_path, "checkpoint-30", 30, [[1.0, 0.0]], [[1.0], [0.0]], r=1, alpha=1,
                base_model_name_or_path="org/model-a", target_modules=["q_proj", "v_proj"])
    chosen = [Checkpoint(tmp_path / f"checkpoint-{s}", s) for s in (10, 20, 30)]
    with pytest.raises(ConfigError) as caught:
        averaging.load_members(chosen[:2], "average_last")
    assert str(caught.value) == ("setting 'average_last' = [checkpoint-10, checkpoint-20]: checkpoint-10 and "
                                 "checkpoint-20 differ in base_model_name_or_path ('org/model-a' vs 'org/model-b'); "
                                 "average checkpoints of one base model with the same LoRA targets (one run).")
    with pytest.raises(ConfigError) as caught:
        averaging.load_members([chosen[0], chosen[2]])
    assert str(caught.value) == ("setting 'average' = [checkpoint-10, checkpoint-30]: checkpoint-10 and "
                                 "checkpoint-30 differ in target_modules (['q_proj'] vs ['q_proj', 'v_proj']); "
                                 "average checkpoints of one base model with the same LoRA targets (one run).")


def test_the_written_average_is_complete_atomic_and_reused_only_for_the_same_members(tiny_dir, tmp_path):
    run = make_run(tiny_dir, tmp_path / "run", steps=(10, 20, 30), final=False)
    found = find_checkpoints(run, warn=print)
    members = averaging.load_members(found[1:])
    dest = run / "averages" / averaging.average_name(members)
    report = averaging.write_average(members, dest, git_commit="abc")
    assert dest.name == "average-20+30" and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp
    assert adapter_problem(dest, require_manifest=True) is None
    manifest = json.loads((dest / "manifest.json").read_text())
    assert (manifest["global_step"], manifest["git_commit"], manifest["average_of"]) == (
        30, "abc", ["checkpoint-20", "checkpoint-30"])
    assert [(m["name"], m["global_step"], m["adapter_sha256"]) for m in manifest["members"]] == [
        (m.name, m.global_step, json.loads((m.path / "manifest.json").read_text())["files"]
         ["adapter_model.safetensors"]["sha256"]) for m in members]
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "average.json"}
    assert averaging.written_average(dest, members) == report
    other = averaging.load_members([found[0], found[2]])
    assert averaging.written_average(dest, other) is None  # other members: written again
    assert find_checkpoints(run, warn=print) == found  # never taken for a training checkpoint


def test_overwrite_removes_the_averages(tmp_path):
    (tmp_path / "averages" / "average-20+30").mkdir(parents=True)
    (tmp_path / "mine.txt").write_text("kept")
    assert start_afresh(tmp_path) == ["averages"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
