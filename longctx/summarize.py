"""Summarize new documents with a trained checkpoint: each document gets the prompt training and evaluation build
(longctx.data.chat.ChatFormat, the same token ids for the same record), the adapter is loaded as evaluation loads it,
and the summary is generated greedily with the run's settings (longctx.eval.generation).

    bash experiments/009_text_summary/summarize.sh --documents new.jsonl --output summaries.jsonl
    bash experiments/009_text_summary/summarize.sh --documents letters/ --output s.jsonl --checkpoint final_adapter
    python -m longctx.summarize --config runs/009_text_summary/run_config.yaml --output_dir runs/009_text_summary \\
        --documents new.jsonl --output summaries.jsonl          # the command line the launcher runs

- Documents: a .jsonl / .json / .parquet file of records with the run's id_field and document_field, or a folder of
  .txt files (the id: the file name without .txt). Every record is checked before anything loads; a bad one is named
  by file:line and field, with the fix (exit 2).
- Checkpoint: OUTPUT_DIR/best_checkpoint by default (the evaluation's report writes it), final_adapter, checkpoint-N,
  an adapter directory, or `base` (the base model without adapter).
- Prompt length, as evaluation has it: a prompt is the training prompt of the record under max_seq_length and
  length_policy, here with an empty summary (the end of turn alone, which the model must still write), and it leaves
  max_new_tokens of the model's positions (max_position_embeddings, x rope_yarn_factor). A longer document is
  refused, naming it (exit 2); with length_policy truncate_document the end of its text is cut to fit, and it is
  listed. Evaluation's prompt for a record whose reference fits is therefore the same ids (tested); one it cuts is cut
  less here, where no reference takes room.
- Output: one JSON line per document, {id, summary, prompt_tokens, summary_tokens, stopped_by}, appended after each
  round of batches, so a rerun skips the ids already there (a line cut off by a kill is dropped and done again).
  Beside it, OUTPUT's stem + `.summarize.json` records the settings (a rerun with another checkpoint or other
  generation settings is refused: one file, one model) and every document that was cut.
- Several processes (NUM_PROCESSES): the batches, longest first, are dealt out round-robin as in evaluation; after
  each round rank 0 writes them in batch order, so the file is the one a single process writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import exit_status
from .config import (
    parse_config,
    validate_attention_masks,
    validate_chat_template,
    validate_generation,
    validate_model,
)
from .data.chat import ChatFormat, template_name, template_record
from .data.records import MAX_LISTED, read_records  # read_records: the training data checks' streaming reader
from .data.tokenizer import load_tokenizer
from .errors import ConfigError, DataError
from .eval import rank_failures
from .eval.generation import (
    AdapterSwapper,
    Prompt,
    decode_prediction,
    generate_ids,
    generated_tokens,
    make_batches,
    stop_token_ids,
)
from .eval.job import all_setting_names
from .eval.scoring import process_state
from .model.architecture import load_architecture, with_rope_yarn
from .model.loading import load_base_model, resolve_dtype
from .run import checkpoints
from .run.layout import ADAPTER_WEIGHTS, BASE_MODEL, BEST_LINK, FINAL_ADAPTER, RUN_INFO
from .settings import DATA_SUFFIXES, DataArguments, GenerationArguments, ModelArguments
from .utils.atomic_write import write_atomic
from .utils.distributed import print0, teardown
from .utils.hashing import sha256_file
from .utils.jsonl import numbered_values

RECORD_SUFFIX = ".summarize.json"  # beside OUTPUT: its settings and the documents cut to fit
LISTED = 10  # documents named one by one in a refusal or truncation line; the rest are counted


@dataclass
class SummarizeArguments:
    """The options of summarize.sh / python -m longctx.summarize; every other flag is a setting of the run
    (run_config.yaml), e.g. --max_new_tokens 256 or --length_policy truncate_document."""

    documents: str | None = field(
        default=None, metadata={"help": "The documents: a .jsonl, .json or .parquet file of records with id_field and "
                                        "document_field, or a folder of .txt files (id: the file name without .txt)."}
    )
    output: str | None = field(
        default=None, metadata={"help": "The summaries, one JSON line per document: id, summary, prompt_tokens, "
                                        "summary_tokens, stopped_by (eos or max_new_tokens). Ids already in it are "
                                        "skipped: rerun the same command to resume."}
    )
    checkpoint: str | None = field(
        default=None, metadata={"help": "The adapter: best_checkpoint (default; the evaluation's report writes it), "
                                        "final_adapter, checkpoint-N, an adapter directory, or base (the base model "
                                        "without adapter)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "The training run (OUTPUT_DIR) whose checkpoint summarizes."}
    )
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a process waits for the others at a collective (the run's own value "
                                        "from run_config.yaml)."}
    )
    preflight: bool = field(
        default=False, metadata={"help": "Check everything and count the documents left, loading no model: exit 0 "
                                         "when there is work, 4 when every document is already in --output, 2 on "
                                         "bad input. The launcher runs it before starting several processes."}
    )


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class PromptLimit:
    """The most prompt tokens a document may take, and where that number comes from (for messages)."""

    tokens: int
    why: str


@dataclass
class Job:
    """One invocation, checked, with every prompt built: what is left is loading the model and generating."""

    model: ModelArguments
    data: DataArguments
    generation: GenerationArguments
    options: SummarizeArguments
    checkpoint: str  # as messages name it: base, final_adapter, best_checkpoint -> checkpoint-200
    adapter: Path | None  # None: the base model without adapter
    tokenizer: object
    prompts: list[Prompt]  # one per document, in input order
    limit: PromptLimit
    truncated: list[dict]  # the documents cut to fit: id, prompt tokens before and after
    settings: dict  # summary_settings(): what a resumed output must have been written with
    output: SummaryFile
    done: set[str]  # ids already in the output


# --- the documents ---------------------------------------------------------------------------------------------------

def read_documents(source: str, data: DataArguments) -> list[Document]:
    """Every document of a records file (id_field, document_field) or of a folder of .txt files, checked: a DataError
    names every unusable record (file:line, the field, the fix), a ConfigError a missing or unreadable source."""
    path = Path(source)
    kinds = ", ".join(DATA_SUFFIXES[:-1]) + f" or {DATA_SUFFIXES[-1]}"
    hint = f"give a {kinds} file of records with fields '{data.id_field}' and '{data.document_field}', or a folder " \
           f"of .txt files"
    if path.is_dir():
        return _text_files(path, hint)
    if not path.is_file():
        raise ConfigError(f"setting 'documents' = {source!r}: no such file or folder ({path.absolute()}); {hint}.")
    if path.suffix not in DATA_SUFFIXES:
        raise ConfigError(f"setting 'documents' = {source!r}: not a {kinds} file; {hint}.")
    fields = (data.document_field, data.id_field)
    unit = "row" if path.suffix == ".parquet" else "line"
    if unit == "row":
        import pyarrow.parquet as pq

        columns = pq.ParquetFile(path).schema_arrow.names
        for name, setting in zip(fields, ("document_field", "id_field")):
            if name not in columns:
                raise DataError(f"{path}: column '{name}' is missing (columns: {columns}); rename it or set "
                                f"{setting} (--{setting} NAME).")
    documents, problems, first = [], [], {}
    for number, record in read_records(path, fields):
        where = f"{path}:{number}" if unit == "line" else f"{path}:row {number}"
        try:
            if isinstance(record, DataError):
                raise record
            doc_id = _checked_id(record, data)
            if doc_id in first:
                raise DataError(f"id {doc_id!r} is also the id of {unit} {first[doc_id]}; give every document its "
                                f"own id (the output names each summary by it).")
            first[doc_id] = number
            documents.append(Document(doc_id, record[data.document_field]))
        except DataError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise DataError(_problems_message(path, problems, len(documents) + len(problems)))
    if not documents:
        raise DataError(f"{path}: holds no records; {hint}.")
    return documents


def _checked_id(record, data: DataArguments) -> str:
    """The record's id as a string (JSON ids may be integers), after checking its document field."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}.")
    document, name = data.document_field, data.id_field
    if document not in record:
        raise DataError(f"field '{document}' is missing (fields present: {sorted(record)}); add it, or set "
                        f"document_field to the field that holds the document (--document_field NAME).")
    if record.get(name) is None:
        raise DataError(f"field '{name}' is missing (fields present: {sorted(record)}); give every document an id, "
                        f"or set id_field to the field that names it (--id_field NAME).")
    text, value = record[document], record[name]
    if not isinstance(text, str):
        raise DataError(f"field '{document}' must be a string, got {type(text).__name__}.")
    if not text.strip():
        raise DataError(f"field '{document}' is empty; remove the record or fill the field.")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"field '{name}' must be a string or an integer, got {type(value).__name__}.")
    if not str(value).strip():
        raise DataError(f"field '{name}' is empty; give every document an id.")
    return str(value)


