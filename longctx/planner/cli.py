"""The planner's command line: the experiment's settings, parsed as training parses them, -> the run plan.

    python -m longctx.planner --config experiments/009_text_summary/config.yaml [--gpu_memory_gib 80] [--setting value]
    PLAN=1 bash experiments/009_text_summary/launch_train.sh          # the launcher runs it before every launch

The config and flags go through longctx.config.parse_settings with training's own dataclasses (+ MachineArguments),
so every setting, flag and typo is treated exactly as training treats it; only the bf16-GPU check of this machine is
left out (the plan is for the machine the settings are meant for). The architecture comes from a local model
directory's config.json, the local hub cache, or the experiment's model_architecture.json: nothing is downloaded.
Prints the run plan (longctx.planner.runplan): what one GPU holds at the peak of a step, whether that fits and what
would make it fit; the pinned host memory of activation offload; samples, optimizer steps, checkpoints,
evaluations and their time; the evaluation of a checkpoint; warnings. On a machine without GPUs it plans for the
GPUs the experiment is sized for (plan_gpus), so a laptop prints what the cluster's launcher prints.
Exit status: 0 fits (or not applicable: CPU), 3 does not fit (GPU or host memory), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import sys

from .. import exit_status
from ..config import build_parser, parse_settings
from ..errors import ConfigError
from ..settings import DATACLASSES
from .runplan import MachineArguments, make_run_plan


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written above training's settings, each with its default."""


def print_help() -> None:
    parser = build_parser((*DATACLASSES, MachineArguments))
    parser.prog, parser.description, parser.formatter_class = "python -m longctx.planner", __doc__, _HelpFormatter
    parser.print_help()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return exit_status.OK
    try:
        settings, (machine,) = parse_settings(argv, extra_groups=(MachineArguments,), check_this_machine=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return exit_status.BAD_INPUT
    plan = make_run_plan(settings, machine)
    print(plan.text, file=sys.stderr if plan.exit_status == exit_status.BAD_INPUT else sys.stdout, flush=True)
    return plan.exit_status
