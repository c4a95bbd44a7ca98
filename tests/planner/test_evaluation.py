"""longctx.planner.evaluation: the per-GPU memory and time of scoring a checkpoint at 262,144 tokens, the refusal of a
generation past max_position_embeddings, and the --follow warning, against hand computations.

Qwen3-4B: 36 layers, 8 KV heads of width 128, hidden 2,560, 32 query heads (q width 4,096), MLP 9,728,
4,022,468,096 parameters, max_position_embeddings 262,144.
"""

from __future__ import annotations

import pytest

from longctx.config import parse_config
from longctx.errors import ConfigError
from longctx.eval.job import all_setting_names
from longctx.model.architecture import load_architecture
from longctx.planner.evaluation import check_context_length, evaluation_memory, evaluation_seconds, shared_gpus_warning
from longctx.planner.flops import DECODE_BYTES_PER_SECOND, decode_seconds, forward_flops, kv_bytes_per_token
from longctx.planner.runplan import make_evaluation_plan
from longctx.settings import GenerationArguments, LoraArguments, ModelArguments
from support.paths import EXP_009

ARCH = load_architecture("Qwen/Qwen3-4B-Instruct-2507", EXP_009)
GIB = 2**30


def test_kv_cache_of_one_262k_prompt_is_36_gib():
    # 36 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes = 147,456 bytes per token; x 262,144 = 38,654,705,664 = 36 GiB
    assert kv_bytes_per_token(ARCH) == 147_456
    assert kv_bytes_per_token(ARCH) * 262_144 == 38_654_705_664 == 36 * GIB


def test_evaluation_memory_of_the_longest_009_prompt():
    # a prompt of 261,632 tokens + 512 new = 262,144 tokens of cache (36 GiB, above)
    memory = evaluation_memory(ARCH, 261_632, 512, batch=1, weight_bytes=2, lora_params=33_030_144)
    parts = {p.name: p.bytes for p in memory.parts}
    # weights 4,022,468,096 x 2 + the adapter 33,030,144 x 2 = 8,044,936,192 + 66,060,288
    assert parts["weights"] == 8_110_996_480
    assert parts["KV cache"] == 36 * GIB
    # one layer's K and V while DynamicCache concatenates: 2 x 8 x 128 x 2 = 4,096 bytes x 262,144 = 1 GiB
    assert parts["KV cache growth"] == GIB
    # per prompt token: residual + normed input 2 x 2,560 x 2 = 10,240; the MLP inside up_proj's LoRA path (act,
    # up_proj's base output, its LoRA update, their sum, all bf16) 4 x 9,728 x 2 = 77,824 beat the attention's q, k,
    # v, output (2 x 4,096 + 2 x 1,024) x 2 = 20,480 + q / k norms in fp32 (4,096 + 1,024) x 4 = 20,480;
    # 88,064 x 261,632 = 23,040,360,448
    assert parts["prefill working set"] == 23_040_360_448
    assert parts["framework"] == GIB
    # 8,110,996,480 + 38,654,705,664 + 1,073,741,824 + 23,040,360,448 + 1,073,741,824 = 71,953,546,240 (67.01 GiB)
    assert memory.peak_bytes == 71_953_546_240


def test_an_adapter_upcast_to_fp32_would_add_12_gib_to_the_262k_prefill():
    """What evaluation avoids by loading adapters in the base's dtype (peft's default upcasts them to fp32)."""
    bf16 = evaluation_memory(ARCH, 261_632, 512, lora_params=33_030_144)
    fp32 = evaluation_memory(ARCH, 261_632, 512, lora_params=33_030_144, adapter_bytes=4)
    # per token in up_proj: act 2 x 9,728 + base output 2 x 9,728 + fp32 update 4 x 9,728 + fp32 sum 4 x 9,728 +
    # fp32 copy of the input 4 x 2,560 = 126,976 bytes, against 4 x 9,728 x 2 = 77,824 in bf16: 49,152 more
    # x 261,632 tokens = 12,859,736,064 bytes = 11.98 GiB
    assert fp32.peak_bytes - bf16.peak_bytes == 12_859_736_064
    assert f"{(fp32.peak_bytes - bf16.peak_bytes) / GIB:.2f}" == "11.98"


def test_a_padded_batch_without_flash_attention_adds_its_mask():
    # 2 prompts of 10,000 tokens under SDPA: a 2 x 10,000 x 10,000 boolean mask = 200,000,000 bytes
    with_flash = evaluation_memory(ARCH, 10_000, 100, batch=2, flash_attention=True)
    without = evaluation_memory(ARCH, 10_000, 100, batch=2, flash_attention=False)
    assert without.peak_bytes - with_flash.peak_bytes == 200_000_000


