"""The run plan of a training run, made before anything is loaded or launched.

    python -m longctx.planner --config experiments/009_text_summary/config.yaml [--setting value ...]

The plan says what one GPU holds at the peak of a step, broken down into its parts, whether that fits and which
switch or value would make it fit; the pinned host memory activation offload really takes, against the machine's;
how many samples, optimizer steps, checkpoints and evaluations the run has and how long they take; and what scoring
a checkpoint needs. The launcher prints it before every launch (PLAN=check) and stops when it does not fit.

  architecture.py  the model's shape (config.json, the offline hub cache, or the experiment's
                   model_architecture.json); nothing is downloaded and no weights are read
  estimate.py      StepShape (what one step looks like on one GPU) -> estimate() -> MemoryEstimate (its parts)
  advice.py        fits / the longest fitting length / the switches that would make it fit, and the memory text
  host.py          pinned host memory of offload: torch's rounding and caching as configured, against the machine
  corpus.py        records and token lengths of each split: the length cache training writes, the file, or settings
  flops.py         FLOPs of a training step, an evaluation forward, a prefill, a decode step; the MFU assumption
  schedule.py      the Trainer's steps, checkpoints, evaluations and their time; the schedule's warnings
  evaluation.py    memory and time of scoring a checkpoint; the context-length refusal; the --follow GPU warning
  runplan.py       make_run_plan(): all of the above as one text and an exit status (the launcher's entry point)
  cli.py           the command line, on longctx.config.parse_config with training's own dataclasses
"""
