"""Attention at long context on a GPU: the backend the project resolves (flash_attention_2 when flash-attn imports,
else SDPA) never materialises a seq x seq matrix, in the forward or the backward. Needs CUDA; skipped otherwise."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from longctx.model.loading import resolve_attn_implementation

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the attention kernels under test run only on CUDA")]

HEADS = 4


def peak_step_bytes(attn_implementation: str, seq_len: int) -> int:
    """Peak CUDA memory above the model's own of one forward + backward of a 1-layer bf16 Qwen3 at seq_len."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=2, head_dim=64, use_cache=False,
                         max_position_embeddings=seq_len, attn_implementation=attn_implementation)
    model = Qwen3ForCausalLM(config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 1000, (1, seq_len), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=16).logits
    logits.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model, logits
    torch.cuda.empty_cache()
    return peak


def test_resolved_attention_materialises_no_seq_by_seq_matrix_at_32k():
    seq_len = 32768
    attn = resolve_attn_implementation("auto")
    assert attn in ("flash_attention_2", "sdpa")
    one_head_scores = seq_len * seq_len * 2  # one head's bf16 score matrix: 2 GiB
    peak = peak_step_bytes(attn, seq_len)
    assert peak < one_head_scores / 8, (
        f"{attn} at {seq_len} tokens peaked at {peak / 2**30:.2f} GiB; one head's seq x seq matrix is "
        f"{one_head_scores / 2**30:.0f} GiB")


def test_the_check_would_see_a_seq_by_seq_matrix():
    """Eager attention materialises heads x seq x seq scores (fp32 softmax + bf16): the same measurement sees it."""
    seq_len = 4096
    assert peak_step_bytes("eager", seq_len) > HEADS * seq_len * seq_len * 2