def _text_files(folder: Path, hint: str) -> list[Document]:
    """One document per .txt file of the folder, in name order (a leading byte-order mark is not text)."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise ConfigError(f"setting 'documents' = {str(folder)!r}: this folder holds no .txt file; {hint}.")
    documents, problems = [], []
    for file in files:
        try:
            text = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            problems.append(f"{file}: not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8.")
            continue
        if not text.strip():
            problems.append(f"{file}: empty; remove the file or write the document into it.")
            continue
        documents.append(Document(file.stem, text))
    if problems:
        raise DataError(_problems_message(folder, problems, len(files)))
    return documents


def _problems_message(source: Path, problems: list[str], total: int) -> str:
    """One problem: its line. Several: how many, then each (the first MAX_LISTED), then how many more."""
    if len(problems) == 1:
        return problems[0]
    lines = [f"{source}: {len(problems)} unusable documents of {total}; fix them (each is listed below)"]
    lines += [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


# --- the checkpoint --------------------------------------------------------------------------------------------------

def resolve_checkpoint(name: str | None, output_dir: Path) -> tuple[str, Path | None]:
    """(how messages name it, its adapter directory; None for the base model). Default: OUTPUT_DIR/best_checkpoint.
    A name is looked up in OUTPUT_DIR first, then taken as a path."""
    name = name or BEST_LINK
    if name == BASE_MODEL:
        return BASE_MODEL, None
    path = output_dir / name
    if not path.is_dir() and not path.is_symlink() and Path(name).is_dir():
        path = Path(name)  # an adapter directory given by its path
    elif not output_dir.is_dir():
        raise ConfigError(f"setting 'output_dir' = {str(output_dir)!r}: no such directory; set OUTPUT_DIR to the "
                          f"training run, or pass --checkpoint base (the base model) or an adapter directory.")
    elif path.is_symlink() and not path.exists():
        raise ConfigError(f"{path} points to {os.readlink(path)}, which is gone (save_total_limit?); score the run "
                          f"again ({_evaluation_command(output_dir)}) or pass --checkpoint {_choices(output_dir)}.")
    elif not path.is_dir():
        if name == BEST_LINK:
            raise ConfigError(f"{path} does not exist: the evaluation's report writes it "
                              f"({_evaluation_command(output_dir)}); run that, or pass --checkpoint "
                              f"{_choices(output_dir)}.")
        raise ConfigError(f"setting 'checkpoint' = {name!r}: no such checkpoint in {output_dir}; pass "
                          f"--checkpoint {_choices(output_dir)}, or an adapter directory.")
    problem = checkpoints.adapter_problem(path, require_manifest=False)
    if problem:
        raise ConfigError(f"setting 'checkpoint' = {name!r}: {path}: {problem}")
    resolved = path.resolve().name
    return (name if resolved == Path(name).name else f"{name} -> {resolved}"), path


def _choices(output_dir: Path) -> str:
    """What --checkpoint may name in this run, e.g. 'final_adapter, checkpoint-50 to checkpoint-474 (10) or base'."""
    found = [p.name for p in checkpoints.checkpoint_dirs(output_dir)] if output_dir.is_dir() else []
    parts = [FINAL_ADAPTER] if (output_dir / FINAL_ADAPTER).is_dir() else []
    if len(found) > 2:
        parts.append(f"{found[0]} to {found[-1]} ({len(found)})")
    else:
        parts += found
    return ", ".join(parts or ["checkpoint-N"]) + f" or {BASE_MODEL}"


def _evaluation_command(output_dir: Path) -> str:
    """The command that scores the run: its experiment's eval_all_checkpoints.sh (from run_info.json)."""
    try:
        config_file = json.loads((output_dir / RUN_INFO).read_text(encoding="utf-8"))["config_file"]
        script = os.path.relpath(Path(config_file).parent / "eval_all_checkpoints.sh")
    except (OSError, ValueError, KeyError, TypeError):
        script = "experiments/<experiment>/eval_all_checkpoints.sh"
    return f"OUTPUT_DIR={output_dir} bash {script}"


