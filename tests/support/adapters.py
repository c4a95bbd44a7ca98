"""LoRA adapters and runs made in-process on the tiny model, for averaging, export and the evaluation's average rows
without training: each adapter is peft's own (get_peft_model + save_pretrained) with seeded random A and B (peft
starts B at zero, which would make every update zero), saved as a checkpoint with its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from longctx.run.checkpoints import write_manifest

from .paths import CONFIG_000

TARGETS = ("q_proj", "v_proj", "down_proj")


def base_model(tiny_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32).eval()


def make_adapter(tiny_dir: Path, path: Path, seed: int, step: int, r: int = 4, lora_alpha: float = 8,
                 targets: tuple[str, ...] = TARGETS, **config) -> Path:
    """A complete checkpoint at `path`: peft's adapter files with seeded A and B (entries N(0, 0.1^2): updates as
    large as the tiny model's own weights), and manifest.json for `step`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(tiny_dir), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(targets),
                                                            lora_dropout=0.0, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    write_manifest(path, step, None)
    return path


def make_run(tiny_dir: Path, run_dir: Path, steps: tuple[int, ...] = (10, 20, 30), final: bool = True) -> Path:
    """A run directory as training leaves it, without training: run_config.yaml (000's config.yaml, which the
    evaluation and export read as the run's settings), checkpoint-N for each step (seeds 1, 2, ...) and
    final_adapter (a copy of the last checkpoint, as training's final save holds the same weights)."""
    run_dir.mkdir(parents=True)
    config = CONFIG_000.read_text().replace("output_dir: runs/000_tiny_smoke", f"output_dir: {run_dir}")
    (run_dir / "run_config.yaml").write_text(config)
    for seed, step in enumerate(steps, start=1):
        make_adapter(tiny_dir, run_dir / f"checkpoint-{step}", seed, step)
    if final:
        shutil.copytree(run_dir / f"checkpoint-{steps[-1]}", run_dir / "final_adapter")
        (run_dir / "final_adapter" / "final_state.json").write_text(json.dumps({"global_step": steps[-1]}))
        write_manifest(run_dir / "final_adapter", steps[-1], None)
    return run_dir


def merged_weights(tiny_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The tiny model's state dict with `adapter` merged by peft (merge_and_unload)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(tiny_dir), str(adapter)).merge_and_unload().state_dict()
