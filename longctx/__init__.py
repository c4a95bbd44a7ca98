"""longctx: long-context LoRA fine-tuning (HF Trainer, PEFT, DeepSpeed) driven by shell launchers.

The map, top (entry points) to bottom (leaves). The import rule: a module imports only from its own folder and from
the layers below; folders on one line do not import each other. pyproject.toml writes it as an import-linter
contract and the tests run it (tests/test_architecture.py), with no exception.

    train.py | preflight.py | tiny.py   entry points: training as a recipe; every check before launch; the tiny default
    summarize.py | export.py            use what was trained: summarize new documents; a merged (or averaged) model
    eval/                               score checkpoints: prompts, generation, ROUGE, results, report, W&B
    planner/ | training/                the run plan before launch | the Trainer, callbacks, preemption, watchdog
    data/ | model/                      records -> chat template -> ids + labels | loading, LoRA, loss, memory switches
    run/                                OUTPUT_DIR: its names (layout.py), identity, checkpoints, the W&B run
    config.py                           config.yaml + flags -> Settings, validation
    settings.py                         every setting, as dataclasses with their help
    errors.py | exit_status.py | labels.py | utils/   leaves: error classes, exit statuses, IGNORE_INDEX, helpers

Nothing is imported here: `import longctx` stays cheap, and each entry point loads what it uses.
"""
