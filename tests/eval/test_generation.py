"""longctx.eval.generation: adapter swapping equals fresh loads; batches dealt round-robin over processes and merged
back in prompt order; two processes through the real launcher predict exactly what one does."""

from __future__ import annotations

import pytest
from accelerate import PartialState

from longctx.data.tokenizer import load_tokenizer
from longctx.eval import generation
from longctx.eval.job import all_setting_names
from longctx.model.loading import load_base_model
from support.evaluation import SCORE_FLAGS, SCORED, copy_run, rows_of, scored_predictions
from support.launching import run
from support.paths import EVAL_000 as EVAL
from support.paths import REPO_ROOT


@pytest.mark.e2e
def test_swapped_adapters_predict_exactly_what_fresh_loads_predict(trained_run, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from longctx.config import parse_config
    from longctx.run.checkpoints import find_checkpoints
    from longctx.settings import DataArguments, GenerationArguments, ModelArguments

    monkeypatch.chdir(REPO_ROOT)
    (model_args, data, gen), _, _ = parse_config(
        ["--config", str(trained_run / "run_config.yaml"), "--max_new_tokens", "24"],
        (ModelArguments, DataArguments, GenerationArguments), tolerated_keys=all_setting_names())
    ckpts = [c.path for c in find_checkpoints(trained_run, warn=print)]
    # Plus two random adapters that move the model far (distinct, non-empty predictions).
    base = load_base_model(model_args, training=False)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=128, init_lora_weights=False,
                                                target_modules="all-linear"))
        model.save_pretrained(tmp_path / f"random-{seed}")
        base = model.unload()
        ckpts.append(tmp_path / f"random-{seed}")

    tokenizer = load_tokenizer(model_args, padding_side="left")
    prompts, _ = generation.build_prompts(tokenizer, data)
    swapper = generation.AdapterSwapper(load_base_model(model_args, training=False).eval())
    swapped = [generation.generate(swapper.activate(path), tokenizer, prompts, gen) for path in ckpts]
    assert len(swapper.model.peft_config) == 1  # earlier adapters were deleted, not piled up

    fresh = []
    for path in ckpts:
        model = PeftModel.from_pretrained(load_base_model(model_args, training=False), str(path)).eval()
        fresh.append(generation.generate(model, tokenizer, prompts, gen))
    assert swapped == fresh
    assert len({tuple(p) for p in swapped}) >= 4  # the adapters really differ: swapping changed the outputs
    assert any(p.text for preds in swapped for p in preds)


class Rank:
    """What accelerate's PartialState tells process r of n, with PartialState's own split_between_processes."""

    def __init__(self, r: int, n: int):
        self.process_index, self.num_processes = r, n

    split_between_processes = PartialState.split_between_processes


def test_batches_are_dealt_round_robin_and_merge_back_in_order():
    prompts = [generation.Prompt(str(i), list(range(n)), "") for i, n in enumerate([5, 9, 2, 7, 7, 1, 3])]
    batches = generation.make_batches(prompts, 2)
    assert batches == [[1, 3], [4, 0], [6, 2], [5]]  # longest first (9, 7, 7, 5, 3, 2, 1), ties in input order

    shares = [generation.share_of_process(batches, Rank(r, 3)) for r in range(3)]
    assert shares == [[[1, 3], [5]], [[4, 0]], [[6, 2]]]  # batches 0 and 3 to rank 0, 1 to rank 1, 2 to rank 2
    assert generation.share_of_process(batches, None) == batches  # one process: all of them

    # Each rank's (index, text) pairs, gathered in rank order, come back in prompt order.
    pairs = [(i, f"text {i}") for share in shares for batch in share for i in batch]
    assert generation.merge_in_order(pairs, 7) == [f"text {i}" for i in range(7)]
    with pytest.raises(RuntimeError, match="1 prompts got no prediction"):
        generation.merge_in_order(pairs[1:], 7)


def test_reference_lengths_counts_those_over_max_new_tokens_and_the_95th_percentile():
    lengths = [12, 40, 7, 33, 51, 19, 64, 28, 45, 9, 30, 22, 38, 57, 15, 26, 49, 35, 60, 17]
    prompts = [generation.Prompt(str(i), [1], "", n) for i, n in enumerate(lengths)]
    # sorted: 7 9 12 15 17 19 22 26 28 30 33 35 38 40 45 49 51 57 60 64; over 48: 49 51 57 60 64 = 5.
    # 95th percentile, nearest rank: the ceil(0.95 * 20) = 19th smallest = 60 (19 of 20 are <= 60).
    assert generation.reference_lengths(prompts, 48) == (5, 60)
    assert generation.reference_lengths(prompts, 64) == (0, 60)
    # 3 references: ceil(2.85) = 3rd smallest, the longest
    assert generation.reference_lengths(prompts[:3], 10) == (2, 40)