# --- prompts ---------------------------------------------------------------------------------------------------------

def prompt_limit(model: ModelArguments, data: DataArguments, generation: GenerationArguments,
                 end_of_turn: int) -> PromptLimit:
    """The tighter of: max_seq_length less the end of turn (a training sample with the shortest summary), and the
    model's positions less max_new_tokens (generation must not run past them)."""
    by_length = PromptLimit(data.max_seq_length - end_of_turn,
                            f"max_seq_length {data.max_seq_length:,} less the end of turn, {end_of_turn} token"
                            + ("s" if end_of_turn > 1 else ""))
    positions = with_rope_yarn(load_architecture(model.model_name_or_path), model.rope_yarn_factor) \
        .max_position_embeddings
    if positions is None:
        return by_length
    if positions <= generation.max_new_tokens:
        raise ConfigError(f"setting 'max_new_tokens' = {generation.max_new_tokens}: the model has "
                          f"{positions:,} positions (max_position_embeddings); use fewer.")
    yarn = f" x rope_yarn_factor {model.rope_yarn_factor:g}" if model.rope_yarn_factor else ""
    by_context = PromptLimit(positions - generation.max_new_tokens,
                             f"the model's {positions:,} positions (max_position_embeddings{yarn}) less "
                             f"max_new_tokens {generation.max_new_tokens}")
    return by_context if by_context.tokens < by_length.tokens else by_length


