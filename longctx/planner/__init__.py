"""The per-GPU memory plan of a training run, made before anything is loaded or launched.

    python -m longctx.planner --config experiments/009_text_summary/config.yaml [--setting value ...]

The plan is the estimated peak memory of one training step on one GPU, broken down into its parts (weights,
LoRA + optimizer, framework, checkpointed layer inputs, and the transient phases of the backward), whether that
fits the GPU, and, when it does not, which switch or value would make it fit. The launcher runs it before every
launch (PLAN=check) and stops when it does not fit.

  architecture.py  the model's shape (config.json, the offline hub cache, or the experiment's
                   model_architecture.json); nothing is downloaded and no weights are read
  estimate.py      StepShape (what one step looks like on one GPU) -> estimate() -> MemoryEstimate (its parts);
                   how each part is computed
  advice.py        fits / the longest fitting length / the switches that would make it fit, and the printed text
  cli.py           the command line, on longctx.config.parse_config with training's own dataclasses
"""
