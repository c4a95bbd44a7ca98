"""Everything a launch can check without weights, once, in the launcher's own process, before accelerate or
DeepSpeed starts anything: the settings (parsed exactly as training parses them), every record of the data files,
the run directory (one run per OUTPUT_DIR: resume only the same run), and the run plan.

    python -m longctx.preflight [launcher options] -- --config experiments/000_tiny_smoke/config.yaml [settings]

scripts/launch_train.sh runs it before every launch. A mistake prints exactly one line `error: ...` (bad records:
that line, then the first 20 records by file:line and reason, then the count) and exits 2; a plan that does not fit
exits 3. Nothing is written unless every check passed: then, with OVERWRITE=1, the earlier run in OUTPUT_DIR is
removed (the launcher's "start afresh"). With several machines, the settings are checked on every machine, the
data files and OUTPUT_DIR by machine 0 only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from . import checkpoints, status
from .chat import check_template
from .config import ConfigError, SettingsParser, by_type, parse_config, resolved_config, validate
from .planner.architecture import ArchitectureError
from .planner.runplan import PlannerArguments, make_run_plan
from .records import DataError, check_records
from .rundir import check_output_dir, run_identity, start_afresh
from .settings import DATACLASSES, DataArguments, ModelArguments, RunArguments


@dataclass
class LaunchFacts:
    """What the launcher knows that the settings do not say."""

    plan: str = field(default="check", metadata={"help": "check: plan, stop if it does not fit; only: print the "
                                                         "plan after the settings checks and exit (PLAN=1); off."})
    world_size: int = field(default=1, metadata={"help": "NUM_PROCESSES x NUM_MACHINES of this launch."})
    machine_rank: int = field(default=0, metadata={"help": "MACHINE_RANK: machine 0 checks data and OUTPUT_DIR."})
    overwrite: bool = field(default=False, metadata={"help": "OVERWRITE=1: start afresh in OUTPUT_DIR."})


def parse(argv: list[str]) -> tuple[LaunchFacts, PlannerArguments, tuple, str | None]:
    """Launcher options before `--`, the experiment's settings after it (parsed as training parses them)."""
    if "--" not in argv:
        raise ConfigError("preflight: launcher options, then `--`, then the settings (see scripts/launch_train.sh).")
    cut = argv.index("--")
    facts, options = SettingsParser((LaunchFacts, PlannerArguments)).parse_args_into_dataclasses(args=argv[:cut])
    # for the machine the settings are meant for, without touching this machine's GPUs (training checks them)
    parsed, config_path, _ = parse_config(argv[cut + 1:], DATACLASSES, check_this_machine=False)
    return facts, options, parsed, config_path


def check_data(parsed) -> tuple[str, dict[str, int]]:
    """Every record of both files (DataError listing every bad one); returns the summary line and the counts of
    usable records (the plan's schedule starts from them)."""
    data = by_type(parsed)[DataArguments]
    scans = {split: check_records(path, data) for split, path in
             (("train", data.train_file), ("validation", data.validation_file))}
    parts = []
    for split, scan in scans.items():
        skipped = f", {len(scan.problems)} unusable, skipped (on_bad_record: skip)" if scan.problems else ""
        parts.append(f"{split} {scan.count} records{skipped}")
    return "data: " + "; ".join(parts), {split: scan.count for split, scan in scans.items()}


def check_run_dir(parsed, facts: LaunchFacts) -> str:
    """OUTPUT_DIR: new, the same run resumed, or refused (ConfigError); returns the summary line. Writes nothing."""
    args = by_type(parsed)
    training = args[TrainingArguments]
    identity = run_identity(resolved_config(*parsed), facts.world_size,
                            check_template(args[ModelArguments], args[DataArguments]))
    run = args[RunArguments]
    run.overwrite = run.overwrite or facts.overwrite
    resume_from = check_output_dir(run, training.output_dir, identity, training.max_steps)
    out = Path(training.output_dir)
    if run.overwrite and out.is_dir() and any(out.iterdir()):
        return f"OUTPUT_DIR {out}: the earlier run will be removed (OVERWRITE=1)"
    if resume_from:
        return (f"OUTPUT_DIR {out}: resuming the same run from {Path(resume_from).name} (step "
                f"{checkpoints.global_step_of(Path(resume_from))})")
    return f"OUTPUT_DIR {out}: a new run"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        facts, options, parsed, config_path = parse(argv)
        plan_only = facts.plan == "only"  # a plan names missing data files itself; it sizes for the planned GPUs
        validate(*parsed, files_at_hand=not plan_only, world_size=None if plan_only else facts.world_size,
                 experiment_dir=options.experiment_dir)
        if facts.plan == "only":  # PLAN=1: the plan was asked for, not a launch; printed whatever its verdict
            plan = make_run_plan(parsed, config_path, options)
            print(plan.text, file=sys.stderr if plan.exit_status == status.BAD_INPUT else sys.stdout, flush=True)
            return status.BAD_INPUT if plan.exit_status == status.BAD_INPUT else status.OK
        lines = [f"preflight: settings ok ({config_path or 'command line'})"]
        counts = None
        if facts.machine_rank == 0:
            line, counts = check_data(parsed)
            lines += [line, check_run_dir(parsed, facts)]
    except (ConfigError, DataError, ArchitectureError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return status.BAD_INPUT
    print("\n".join(lines), flush=True)
    if facts.plan == "check":
        if options.device == "cpu":  # nothing for a plan to stop on a CPU: one line
            print("plan: CPU run, no GPU memory limit to check (PLAN=1 prints the plan)", flush=True)
        else:
            plan = make_run_plan(parsed, config_path, options, record_counts=counts)
            print(plan.text, file=sys.stderr if plan.exit_status == status.BAD_INPUT else sys.stdout, flush=True)
            if plan.exit_status:
                return plan.exit_status
    if facts.machine_rank == 0 and facts.overwrite:
        out = Path(by_type(parsed)[TrainingArguments].output_dir)
        removed = start_afresh(out) if out.is_dir() else []
        if removed:
            print(f"overwrite: removed {len(removed)} entries of the earlier run from {out}", flush=True)
    return status.OK


if __name__ == "__main__":
    sys.exit(main())