def document_prompts(tokenizer, model: ModelArguments, data: DataArguments, generation: GenerationArguments,
                     documents: list[Document], source: str = "") -> tuple[list[Prompt], list[dict], PromptLimit]:
    """(one prompt per document, the documents cut to fit, the limit): ChatFormat.encode(document, "") under
    length_policy with max_seq_length = the prompt limit + the end of turn. A document that does not fit is a
    DataError naming it (length_policy drop), or is cut (truncate_document): never left out in silence."""
    template = template_name(model)
    end_of_turn = len(ChatFormat(tokenizer, data, template).end_of_turn)
    limit = prompt_limit(model, data, generation, end_of_turn)
    chat = ChatFormat(tokenizer, dataclasses.replace(data, max_seq_length=limit.tokens + end_of_turn), template)
    prompts, truncated, refused = [], [], []
    for document in documents:
        sample = chat.encode(document.text, "")
        before = len(sample.prompt_ids) + sample.document_tokens_removed  # the prompt had nothing been cut
        if sample.action == "drop":
            refused.append(f"{document.id} ({sample.original_tokens - end_of_turn:,} prompt tokens)")
            continue
        if sample.action == "truncate":
            truncated.append({"id": document.id, "prompt_tokens": len(sample.prompt_ids),
                              "original_prompt_tokens": before,
                              "document_tokens_removed": sample.document_tokens_removed})
        prompts.append(Prompt(document.id, sample.prompt_ids, reference=""))
    if refused:
        fix = ("the instruction leaves the document no room; shorten instruction or system_prompt"
               if data.length_policy == "truncate_document" else
               "shorten or split them, or pass --length_policy truncate_document to cut the end of each to fit "
               "(every cut is listed)")
        raise DataError(f"{source or 'documents'}: {len(refused)} document(s) longer than the prompt limit of "
                        f"{limit.tokens:,} tokens ({limit.why}): {_listed(refused)}; {fix}.")
    return prompts, truncated, limit


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def summary_settings(model: ModelArguments, data: DataArguments, generation: GenerationArguments, tokenizer,
                     checkpoint: Path | None) -> dict:
    """What changes a document's summary; a resumed output must have been written with the same. Not the batch size
    (a rerun after an out-of-memory error may use a smaller one), nor length_policy (a document it would treat
    otherwise is refused, or cut and listed in the record)."""
    return {
        "checkpoint": checkpoint.resolve().name if checkpoint else BASE_MODEL,
        "adapter_sha256": sha256_file(checkpoint / ADAPTER_WEIGHTS)[:16] if checkpoint else None,
        "model_name_or_path": model.model_name_or_path,
        "tokenizer_name_or_path": model.tokenizer_name_or_path,
        **template_record(model, tokenizer),
        "dtype": str(resolve_dtype(model.torch_dtype)).replace("torch.", ""),
        "rope_yarn_factor": model.rope_yarn_factor,
        **{name: getattr(data, name) for name in ("instruction", "system_prompt", "max_seq_length")},
        "max_new_tokens": generation.max_new_tokens,
        "decoding": "greedy",
    }


