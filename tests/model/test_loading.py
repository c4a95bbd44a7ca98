"""longctx.model.loading: YaRN RoPE scaling applied at load (the rope_yarn_factor setting); a tokenizer that cannot be
loaded is a setting error."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from longctx.data.tokenizer import load_tokenizer
from longctx.errors import ConfigError
from longctx.model.architecture import Architecture, with_rope_yarn
from longctx.model.loading import _say_once, load_base_model, resolve_attn_implementation
from longctx.settings import ModelArguments
from longctx.utils.flash_attention import flash_attention_2_problem


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


# --- attention backend: flash_attention_2 only when flash_attn really imports -------------------------------------
# flash-attn cannot be installed on this CUDA-less machine, so each case puts a stand-in `flash_attn` package on the
# path (what a broken build, a flash-attn-4 install, or a working FA2 looks like to Python) and pretends CUDA is there.

STAND_INS = {
    "broken build": "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev')\n",
    "flash-attn-4": "__version__ = '4.0.0b4'\n",
    "FA2 without its kernels": "__version__ = '2.8.3'\n",
}


@pytest.fixture()
def stand_in(tmp_path, monkeypatch):
    def install(source: str) -> None:
        (tmp_path / "flash_attn").mkdir()
        (tmp_path / "flash_attn" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        flash_attention_2_problem.cache_clear()
        _say_once.cache_clear()

    yield install
    sys.modules.pop("flash_attn", None)
    flash_attention_2_problem.cache_clear()
    _say_once.cache_clear()


@pytest.mark.parametrize("kind", list(STAND_INS))
def test_auto_falls_back_to_sdpa_saying_why_when_flash_attn_cannot_be_used(stand_in, kind, capsys):
    stand_in(STAND_INS[kind])
    reason = {"broken build": "flash_attn is installed but does not import (ImportError: flash_attn_2_cuda.so: "
                              "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev)",
              "flash-attn-4": "flash_attn 4.0.0b4 is not FlashAttention 2 (flash-attn-4 installs a flash_attn package "
                              "too); install flash-attn 2 for flash_attention_2",
              "FA2 without its kernels": "flash_attn 2.8.3 imports but lacks its kernels (ImportError: cannot import "
                                         "name 'flash_attn_func' from 'flash_attn'"}[kind]
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("auto") == "sdpa"
    err = capsys.readouterr().err
    assert err.startswith(f"attention: flash_attention_2 not used ({reason}") and err.count("attention:") == 1
    with pytest.raises(ConfigError) as info:  # asked for by name: refused before any weights, naming why
        resolve_attn_implementation("flash_attention_2")
    assert str(info.value).startswith(f"setting 'attn_implementation' = 'flash_attention_2': {reason}")


def test_a_working_flash_attention_2_is_chosen_when_transformers_accepts_it(stand_in, monkeypatch):
    stand_in("__version__ = '2.8.3'\ndef flash_attn_func(*a, **k): pass\ndef flash_attn_varlen_func(*a, **k): pass\n")
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)
    assert resolve_attn_implementation("auto") == "flash_attention_2"


def test_without_flash_attn_auto_is_sdpa_silently(capsys):
    flash_attention_2_problem.cache_clear()
    assert resolve_attn_implementation("auto") == "sdpa"  # this machine: no CUDA, no flash-attn
    assert capsys.readouterr().err == ""