def test_decode_is_bound_by_reading_weights_and_cache():
    # 2 new tokens after 100, one row: the steps see 100 and 101 tokens of cache (201 in all);
    # read 2 x 8,044,936,192 (bf16 weights) + 147,456 x 201 = 16,119,511,040 bytes at 0.7 x 3.35 TB/s = 6.874 ms;
    # FLOPs 2 x (2 x 3,633,315,840 + 2 x 151,936 x 2,560) + 4 x 147,456 x 201 = 16,207,642,624: 47 us at 346 TFLOP/s
    seconds = decode_seconds(ARCH, 100, 2, 1, 8_044_936_192, 346.15e12)
    assert DECODE_BYTES_PER_SECOND == pytest.approx(2.345e12)
    assert seconds == pytest.approx(16_119_511_040 / 2.345e12)


def test_time_per_checkpoint_spreads_batches_over_the_gpus():
    # 3 prompts of 1,000, 3,000 and 2,000 tokens, no new tokens, batch 2 sorted longest first: (3,000, 2,000) padded
    # to 3,000, then (1,000); 2 batches over 2 GPUs: the slower GPU's share is half the total, rounded up per batch
    rate = 346.15e12
    total = (2 * forward_flops(ARCH, 3000, 1) + forward_flops(ARCH, 1000, 1)) / rate
    assert evaluation_seconds(ARCH, [1000, 3000, 2000], 0, 2, 2, rate) == pytest.approx(total / 2)
    # one GPU takes it all
    assert evaluation_seconds(ARCH, [1000, 3000, 2000], 0, 2, 1, rate) == pytest.approx(total)


def test_a_generation_past_max_position_embeddings_is_refused():
    check_context_length(ARCH, 261_632, 512)  # exactly 262,144: allowed
    with pytest.raises(ConfigError) as info:
        check_context_length(ARCH, 262_000, 512, " in data/validation.jsonl")
    assert str(info.value) == (
        "setting 'max_new_tokens' = 512: the longest validation prompt in data/validation.jsonl has 262,000 tokens, "
        "and 262,000 + 512 = 262,512 exceeds the model's max_position_embeddings (262,144); lower max_new_tokens to "
        "144 or less, or leave the longest prompts out (max_seq_length with length_policy: drop, or "
        "truncate_document).")


def test_follow_warns_when_it_would_share_the_training_gpus():
    assert shared_gpus_warning(["0", "1", "2", "3"], ["2", "3", "4", "5"], same_machine=True, eval_peak_bytes=67 *
                               GIB) == (
        "warning: --follow would score on GPU(s) 2, 3, which the training run is using (scoring needs about 67.00 GiB "
        "per GPU): both would slow down and either may run out of memory; give the evaluation other GPUs "
        "(CUDA_VISIBLE_DEVICES) or score after training.")
    assert shared_gpus_warning(["0", "1"], ["2", "3"], same_machine=True) is None
    assert shared_gpus_warning(["0", "1"], ["0", "1"], same_machine=False) is None  # another machine's GPUs 0, 1


def eval_settings():
    """009's settings as the evaluation command parses them (its own dataclasses, training's keys tolerated)."""
    parsed, _, _ = parse_config(["--config", str(EXP_009 / "config.yaml")],
                                (ModelArguments, LoraArguments, GenerationArguments), tolerated_keys=all_setting_names())
    return parsed


def test_the_evaluation_command_plan_from_its_prompts():
    exp = EXP_009
    # the longest of 4 prompts, 261,632 tokens, + 512 new tokens: the peak of test_evaluation_memory_... (67.01 GiB)
    plan = make_evaluation_plan(*eval_settings(), [261_632, 100_000, 150_000, 200_000], 4, exp, 80.0, 3)
    assert plan.exit_status == 0
    lines = plan.text.splitlines()
    assert lines[0] == ("Evaluation plan per GPU (eval_checkpoint.py / eval_all_checkpoints.sh): the longest prompt "
                        "261,632 tokens (longest prompt) + max_new_tokens 512, generation_batch_size 1")
    assert "    peak                    67.01 GiB: fits in 80 GiB (12.99 GiB to spare)" in lines
    assert lines[-1].startswith("  time: 4 prompts over 4 GPU(s): ") and lines[-1].endswith(" for 3 (the checkpoints + "
                                                                                            "final_adapter)")
    # a 40 GiB GPU cannot hold it: exit 3
    assert make_evaluation_plan(*eval_settings(), [261_632], 4, exp, 40.0).exit_status == 3
    # one prompt too long for the model's positions: exit 2, one line, before any weights
    refused = make_evaluation_plan(*eval_settings(), [262_000, 1_000], 4, exp, 80.0, where=" in validation.jsonl")
    assert refused.exit_status == 2
    assert refused.text == (
        "error: setting 'max_new_tokens' = 512: the longest validation prompt in validation.jsonl has 262,000 tokens, "
        "and 262,000 + 512 = 262,512 exceeds the model's max_position_embeddings (262,144); lower max_new_tokens to "
        "144 or less, or leave the longest prompts out (max_seq_length with length_policy: drop, or "
        "truncate_document).")
