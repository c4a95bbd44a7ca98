"""Score every checkpoint of a run with ROUGE: base model loaded once, resumable, data parallel, with a report.

    bash experiments/009_text_summary/eval_all_checkpoints.sh                  # every complete checkpoint of OUTPUT_DIR
    bash experiments/009_text_summary/eval_all_checkpoints.sh --follow         # ... and each new one, as saved
    NUM_PROCESSES=4 bash experiments/009_text_summary/eval_all_checkpoints.sh  # 4 GPUs share the validation set
    python experiments/009_text_summary/eval_checkpoint.py --config runs/009_text_summary/run_config.yaml \\
        --checkpoint runs/009_text_summary/checkpoint-200                      # one checkpoint

One invocation loads the tokenizer, the validation prompts and the base model once; each checkpoint's LoRA adapter is
then loaded, made active, used and deleted (peft load_adapter / set_adapter / delete_adapter). Each validation
record's prompt alone (chat template + generation prompt) is generated from greedily: prompts sorted by length
(longest first, so an out-of-memory shows at once) into batches of generation_batch_size, left padded, up to
max_new_tokens, stopping at EOS. With several processes (accelerate launch), the batches are dealt out round-robin,
each process generates its own and rank 0 merges them: the same batches as one process, so the same predictions.

Resumable and idempotent: a checkpoint that OUTPUT_DIR/eval_results.jsonl already holds with the same
eval_fingerprint (content hash of the validation file + prompt, model and generation settings) is skipped; --force
scores it again and replaces its row. A row is written by rewriting the file beside and renaming it over the old one,
so a run killed at any moment leaves whole rows only, and rerunning scores the rest. Rows carry ROUGE F-measures as
fractions with 95% bootstrap intervals (<metric>_low / <metric>_high), the count of empty predictions and the
generation settings. Predictions go to CHECKPOINT/eval_predictions.jsonl. Afterwards longctx.report writes
eval_summary.md, rouge_by_step.png, loss_curve.png and the best_checkpoint link into OUTPUT_DIR.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import checkpoints, report
from .collate import PadCollator
from .config import (DATACLASSES, ConfigError, DataArguments, GenerationArguments, LoraArguments, ModelArguments,
                     parse_config, validate_data)
from .data import DataError, check_records, encode_prompt, fit_document, load_records
from .distributed import print0, teardown
from .metrics import ROUGE_TYPES, rouge_per_example, rouge_with_intervals
from .modeling import load_base_model, load_tokenizer, resolve_attn_implementation, resolve_dtype

RESULTS_FILE = "eval_results.jsonl"
PREDICTIONS_FILE = "eval_predictions.jsonl"
WANDB_RUN_FILE = "wandb_run.json"  # written by training (longctx.train) with the W&B run's id and project
FINAL = "final_adapter"
NOTHING_TO_SCORE = 3  # --preflight exit status: every checkpoint is already scored (the report was refreshed)


@dataclass
class EvalArguments:
    run_dir: str | None = field(
        default=None, metadata={"help": "Training output directory to score (default: output_dir of the config)."}
    )
    checkpoint: str | None = field(default=None, metadata={"help": "One adapter directory to score."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "As in training: 'wandb' logs ROUGE per checkpoint to W&B, into the "
                                                "training run when RUN_DIR/wandb_run.json names it."}
    )
    run_name: str | None = field(default=None, metadata={"help": "As in training: names the W&B run group."})
    all_checkpoints: bool = field(
        default=False, metadata={"help": "Score every complete checkpoint-N of run_dir in step order, then "
                                         "final_adapter."}
    )
    force: bool = field(
        default=False, metadata={"help": "Score again checkpoints that eval_results.jsonl already holds with the same "
                                         "validation data and generation settings (their rows are replaced)."}
    )
    follow: bool = field(
        default=False, metadata={"help": "Keep polling run_dir and score each new checkpoint as training saves it; "
                                         "stop once final_adapter is scored."}
    )
    follow_poll_seconds: float = field(
        default=60.0, metadata={"help": "With --follow: seconds between looks at run_dir."}
    )
    follow_timeout_seconds: float | None = field(
        default=None, metadata={"help": "With --follow: give up (exit 1) after this many seconds without a new "
                                        "checkpoint, e.g. when training died. Unset: wait for final_adapter."}
    )
    preflight: bool = field(
        default=False, metadata={"help": "Check the settings and list what needs scoring, loading no model: exit 0 "
                                         "when there is work, 3 when every checkpoint is already scored (report "
                                         "refreshed), 2 on a bad setting. The launcher runs it before starting "
                                         "several processes."}
    )


@dataclass
class Prompt:
    id: str
    input_ids: list[int]
    reference: str


def build_prompts(tokenizer, data: DataArguments) -> tuple[list[Prompt], int]:
    """Validation prompts under the length policy; returns (prompts, number dropped for length)."""
    records = load_records(data.validation_file, "validation", data.max_eval_samples)
    prompts, dropped = [], 0
    for index, record in enumerate(records):
        document = record[data.document_field]
        ids = encode_prompt(tokenizer, document, data)
        if len(ids) > data.max_seq_length:
            fitted = None
            if data.length_policy == "truncate_document":
                fitted = fit_document(tokenizer, document, data, data.max_seq_length,
                                      lambda doc: len(encode_prompt(tokenizer, doc, data)))
            if fitted is None:
                dropped += 1
                continue
            ids = encode_prompt(tokenizer, fitted[0], data)
        record_id = record.get(data.id_field)
        prompts.append(Prompt(f"validation:{index}" if record_id is None else str(record_id), ids,
                              record[data.summary_field]))
    return prompts, dropped


# --- what makes two scorings the same -----------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def eval_settings(model_args: ModelArguments, data: DataArguments, gen: GenerationArguments) -> dict:
    """Everything that changes the predictions. A row scored with equal settings is reused instead of scored again."""
    return {
        "validation_sha256": file_sha256(data.validation_file),
        **{name: getattr(data, name) for name in ("max_eval_samples", "document_field", "summary_field", "id_field",
                                                  "instruction", "system_prompt", "max_seq_length", "length_policy")},
        "model_name_or_path": model_args.model_name_or_path,
        "tokenizer_name_or_path": model_args.tokenizer_name_or_path,
        "dtype": str(resolve_dtype(model_args.torch_dtype)).replace("torch.", ""),
        "max_new_tokens": gen.max_new_tokens,
        "generation_batch_size": gen.generation_batch_size,
        "decoding": "greedy",
    }


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# --- results file ---------------------------------------------------------------------------------------------------

def read_results(path: Path, warn=print0) -> list[dict]:
    """Rows of eval_results.jsonl; a line that is not a row (e.g. left by another tool) is reported and ignored."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "checkpoint" not in row:
            warn(f"{path}: line {number} is not a results row and is ignored (and dropped at the next write): "
                 f"{line[:80]!r}")
            continue
        rows.append(row)
    return rows