def test_a_prediction_without_end_of_turn_hit_max_new_tokens(tiny_tokenizer):
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tiny_tokenizer("The court found for the plaintiff.", add_special_tokens=False)["input_ids"]
    stopped = generation.decode_prediction(tiny_tokenizer, [*words, end], [end])
    cut = generation.decode_prediction(tiny_tokenizer, words, [end])
    assert stopped == generation.Prediction("The court found for the plaintiff.",
                                            "The court found for the plaintiff.", False, False)
    assert cut == generation.Prediction("The court found for the plaintiff.",
                                        "The court found for the plaintiff.", False, True)


@pytest.mark.e2e
def test_two_processes_merge_to_the_single_process_predictions(scored_run, tmp_path):
    single, _ = scored_run  # one process, batches of 2: each of 2 processes gets one of the 2 batches
    out = copy_run(single, tmp_path / "run")
    proc = run(["bash", EVAL, *SCORE_FLAGS], timeout=600, OUTPUT_DIR=str(out), NUM_PROCESSES="2",
               MASTER_PORT="29623")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accelerate launch --quiet --multi_gpu --num_processes 2" in proc.stdout
    assert "with 2 process(es)" in proc.stdout
    assert proc.stdout.count("* best by rougeLsum") == 1  # rank 0 alone prints and writes
    rows1, rows2 = rows_of(single), rows_of(out)
    assert [r["checkpoint"] for r in rows2] == SCORED and [r["num_processes"] for r in rows2] == [2] * 5
    for r1, r2 in zip(rows1, rows2):
        assert r1["eval_fingerprint"] == r2["eval_fingerprint"]  # the process count is not a setting
        assert scored_predictions(out, r2["checkpoint"]) == scored_predictions(single, r1["checkpoint"])
        assert {k: r1[k] for k in r1 if k.startswith("rouge")} == {k: r2[k] for k in r2 if k.startswith("rouge")}
        for count in ("num_empty", "num_think_stripped", "num_hit_max_new_tokens",
                      "num_references_over_max_new_tokens"):
            assert r1[count] == r2[count]


def test_adapters_are_loaded_in_the_base_models_dtype(tiny_dir, tmp_path):
    """A bf16 base (as on a GPU) with adapters saved in fp32 (as CPU training saves them): every LoRA weight the
    swapper loads, first and swapped, is bf16, so the LoRA path computes in bf16. peft's default, loaded the same
    way, upcasts them to fp32 (the extra 12 GiB of a 262,144-token prefill: tests/planner/test_evaluation.py)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed in (1, 2):
        torch.manual_seed(seed)
        fp32 = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
        get_peft_model(fp32, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear")).save_pretrained(
            tmp_path / f"adapter-{seed}")

    def lora_dtypes(model) -> set:
        return {p.dtype for name, p in model.named_parameters() if "lora_" in name}

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.bfloat16)
    swapper = generation.AdapterSwapper(base)
    assert lora_dtypes(swapper.activate(tmp_path / "adapter-1")) == {torch.bfloat16}
    swapped = swapper.activate(tmp_path / "adapter-2")
    assert lora_dtypes(swapped) == {torch.bfloat16} and swapped.active_adapter == "adapter_1"
    default = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.bfloat16),
                                        tmp_path / "adapter-1")
    assert lora_dtypes(default) == {torch.float32}


def test_the_plain_base_model_is_scored_before_any_adapter_and_refused_after(tiny_dir, tmp_path):
    """peft's first adapter wraps the base model's layers in place: the plain base exists only before it, so the base
    model is scored first, and the swapper refuses it afterwards rather than generating with an adapter active."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    get_peft_model(fresh, LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear")).save_pretrained(
        tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    swapper = generation.AdapterSwapper(base)
    assert swapper.plain() is base and not any("lora_" in name for name, _ in base.named_parameters())
    swapper.activate(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="the base model must be scored before any adapter is loaded"):
        swapper.plain()
