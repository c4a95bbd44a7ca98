"""Everything a launch can check without weights, once, in the launcher's own process, before accelerate or
DeepSpeed starts anything: the settings (parsed exactly as training parses them), every record of the data files,
the run directory (one run per OUTPUT_DIR: resume only the same run), and the run plan.

    python -m longctx.preflight [launch and machine options] -- --config experiments/000_tiny_smoke/config.yaml [settings]

scripts/launch_train.sh runs it before every launch. A mistake prints exactly one line `error: ...` (bad records:
that line, then the first 20 records by file:line and reason, then the count) and exits 2; a plan that does not fit
exits 3 (longctx.exit_status). Nothing is written unless every check passed: then, with the `overwrite` setting
(OVERWRITE=1), the earlier run in OUTPUT_DIR is removed (longctx.run.directory.start_afresh, the same function
training calls). With several machines, the settings are checked on every machine, the data files and OUTPUT_DIR by
machine 0 only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_status
from .config import SettingsParser, parse_settings, resolved_config, validate
from .data.chat import check_template
from .data.records import check_records
from .errors import ConfigError, DataError
from .model.architecture import readable_architecture
from .planner.runplan import MachineArguments, experiment_dir_of, make_run_plan
from .run import checkpoints
from .run.directory import check_output_dir, run_identity, start_afresh
from .settings import Settings


@dataclass
class LaunchArguments:
    """What the launcher knows of this launch that neither the settings nor the machine say."""

    plan: str = field(default="check", metadata={"help": "check: plan, stop if it does not fit; only: print the "
                                                         "plan after the settings checks and exit (PLAN=1); off."})
    world_size: int = field(default=1, metadata={"help": "NUM_PROCESSES x NUM_MACHINES of this launch."})
    machine_rank: int = field(default=0, metadata={"help": "MACHINE_RANK: machine 0 checks data and OUTPUT_DIR."})
    dry_run: bool = field(default=False, metadata={"help": "DRY_RUN=1: check only; nothing is removed or written."})


def parse(argv: list[str]) -> tuple[LaunchArguments, MachineArguments, Settings]:
    """Launch and machine options before `--`, the experiment's settings after it (parsed as training parses them,
    for the machine they are meant for, without touching this machine's GPUs: training checks them)."""
    if "--" not in argv:
        raise ConfigError("preflight: launcher options, then `--`, then the settings (see scripts/launch_train.sh).")
    cut = argv.index("--")
    launch, machine = SettingsParser((LaunchArguments, MachineArguments)).parse_args_into_dataclasses(args=argv[:cut])
    settings, _ = parse_settings(argv[cut + 1:], check_this_machine=False)
    return launch, machine, settings


def check_data(settings: Settings) -> tuple[str, dict[str, int]]:
    """Every record of both files (DataError listing every bad one); returns the summary line and the counts of
    usable records (the plan's schedule starts from them)."""
    data = settings.data
    scans = {split: check_records(path, data) for split, path in
             (("train", data.train_file), ("validation", data.validation_file))}
    parts = []
    for split, scan in scans.items():
        skipped = f", {len(scan.problems)} unusable, skipped (on_bad_record: skip)" if scan.problems else ""
        parts.append(f"{split} {scan.count} records{skipped}")
    return "data: " + "; ".join(parts), {split: scan.count for split, scan in scans.items()}


def check_run_dir(settings: Settings, launch: LaunchArguments) -> str:
    """OUTPUT_DIR: new, the same run resumed, or refused (ConfigError); returns the summary line. Writes nothing."""
    training, run = settings.training, settings.run
    identity = run_identity(resolved_config(*settings.groups()), launch.world_size,
                            check_template(settings.model, settings.data))
    resume_from = check_output_dir(run, training.output_dir, identity, training.max_steps)
    out = Path(training.output_dir)
    if run.overwrite and out.is_dir() and any(out.iterdir()):
        return f"OUTPUT_DIR {out}: the earlier run will be removed (OVERWRITE=1)"
    if resume_from:
        return (f"OUTPUT_DIR {out}: resuming the same run from {Path(resume_from).name} (step "
                f"{checkpoints.global_step_of(Path(resume_from))})")
    return f"OUTPUT_DIR {out}: a new run"


def print_plan(settings: Settings, machine: MachineArguments, record_counts: dict[str, int] | None = None) -> int:
    """The run plan, printed (an error on stderr); returns its exit status."""
    plan = make_run_plan(settings, machine, record_counts=record_counts)
    print(plan.text, file=sys.stderr if plan.exit_status == exit_status.BAD_INPUT else sys.stdout, flush=True)
    return plan.exit_status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        launch, machine, settings = parse(argv)
        plan_only = launch.plan == "only"  # a plan names missing data files itself; it sizes for the planned GPUs
        validate(settings, files_at_hand=not plan_only, world_size=None if plan_only else launch.world_size,
                 architecture=readable_architecture(settings.model.model_name_or_path,
                                                    experiment_dir_of(settings, machine)))
        if plan_only:  # PLAN=1: the plan was asked for, not a launch; printed whatever its verdict
            status = print_plan(settings, machine)
            return exit_status.BAD_INPUT if status == exit_status.BAD_INPUT else exit_status.OK
        lines = [f"preflight: settings ok ({settings.config_path or 'command line'})"]
        counts = None
        if launch.machine_rank == 0:
            line, counts = check_data(settings)
            lines += [line, check_run_dir(settings, launch)]
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return exit_status.BAD_INPUT
    print("\n".join(lines), flush=True)
    if launch.plan == "check":
        if machine.device == "cpu":  # nothing for a plan to stop on a CPU: one line
            print("plan: CPU run, no GPU memory limit to check (PLAN=1 prints the plan)", flush=True)
        else:
            status = print_plan(settings, machine, counts)
            if status:
                return status
    if launch.machine_rank == 0 and settings.run.overwrite and not launch.dry_run:
        out = Path(settings.training.output_dir)
        removed = start_afresh(out) if out.is_dir() else []
        if removed:
            print(f"overwrite: removed {len(removed)} entries of the earlier run from {out}", flush=True)
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