# --- the output ------------------------------------------------------------------------------------------------------

class SummaryFile:
    """OUTPUT, one JSON line per summarized document, appended whole lines at a time; and beside it its record
    (stem + .summarize.json): the settings it was written with and the documents cut to fit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.record = self.path.with_name(self.path.stem + RECORD_SUFFIX)

    def read(self) -> tuple[set[str], int, int]:
        """(ids of its whole lines, their count, the bytes up to the last newline: after them, a line cut off by a
        kill). A whole line that is no summary line is a DataError: this is not a file to append to."""
        if not self.path.is_file():
            return set(), 0, 0
        content = self.path.read_bytes()
        whole = content.rfind(b"\n") + 1
        ids, count = set(), 0
        for number, row, line in numbered_values(content[:whole].split(b"\n")[:-1]):
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or "summary" not in row:
                raise DataError(f"{self.path}:{number}: not a summary line ({line[:60].decode(errors='replace')!r}); "
                                f"pass another --output, or remove the line.")
            ids.add(row["id"])
            count += 1
        return ids, count, whole

    def check_settings(self, settings: dict, lines: int) -> None:
        """Its lines were written with these settings (ConfigError naming the first differences otherwise)."""
        if not lines:
            return
        fresh = f"pass another --output, or delete {self.path} and {self.record} to start afresh"
        try:
            recorded = json.loads(self.record.read_text(encoding="utf-8"))["settings"]
        except FileNotFoundError:
            raise ConfigError(f"{self.path} already holds {lines} line(s) and no {self.record.name} beside it (what "
                              f"this command writes with its output): it is not an output of summarize to resume; "
                              f"pass another --output, or delete it.") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{self.record}: unreadable ({err}); {fresh}.") from None
        changed = [f"{key}: {recorded.get(key)!r} then, {settings.get(key)!r} now"
                   for key in {**recorded, **settings} if recorded.get(key) != settings.get(key)]
        if changed:
            raise ConfigError(f"{self.path} holds {lines} summaries made with other settings ({'; '.join(changed[:3])})"
                              f"; rerun with those to resume it, or {fresh}.")

    def start(self, settings: dict, limit: PromptLimit, truncated: list[dict]) -> str | None:
        """Before the first new line: drop a line cut off by a kill, write the record. Returns a line saying what
        was dropped, or None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, _, whole = self.read()
        said = None
        if self.path.is_file() and self.path.stat().st_size > whole:
            said = (f"{self.path}: its last line was cut off ({self.path.stat().st_size - whole} bytes, an earlier "
                    f"run was stopped while writing it) and is dropped; that document is summarized again")
            os.truncate(self.path, whole)
        write_atomic(self.record, json.dumps({"settings": settings, "prompt_limit": limit.tokens,
                                             "prompt_limit_from": limit.why, "truncated": truncated}, indent=1) + "\n")
        return said

    def append(self, lines: list[dict]) -> None:
        """Whole lines, flushed to disk before the next round starts."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())


# --- setup: everything before the weights ----------------------------------------------------------------------------

def prepare(argv: list[str] | None) -> Job:
    """Settings, checkpoint, documents, output and every prompt, with no weights loaded. Raises ConfigError /
    DataError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    (model, data, generation, options), _, _ = parse_config(
        argv, (ModelArguments, DataArguments, GenerationArguments, SummarizeArguments),
        tolerated_keys=all_setting_names())
    validate_model(model)
    validate_chat_template(model)
    validate_generation(generation)
    validate_attention_masks(model, data, generation)
    if not options.documents:
        raise ConfigError("setting 'documents' is unset: pass --documents FILE (.jsonl, .json or .parquet records) "
                          "or --documents FOLDER (.txt files).")
    if not options.output:
        raise ConfigError("setting 'output' is unset: pass --output FILE (one JSON line per document; ids already "
                          "in it are skipped).")
    output = SummaryFile(options.output)
    if output.path.is_dir():
        raise ConfigError(f"setting 'output' = {options.output!r}: a folder; name the file to write, e.g. "
                          f"{output.path / 'summaries.jsonl'}.")
    if output.path.exists() and output.path.resolve() == Path(options.documents).resolve():
        raise ConfigError(f"setting 'output' = {options.output!r}: the documents themselves; name another file.")
    checkpoint, adapter = resolve_checkpoint(options.checkpoint, Path(options.output_dir or ""))
    documents = read_documents(options.documents, data)
    tokenizer = load_tokenizer(model, padding_side="left")
    settings = summary_settings(model, data, generation, tokenizer, adapter)
    done, lines, _ = output.read()
    output.check_settings(settings, lines)
    prompts, truncated, limit = document_prompts(tokenizer, model, data, generation, documents, options.documents)
    return Job(model, data, generation, options, checkpoint, adapter, tokenizer, prompts, limit, truncated, settings,
               output, done)


