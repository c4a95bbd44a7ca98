"""Everything a launch can check without weights, once, in the launcher's own process, before accelerate or
DeepSpeed starts anything: the settings (parsed exactly as training parses them), every record of the data files,
the run directory (one run per OUTPUT_DIR: resume only the same run), and the run plan.

    python -m longctx.preflight [launch and machine options] -- --config experiments/000_tiny_smoke/config.yaml [settings]

scripts/launch_train.sh runs it before every launch. A mistake prints exactly one line `error: ...` (bad records:
that line, then the first 20 records by file:line and reason, then the count) and exits 2; a plan that does not fit
exits 3 (longctx.exit_status). A directory another live run holds is refused first (longctx.run.lock). Nothing
is written unless every check passed: then machine 0 takes OUTPUT_DIR's lease for the launch (LONGCTX_RUN_TOKEN), and
with the `overwrite` setting (OVERWRITE=1) the earlier run in OUTPUT_DIR is removed (longctx.run.directory
.start_afresh, the same function training calls), unless this launch is a relaunch of the same job
(overwrite_refused). With several machines, the settings are checked on every machine, the data files and
OUTPUT_DIR by machine 0 only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_status
from .config import SettingsParser, parse_settings, resolved_config, validate
from .data.chat import check_template
from .data.records import check_records
from .errors import ConfigError, DataError
from .model.architecture import readable_architecture
from .model.loading import check_lora_targets, linear_layer_names
from .planner.disk import check_cache_space, check_output_dir_space
from .planner.runplan import MachineArguments, disk_need, experiment_dir_of, make_run_plan
from .run import checkpoints, lock
from .run.directory import check_output_dir, overwrite_refused, run_identity, start_afresh
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


def check_run_dir(settings: Settings, launch: LaunchArguments) -> list[str]:
    """OUTPUT_DIR: held by a live run (ConfigError), new, the same run resumed, or refused (ConfigError); returns
    the summary lines. An OVERWRITE this launch must not carry out is switched off here (its line says why). Writes
    nothing."""
    training, run = settings.training, settings.run
    out = Path(training.output_dir)
    lock.refuse_if_live(out, os.environ.get(lock.TOKEN_ENV))
    lines = []
    refused = overwrite_refused(out) if run.overwrite and out.is_dir() else None
    if refused:
        run.overwrite = False
        lines.append(f"OVERWRITE=1 not applied: {refused}; to start afresh, choose another OUTPUT_DIR or delete it")
    identity = run_identity(resolved_config(*settings.groups()), launch.world_size,
                            check_template(settings.model, settings.data))
    resume_from = check_output_dir(run, training.output_dir, identity, training.max_steps)
    if run.overwrite and out.is_dir() and any(p.name != lock.RUN_LOCK for p in out.iterdir()):
        return [*lines, f"OUTPUT_DIR {out}: the earlier run will be removed (OVERWRITE=1)"]
    if resume_from:
        return [*lines, f"OUTPUT_DIR {out}: resuming the same run from {Path(resume_from).name} (step "
                        f"{checkpoints.global_step_of(Path(resume_from))})"]
    return [*lines, f"OUTPUT_DIR {out}: a new run"]


def check_disk(settings: Settings, machine: MachineArguments, counts: dict[str, int] | None) -> list[str]:
    """OUTPUT_DIR's filesystem can hold what the run writes (ConfigError when not), and the datasets cache's the
    tokenized corpus (a warning); the summary lines (longctx.planner.disk)."""
    out = Path(settings.training.output_dir)
    existing = 0 if settings.run.overwrite or not out.is_dir() else len(checkpoints.checkpoint_dirs(out))
    need, tokens = disk_need(settings, machine, counts, existing)
    error, line = check_output_dir_space(need, out)
    if error:
        raise ConfigError(error)
    cache = (settings.data.datasets_cache_dir or os.environ.get("HF_DATASETS_CACHE")
             or Path.home() / ".cache" / "huggingface" / "datasets")
    warning = check_cache_space(tokens, cache)
    return [line, *([warning] if warning else [])]


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
        experiment_dir = experiment_dir_of(settings, machine)
        validate(settings, files_at_hand=not plan_only, world_size=None if plan_only else launch.world_size,
                 architecture=readable_architecture(settings.model.model_name_or_path, experiment_dir))
        check_lora_targets(settings.lora, settings.model, linear_layer_names(settings.model, experiment_dir))
        if plan_only:  # PLAN=1: the plan was asked for, not a launch; printed whatever its verdict
            status = print_plan(settings, machine)
            return exit_status.BAD_INPUT if status == exit_status.BAD_INPUT else exit_status.OK
        lines = [f"preflight: settings ok ({settings.config_path or 'command line'})"]
        counts = None
        if launch.machine_rank == 0:
            line, counts = check_data(settings)
            lines += [line, *check_run_dir(settings, launch), *check_disk(settings, machine, counts)]
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
    out = Path(settings.training.output_dir)
    token = os.environ.get(lock.TOKEN_ENV)
    if launch.machine_rank == 0 and token and not launch.dry_run:
        try:  # the lease before anything is removed: two launches at once, one wins here
            lock.acquire(out, token, pid=int(os.environ.get("LONGCTX_LAUNCHER_PID", os.getpid())))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return exit_status.BAD_INPUT
    if launch.machine_rank == 0 and settings.run.overwrite and not launch.dry_run:
        removed = start_afresh(out) if out.is_dir() else []
        if removed:
            print(f"overwrite: removed {len(removed)} entries of the earlier run from {out}", flush=True)
    return exit_status.OK


if __name__ == "__main__":
    sys.exit(main())