@contextmanager
def _locked(path: Path):
    """Exclusive lock beside the results file, so two evaluations of one run never lose each other's rows."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write beside, flush to disk, rename over: readers and killed writers only ever see a whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def save_row(path: Path, row: dict) -> None:
    """Add a results row, replacing an earlier row of the same checkpoint and eval_fingerprint (--force)."""
    with _locked(path):
        rows = [r for r in read_results(path) if (r["checkpoint"], r.get("eval_fingerprint"))
                != (row["checkpoint"], row["eval_fingerprint"])]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in [*rows, row]))


def format_table(rows: list[dict]) -> str:
    """Results by step, the best ROUGE-Lsum marked with '*'."""
    if not rows:
        return "no results"
    rows = report.by_step(rows)
    best = report.best_row(rows)
    lines = [f"{'checkpoint':<24}{'step':>8}" + "".join(f"{m:>11}" for m in ROUGE_TYPES)
             + f"{'Lsum 95% CI':>18}{'empty':>7}{'n':>6}"]
    for r in rows:
        ci = f"[{r['rougeLsum_low']:.3f}, {r['rougeLsum_high']:.3f}]" if "rougeLsum_low" in r else ""
        lines.append(f"{r['checkpoint']:<24}{r['global_step']:>8}" + "".join(f"{r[m]:>11.4f}" for m in ROUGE_TYPES)
                     + f"{ci:>18}{r.get('num_empty', ''):>7}{r['num_examples']:>6}" + (" *" if r is best else ""))
    lines.append(f"* best by rougeLsum: {best['checkpoint']} (step {best['global_step']})")
    return "\n".join(lines)


# --- generation -----------------------------------------------------------------------------------------------------

def stop_token_ids(tokenizer, model) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often end turns with their own)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(ids)


def make_batches(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by length, longest first: little padding, and an out-of-memory shows in the first
    batch rather than hours in."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i].input_ids), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def _generate_batches(model, tokenizer, prompts: list[Prompt], batches: list[list[int]], gen: GenerationArguments,
                      stop_ids: list[int]) -> list[tuple[int, str]]:
    device = next(model.parameters()).device
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    out = []
    for chunk in batches:
        batch = collate([{"input_ids": prompts[i].input_ids} for i in chunk])
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        out += [(i, text.strip()) for i, text in zip(chunk, tokenizer.batch_decode(new_tokens,
                                                                                   skip_special_tokens=True))]
    return out


def generate(model, tokenizer, prompts: list[Prompt], gen: GenerationArguments, stop_ids: list[int] | None = None,
             state=None) -> list[str]:
    """Greedy predictions in the prompts' order. With several processes (`state`: accelerate PartialState) each
    generates every num_processes-th batch and all receive the merged list."""
    stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, model)
    batches = make_batches(prompts, gen.generation_batch_size)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        # split_between_processes hands out contiguous slices; laid out like this, process r's slice is
        # batches[r::n], so each process gets long and short batches alike.
        n = state.num_processes
        with state.split_between_processes([b for r in range(n) for b in batches[r::n]]) as mine:
            pairs = _generate_batches(model, tokenizer, prompts, mine, gen, stop_ids)
        pairs = gather_object(pairs)
    else:
        pairs = _generate_batches(model, tokenizer, prompts, batches, gen, stop_ids)
    predictions: list[str | None] = [None] * len(prompts)
    for i, text in pairs:
        predictions[i] = text
    missing = [i for i, p in enumerate(predictions) if p is None]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts got no prediction after merging the processes' shares")
    return predictions


class AdapterSwapper:
    """One base model; each checkpoint's adapter is loaded, made the active one, and the previous one deleted, so
    the memory holds the base plus at most two adapters at any time."""

    def __init__(self, base):
        self.base = base
        self.model = None
        self.active: str | None = None
        self.loaded = 0

    def activate(self, path: str | Path):
        from peft import PeftModel

        name = f"adapter_{self.loaded}"  # unique: peft refuses to load a name twice
        self.loaded += 1
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
        else:
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            self.model.set_adapter(name, inference_mode=True)
            self.model.delete_adapter(self.active)
        self.active = name
        return self.model.eval()


class Evaluator:
    """Per process: tokenizer, prompts and base model, loaded at the first checkpoint that needs scoring (a rerun
    with nothing to score loads nothing)."""

    def __init__(self, model_args: ModelArguments, data: DataArguments, gen: GenerationArguments, state):
        self.model_args, self.data, self.gen, self.state = model_args, data, gen, state
        self.swapper: AdapterSwapper | None = None

    def setup(self) -> None:
        if self.swapper is not None:
            return
        self.tokenizer = load_tokenizer(self.model_args, padding_side="left")
        self.prompts, self.dropped = build_prompts(self.tokenizer, self.data)
        if not self.prompts:
            raise DataError(f"{self.data.validation_file}: no validation prompt fits max_seq_length="
                            f"{self.data.max_seq_length}; raise it or set length_policy: truncate_document.")
        base = load_base_model(self.model_args, training=False).to(self.state.device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer, base)
        self.generation = {
            "max_new_tokens": self.gen.max_new_tokens, "generation_batch_size": self.gen.generation_batch_size,
            "decoding": "greedy", "stop_token_ids": self.stop_ids, "padding_side": "left",
            "dtype": str(base.dtype).replace("torch.", ""),
            "attn_implementation": resolve_attn_implementation(self.model_args.attn_implementation),
        }
        self.swapper = AdapterSwapper(base)

    def predict(self, ckpt: checkpoints.Checkpoint) -> list[str]:
        self.setup()
        model = self.swapper.activate(ckpt.path)
        return generate(model, self.tokenizer, self.prompts, self.gen, self.stop_ids, self.state)


# --- W&B ------------------------------------------------------------------------------------------------------------

class WandbLogger:
    """ROUGE against each checkpoint's training step (custom step axis train/global_step), and one prediction table
    per checkpoint (its key names the checkpoint, so none is overwritten).

    When training left RUN_DIR/wandb_run.json, the training run is resumed (resume="allow") so ROUGE sits beside the
    loss curves. Offline, W&B cannot reach the run: it records the resume in a new offline-run-*-<same id> folder,
    and `wandb sync` of the training run's folder and then this one appends to the training run. Without the file
    (training without W&B, or still running under --follow) a new run is made in the group run_name.
    """

    def __init__(self, run_dir: Path, run_name: str | None):
        import wandb

        self.wandb = wandb
        info_path = run_dir / WANDB_RUN_FILE
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
        if info and info.get("id"):
            self.run = wandb.init(id=info["id"], project=info.get("project") or os.environ.get("WANDB_PROJECT"),
                                  resume="allow", dir=str(run_dir))
            print0(f"W&B: logging into the training run {info['id']} (resumed; from {info_path})")
        else:
            group = run_name or run_dir.name
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT"), name=f"{group}-eval", group=group,
                                  job_type="eval", dir=str(run_dir))
            print0(f"W&B: no {info_path}; logging into a new run {self.run.id} in group {group!r}")
        self.run.define_metric("train/global_step")
        self.run.define_metric("rouge/*", step_metric="train/global_step")

    def log(self, row: dict, prompts: list[Prompt], predictions: list[str]) -> None:
        per_example = rouge_per_example(predictions, [p.reference for p in prompts])
        table = self.wandb.Table(columns=["id", "prediction", "reference", "rougeLsum"],
                                 data=[[p.id, pred, p.reference, s["rougeLsum"]]
                                       for p, pred, s in zip(prompts, predictions, per_example)])
        metrics = {f"rouge/{k}": row[k] for k in row if k.startswith("rouge")}
        self.run.log({"train/global_step": row["global_step"], **metrics, "rouge/num_empty": row["num_empty"],
                      f"predictions/{row['checkpoint']}": table})

    def finish(self) -> None:
        offline = self.run.settings.mode == "offline"
        run_path = Path(self.run.dir).parent
        self.run.finish()
        if offline:
            # `wandb sync` uploads the folders of one run id in order of start time: training's, then this one.
            print0(f"W&B ran offline; to upload later: wandb sync {run_path.parent}/offline-run-*-{self.run.id}")


# --- the loop -------------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    model_args: ModelArguments
    data: DataArguments
    gen: GenerationArguments
    ev: EvalArguments
    run_dir: Path
    single: checkpoints.Checkpoint | None  # --checkpoint
    settings: dict
    fingerprint: str

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_FILE


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """checkpoint-N directories in step order, then final_adapter; not yet checked for completeness."""
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and checkpoints.CHECKPOINT_RE.match(p.name)]
    dirs.sort(key=lambda p: int(checkpoints.CHECKPOINT_RE.match(p.name).group(1)))
    return dirs + ([run_dir / FINAL] if (run_dir / FINAL).is_dir() else [])


class Discovery:
    """Complete checkpoints, each problem reported once (a --follow poll repeats every few seconds)."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.reported: set[str] = set()

    def _note(self, message: str) -> None:
        if message not in self.reported:
            self.reported.add(message)
            print0(message + (" (looked at again at the next poll)" if self.setup.ev.follow else ""))

    def __call__(self, known: set[str] = frozenset()) -> list[checkpoints.Checkpoint]:
        """Checkpoints in step order. Those named in `known` (already scored) are listed without being verified
        again: verification hashes the adapter files, and a rerun or a --follow poll should not pay for that."""
        if self.setup.single:
            return [self.setup.single]
        found = []
        for path in checkpoint_dirs(self.setup.run_dir):
            if path.name not in known:
                # A checkpoint still being saved has no manifest.json yet (written last).
                problem = checkpoints.adapter_problem(path)
                if problem:
                    self._note(f"skipping {path}: {problem}")
                    continue
            found.append(checkpoints.Checkpoint(path, checkpoints.global_step_of(path) or 0))
        return found