def pending_batches(job: Job) -> list[list[int]]:
    """The batches of every prompt (as evaluation makes them: by length, longest first) without the documents already
    in the output: a resumed run generates the batches an uninterrupted one would have."""
    batches = [[i for i in batch if job.prompts[i].id not in job.done]
               for batch in make_batches(job.prompts, job.generation.generation_batch_size)]
    return [batch for batch in batches if batch]


def preflight(job: Job) -> int:
    """What a launch of several processes would do, in one process: OK when there is work, NOTHING_TO_SCORE not."""
    left = sum(len(batch) for batch in pending_batches(job))
    if not left:
        print0(f"all {len(job.prompts)} documents are already in {job.output.path}; nothing to summarize")
        return exit_status.NOTHING_TO_SCORE
    print0(f"{left} of {len(job.prompts)} documents to summarize with {job.checkpoint}")
    return exit_status.OK


# --- generation ------------------------------------------------------------------------------------------------------

class Summarizer:
    """Per process: the model (base, adapter active unless `base`), and the output lines of its batches."""

    def __init__(self, job: Job, state):
        self.job, self.state = job, state
        self.model = None

    def load(self) -> None:
        """The base model as evaluation loads it, then the adapter (in the base model's dtype)."""
        base = load_base_model(self.job.model, training=False).to(self.state.device).eval()
        self.stop_ids = stop_token_ids(self.job.tokenizer, base)
        swapper = AdapterSwapper(base)
        self.model = swapper.plain() if self.job.adapter is None else swapper.activate(self.job.adapter)

    def lines(self, batches: list[list[int]]) -> list[dict]:
        """The output lines of these batches, in batch order."""
        job = self.job
        out = []
        for i, new_ids in generate_ids(self.model, job.tokenizer, job.prompts, batches, job.generation,
                                       self.stop_ids):
            prediction = decode_prediction(job.tokenizer, new_ids, self.stop_ids)
            out.append({"id": job.prompts[i].id, "summary": prediction.text,
                        "prompt_tokens": len(job.prompts[i].input_ids),
                        "summary_tokens": generated_tokens(new_ids, self.stop_ids),
                        "stopped_by": "max_new_tokens" if prediction.hit_max_new_tokens else "eos"})
        return out


