"""longctx.model.loading: YaRN RoPE scaling applied at load (the rope_yarn_factor setting); a tokenizer that cannot be
loaded is a setting error."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.data.tokenizer import load_tokenizer
from longctx.errors import ConfigError
from longctx.model.architecture import Architecture, with_rope_yarn
from longctx.model.loading import load_base_model
from longctx.settings import ModelArguments


def test_rope_yarn_factor_stretches_the_rotary_embedding_at_load(tiny_dir):
    """The tiny model: head_dim 32, rope_theta 10,000, 8,192 positions. YaRN with factor 4 (transformers' yarn):
    - positions up to 4 x 8,192 = 32,768 (max_position_embeddings), the native 8,192 as original_max_position_...;
    - cos / sin scaled by 0.1 ln 4 + 1 = 1.1386294361...;
    - the 16 frequencies theta^(-2i/32): those that turn more than beta_fast = 32 times within 8,192 positions stay
      (i below 32 ln(8,192 / (32 x 2 pi)) / (2 ln 10,000) = 6.44, floored: 6), those that turn less than beta_slow =
      1 time are divided by 4 (i above 32 ln(8,192 / (2 pi)) / (2 ln 10,000) = 12.46, ceiled: 13), a linear ramp
      between."""
    path = str(tiny_dir / "model")
    plain = load_base_model(ModelArguments(model_name_or_path=path, torch_dtype="float32"))
    yarn = load_base_model(ModelArguments(model_name_or_path=path, torch_dtype="float32", rope_yarn_factor=4.0))
    assert yarn.config.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 8192}
    assert yarn.config.max_position_embeddings == 32_768 and plain.config.max_position_embeddings == 8192
    rope, base = yarn.model.rotary_emb, plain.model.rotary_emb
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(4) + 1) and base.attention_scaling == 1.0
    expected = 10_000 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(base.inv_freq.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope.inv_freq[:6].double(), expected[:6], rtol=1e-6, atol=0)
    torch.testing.assert_close(rope.inv_freq[14:].double(), expected[14:] / 4, rtol=1e-6, atol=0)
    assert all(expected[i] / 4 < rope.inv_freq[i] < expected[i] for i in range(7, 13))


def test_the_planner_sees_the_stretched_context():
    arch = Architecture(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, intermediate_size=9728, vocab_size=151936, max_position_embeddings=262_144)
    assert with_rope_yarn(arch, 4.0).max_position_embeddings == 1_048_576
    assert with_rope_yarn(arch, None) is arch


def test_a_tokenizer_that_cannot_be_loaded_names_the_setting_and_the_fix(monkeypatch):
    """A hub id on a machine that is offline (tests: HF_HUB_OFFLINE=1) and has no copy: one line, from
    transformers' own first sentence, with the two ways out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(ModelArguments(model_name_or_path="no-such-org/no-such-model"))
    message = str(caught.value)
    assert message.startswith("setting 'model_name_or_path' = 'no-such-org/no-such-model': its tokenizer cannot be "
                              "loaded on this machine (")
    assert message.endswith("); download the model here (huggingface-cli download no-such-org/no-such-model), or "
                            "point model_name_or_path at a local directory.")
    assert "\n" not in message