def scored_names(rows: list[dict], fp: str) -> set[str]:
    return {r["checkpoint"] for r in rows if r.get("eval_fingerprint") == fp}


def plan(setup: Setup, discover: Discovery, done: set[str]) -> tuple[list[checkpoints.Checkpoint], bool]:
    """(checkpoints to score now, whether final_adapter is among those found). Rank 0 only.

    Raises ConfigError when, without --follow, the run holds no complete checkpoint at all."""
    already = scored_names(read_results(setup.results_path), setup.fingerprint)
    found = discover(known=done if setup.ev.force else already | done)
    if not found and not setup.ev.follow:
        raise ConfigError(f"setting 'run_dir' = {str(setup.run_dir)!r}: holds no complete checkpoint yet; wait "
                          f"for training to save one, or add --follow to score them as they appear.")
    todo, skipped = [], []
    for ckpt in found:
        if ckpt.name in done:
            continue
        if ckpt.name in already and not setup.ev.force:
            skipped.append(ckpt.name)
            done.add(ckpt.name)
        else:
            todo.append(ckpt)
    if skipped:
        print0(f"already scored with these settings (eval_fingerprint {setup.fingerprint}), skipped: "
               f"{', '.join(skipped)}; --force scores them again")
    return todo, any(c.name == FINAL for c in found)