class Progress:
    """Rank 0: documents done / total and tokens per second, one line per round."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.written = total, done, 0
        self.prompt_tokens = self.summary_tokens = self.eos = 0
        self.start = time.perf_counter()

    def add(self, lines: list[dict]) -> str:
        self.done += len(lines)
        self.written += len(lines)
        self.prompt_tokens += sum(line["prompt_tokens"] for line in lines)
        self.summary_tokens += sum(line["summary_tokens"] for line in lines)
        self.eos += sum(line["stopped_by"] == "eos" for line in lines)
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.done}/{self.total} documents summarized ({seconds:.1f} s: "
                f"{self.prompt_tokens / seconds:,.0f} prompt + {self.summary_tokens / seconds:,.1f} generated tokens/s)")


def summarize(job: Job) -> int:
    """Every process: load the model, then per round one batch each, gathered and written by rank 0."""
    state = process_state(job.options)
    output, n = job.output, state.num_processes
    batches = pending_batches(job)

    def start() -> None:
        said = output.start(job.settings, job.limit, job.truncated)
        if said:
            print0(said)
        if job.truncated:
            cut = [f"{t['id']} ({t['original_prompt_tokens']:,} -> {t['prompt_tokens']:,} prompt tokens)"
                   for t in job.truncated]
            print0(f"truncated {len(cut)} document(s) to the prompt limit of {job.limit.tokens:,} tokens "
                   f"({job.limit.why}), the end of each cut: {_listed(cut)}; listed in "
                   f"{output.record}")

    rank_failures.from_main(state, f"starting {output.path}", start)
    left = sum(len(batch) for batch in batches)
    already = len(job.prompts) - left
    if not left:
        print0(f"all {len(job.prompts)} documents are already in {output.path}; nothing to summarize")
        teardown()
        return exit_status.OK
    print0(f"summarizing {left} of {len(job.prompts)} documents of {job.options.documents} with {job.checkpoint}"
           + (f" ({job.adapter})" if job.adapter else " (the base model, no adapter)")
           + f" on {n} process(es): greedy, max_new_tokens {job.generation.max_new_tokens}, generation_batch_size "
             f"{job.generation.generation_batch_size}"
           + (f"; {already} already in {output.path}, skipped" if already else ""))
    summarizer = Summarizer(job, state)
    rank_failures.gather(state, "loading the model", summarizer.load)
    progress = Progress(len(job.prompts), already)

    def write(shares: list[list[dict]]) -> None:
        lines = [line for share in shares for line in share]  # rank order: batch order
        output.append(lines)
        print0(progress.add(lines))

    for first in range(0, len(batches), n):
        mine = batches[first + state.process_index:first + state.process_index + 1]  # one batch, or none at the end
        shares = rank_failures.gather(state, f"summarizing batch {first + state.process_index + 1} of {len(batches)}",
                                      lambda mine=mine: summarizer.lines(mine))
        rank_failures.from_main(state, f"writing {output.path}", lambda shares=shares: write(shares))
    print0(f"wrote {progress.written} summaries to {output.path} ({progress.eos} ended at end of turn, "
           f"{progress.written - progress.eos} stopped by max_new_tokens {job.generation.max_new_tokens}); it holds "
           f"all {len(job.prompts)} documents")
    teardown()
    return exit_status.OK


def main(argv: list[str] | None = None) -> None:
    rank_failures.run_command(argv, prepare, preflight, summarize)


if __name__ == "__main__":
    main()