def results_row(setup: Setup, ckpt: checkpoints.Checkpoint, evaluator: Evaluator, predictions: list[str],
                seconds: float, num_processes: int) -> dict:
    scores = rouge_with_intervals(predictions, [p.reference for p in evaluator.prompts])
    return {
        "checkpoint": ckpt.name, "global_step": ckpt.global_step, **scores,
        "num_examples": len(evaluator.prompts), "num_dropped_for_length": evaluator.dropped,
        "num_empty": sum(not p for p in predictions),
        "validation_file": setup.data.validation_file, "validation_sha256": setup.settings["validation_sha256"],
        "generation": evaluator.generation, "eval_fingerprint": setup.fingerprint,
        "checkpoint_path": str(ckpt.path.resolve()), "num_processes": num_processes,
        "seconds": round(seconds, 2), "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_predictions(ckpt: checkpoints.Checkpoint, prompts: list[Prompt], predictions: list[str]) -> None:
    if not ckpt.path.is_dir():  # deleted meanwhile (save_total_limit): the row still records the scores
        print0(f"{ckpt.path} is gone; its predictions are not written")
        return
    write_atomic(ckpt.path / PREDICTIONS_FILE, "".join(
        json.dumps({"id": p.id, "prediction": pred, "reference": p.reference}) + "\n"
        for p, pred in zip(prompts, predictions)))


def finish_report(setup: Setup) -> list[dict]:
    """Summary, plots and best_checkpoint link for the rows of the current settings; prints the table."""
    rows = report.select_rows(read_results(setup.results_path), setup.fingerprint)
    if not rows:
        print0("no results with these settings yet")
        return rows
    paths = report.write_report(setup.run_dir, rows)
    print0(format_table(rows))
    others = len(read_results(setup.results_path, warn=lambda _: None)) - len(rows)
    if others:
        print0(f"({others} row(s) of {setup.results_path.name} scored with other settings are not shown)")
    print0(f"results: {setup.results_path}")
    for name in ("summary", "rouge_plot", "loss_plot", "best_link"):
        if name in paths:
            print0(f"{name}: {paths[name]}")
    return rows


def score_all(setup: Setup) -> int:
    """Score until nothing is left (or, with --follow, until final_adapter is scored). Returns the exit status."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # On a machine without CUDA, cpu=True is what makes accelerate build the gloo process group for N processes.
    state = PartialState(cpu=not torch.cuda.is_available())
    evaluator = Evaluator(setup.model_args, setup.data, setup.gen, state)
    discover = Discovery(setup)
    logger: WandbLogger | None = None
    done: set[str] = set()
    status, last_new = 0, time.monotonic()
    try:
        while True:
            message = [None]
            if state.is_main_process:
                try:
                    todo, final_found = plan(setup, discover, done)
                except ConfigError as err:  # every process must learn of it, or the others wait forever
                    message = [err]
                    todo, final_found = [], True
                stop = not setup.ev.follow or final_found
                timeout = setup.ev.follow_timeout_seconds
                if todo:
                    last_new = time.monotonic()
                elif setup.ev.follow and timeout is not None and time.monotonic() - last_new > timeout:
                    print0(f"--follow: no new checkpoint in {timeout:g} s and no {FINAL} in {setup.run_dir}; "
                           f"stopping (did training stop early?). Rerun to score what appears later.",
                           file=sys.stderr)
                    stop, status = True, 1
                message = message if message[0] is not None else [(todo, stop, status)]
            broadcast_object_list(message)
            if isinstance(message[0], ConfigError):
                raise message[0]
            todo, stop, status = message[0]
            if todo and state.is_main_process:
                print0(f"scoring {len(todo)} checkpoint(s) of {setup.run_dir} on {setup.data.validation_file} "
                       f"with {state.num_processes} process(es): {', '.join(c.name for c in todo)}")
            for ckpt in todo:
                start = time.perf_counter()
                predictions = evaluator.predict(ckpt)
                done.add(ckpt.name)
                if not state.is_main_process:
                    continue
                row = results_row(setup, ckpt, evaluator, predictions, time.perf_counter() - start,
                                  state.num_processes)
                write_predictions(ckpt, evaluator.prompts, predictions)
                if "wandb" in setup.ev.report_to:
                    logger = logger or WandbLogger(setup.run_dir, setup.ev.run_name)
                    logger.log(row, evaluator.prompts, predictions)
                save_row(setup.results_path, row)
                print0(f"{ckpt.name} (step {ckpt.global_step}): "
                       + ", ".join(f"{m} {row[m]:.4f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]"
                                   for m in ROUGE_TYPES)
                       + f"; empty {row['num_empty']}/{row['num_examples']}; {row['seconds']:.1f} s")
            if stop:
                break
            time.sleep(setup.ev.follow_poll_seconds)
        if state.is_main_process:
            finish_report(setup)
    finally:
        if logger:
            logger.finish()
    teardown()
    return status


# --- entry point ----------------------------------------------------------------------------------------------------

def all_setting_names() -> set[str]:
    """Every training setting: run_config.yaml holds them all, and evaluation accepts (and ignores) the others."""
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}


def parse(argv: list[str] | None) -> Setup:
    """Settings + data checks, no weights. Raises ConfigError / DataError."""
    (model_args, data, _lora, gen, ev), _config_path, extra = parse_config(
        argv, (ModelArguments, DataArguments, LoraArguments, GenerationArguments, EvalArguments),
        tolerated_keys=all_setting_names())
    validate_data(data, need_train=False)
    check_records(data.validation_file, data)
    for name in ("max_new_tokens", "generation_batch_size"):
        if getattr(gen, name) <= 0:
            raise ConfigError(f"setting '{name}' = {getattr(gen, name)!r}: use a positive number.")
    if ev.follow_poll_seconds <= 0:
        raise ConfigError(f"setting 'follow_poll_seconds' = {ev.follow_poll_seconds!r}: use a positive number.")
    if ev.follow_timeout_seconds is not None and ev.follow_timeout_seconds <= 0:
        raise ConfigError(f"setting 'follow_timeout_seconds' = {ev.follow_timeout_seconds!r}: use a positive "
                          f"number, or leave it unset to wait for final_adapter.")
    single = None
    if ev.checkpoint:
        if ev.follow:
            raise ConfigError("settings 'checkpoint' and 'follow' exclude each other: --follow watches a whole run "
                              "(--run_dir); drop one of them.")
        path = Path(ev.checkpoint)
        problem = checkpoints.adapter_problem(path, require_manifest=False)  # also adapters saved elsewhere
        if problem:
            raise ConfigError(f"setting 'checkpoint' = {str(path)!r}: {problem}")
        single = checkpoints.Checkpoint(path, checkpoints.global_step_of(path) or 0)
        run_dir = Path(ev.run_dir) if ev.run_dir else path.resolve().parent
    elif ev.all_checkpoints or ev.follow:
        run_dir = Path(ev.run_dir or extra.get("output_dir") or "")
        if not run_dir.is_dir():
            raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: no such directory; set OUTPUT_DIR (or "
                              f"--run_dir) to the training run's output directory.")
    else:
        raise ConfigError("setting 'checkpoint' is unset: pass --checkpoint DIR, or --all_checkpoints.")
    settings = eval_settings(model_args, data, gen)
    return Setup(model_args, data, gen, ev, run_dir, single, settings, fingerprint(settings))


def preflight(setup: Setup) -> int:
    """What a launch of several processes would do, in one process: 0 to go ahead, NOTHING_TO_SCORE when done."""
    if setup.ev.follow:
        return 0
    todo, _ = plan(setup, Discovery(setup), set())
    if todo:
        print0(f"{len(todo)} checkpoint(s) to score: {', '.join(c.name for c in todo)}")
        return 0
    finish_report(setup)
    return NOTHING_TO_SCORE


def main(argv: list[str] | None = None) -> None:
    try:
        setup = parse(argv)
        if setup.ev.preflight:
            sys.exit(preflight(setup))
        status = score_all(setup)
    except (ConfigError, DataError) as err:
        print0(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)
