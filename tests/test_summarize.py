"""longctx.summarize and summarize.sh: the prompt of a document is evaluation's prompt of that record (the same ids);
bad input, too-long documents and a run without best_checkpoint exit 2 naming what and the fix, before any weights
load; truncate_document cuts and lists; a rerun resumes (a line cut off by a kill is done again, whole lines are not);
a folder of .txt files; and, through the launcher on the session's scored run, the summaries of a checkpoint are its
evaluation predictions, with 2 processes as with 1.

Unit tests run in this process on the embedded default's config with the base model (`--checkpoint base`: no
training needed); the launcher test reads the scored run (a copy; it is never written into)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess

import pytest

from longctx import summarize
from longctx.config import parse_config
from longctx.data.chat import template_name
from longctx.data.tokenizer import load_tokenizer
from longctx.eval.generation import build_prompts
from longctx.eval.job import all_setting_names
from longctx.settings import DataArguments, GenerationArguments, ModelArguments
from support.env import subprocess_env, write_jsonl
from support.evaluation import QUICK_TRAINING, copy_run, predictions_of
from support.launching import run
from support.paths import CONFIG_000, EXP_000, QWEN3_FIXTURE, REPO_ROOT
from support.processes import free_port

SUMMARIZE_000 = EXP_000 / "summarize.sh"
CASES = ["case-100000", "case-100001", "case-100002"]  # the first validation records of 000


def settings(*flags: str) -> tuple[ModelArguments, DataArguments, GenerationArguments]:
    (model, data, generation), _, _ = parse_config(["--config", str(CONFIG_000), *flags],
                                                   (ModelArguments, DataArguments, GenerationArguments),
                                                   tolerated_keys=all_setting_names())
    return model, data, generation


def validation_records(tiny_dir, count: int | None = None) -> list[dict]:
    lines = (tiny_dir / "data" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:count]]


def main(*flags: str) -> int:
    """summarize's main in this process on 000's config; returns the exit status."""
    try:
        summarize.main(["--config", str(CONFIG_000), *flags])
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def at_root(tiny_dir, monkeypatch):
    """The repository root as working directory (the config's paths start there), as under the launcher."""
    monkeypatch.chdir(REPO_ROOT)
    return tiny_dir


def refuse_weights(*_args, **_kwargs):
    """In place of load_base_model: what is checked must be refused before the weights."""
    pytest.fail("the model was loaded")


@pytest.fixture()
def no_weights(monkeypatch):
    monkeypatch.setattr(summarize, "load_base_model", refuse_weights)


# --- prompts: evaluation's, for the same record ----------------------------------------------------------------------

@pytest.mark.parametrize("setup", ["000", "qwen3-release-template"])
def test_the_prompt_of_a_document_is_the_evaluations_prompt_of_that_record(at_root, setup):
    """Every validation record of 000: the ids summarize builds from its document alone equal the ids evaluation
    generates from (build_prompts, which encodes document + reference). Also with the real Qwen3 tokenizer and its
    release template, whose prompt ends in an empty think block."""
    flags = [] if setup == "000" else ["--model_name_or_path", str(QWEN3_FIXTURE), "--chat_template",
                                       str(QWEN3_FIXTURE / "qwen3-4b-instruct-2507.release.jinja")]
    model, data, generation = settings(*flags)
    tokenizer = load_tokenizer(model, padding_side="left")
    documents = summarize.read_documents(data.validation_file, data)
    prompts, truncated, _ = summarize.document_prompts(tokenizer, model, data, generation, documents)
    expected, dropped = build_prompts(tokenizer, data, template_name(model))
    assert dropped == 0 and truncated == [] and len(expected) == 12
    assert [(p.id, p.input_ids) for p in prompts] == [(p.id, p.input_ids) for p in expected]
    if setup != "000":  # the release template's empty think block is prompt (tests/data/test_chat.py)
        assert tokenizer.convert_ids_to_tokens(prompts[0].input_ids[-9:]) == [
            "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]


def test_the_prompt_limit_is_the_tighter_of_max_seq_length_and_the_models_positions(at_root):
    """000: max_seq_length 1024, max_new_tokens 48, the tiny model's max_position_embeddings 8192; its template ends a
    turn with <|im_end|> alone (1 token)."""
    model, data, generation = settings()
    limit = summarize.prompt_limit(model, data, generation, end_of_turn=1)
    assert limit == summarize.PromptLimit(1023, "max_seq_length 1,024 less the end of turn, 1 token")  # 1024 - 1
    model, data, generation = settings("--max_seq_length", "100000")
    limit = summarize.prompt_limit(model, data, generation, end_of_turn=1)
    assert limit == summarize.PromptLimit(  # 8192 - 48 = 8144 < 100000 - 1
        8144, "the model's 8,192 positions (max_position_embeddings) less max_new_tokens 48")
    model, data, generation = settings("--max_seq_length", "100000", "--rope_yarn_factor", "2")
    limit = summarize.prompt_limit(model, data, generation, end_of_turn=1)
    assert limit == summarize.PromptLimit(  # 2 x 8192 - 48 = 16336
        16336, "the model's 16,384 positions (max_position_embeddings x rope_yarn_factor 2) less max_new_tokens 48")


# --- bad input: one line (per record), exit 2, no weights ------------------------------------------------------------

def bad_inputs(tmp_path, records: list[dict]):
    """(name, what to pass as --documents, the whole error text) for each kind of bad input."""
    def jsonl(name: str, rows: list) -> str:
        return str(write_jsonl(tmp_path / f"{name}.jsonl", rows))

    a, b = records[0]["document"], records[1]["document"]
    empty_txt = tmp_path / "letters"
    empty_txt.mkdir()
    (empty_txt / "one.txt").write_text(a)
    (empty_txt / "two.txt").write_text("  \n")
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "one.md").write_text(a)
    hint = ("give a .jsonl, .json or .parquet file of records with fields 'id' and 'document', or a folder of .txt "
            "files")
    missing = tmp_path / "nowhere.jsonl"
    yield "missing file", str(missing), (f"setting 'documents' = '{missing}': no such file or folder ({missing}); "
                                         f"{hint}.")
    yield "folder without .txt", str(no_txt), f"setting 'documents' = '{no_txt}': this folder holds no .txt file; {hint}."
    path = jsonl("no_document", [{"id": "a", "document": a}, {"id": "b", "text": b}])
    yield "missing document field", path, (
        f"{path}:2: field 'document' is missing (fields present: ['id', 'text']); add it, or set document_field to "
        f"the field that holds the document (--document_field NAME).")
    path = jsonl("no_id", [{"id": "a", "document": a}, {"name": "b", "document": b}])
    yield "missing id field", path, (
        f"{path}:2: field 'id' is missing (fields present: ['document', 'name']); give every document an id, or set "
        f"id_field to the field that names it (--id_field NAME).")
    path = jsonl("empty", [{"id": "a", "document": a}, {"id": "b", "document": " \n"}])
    yield "empty document", path, f"{path}:2: field 'document' is empty; remove the record or fill the field."
    path = jsonl("duplicate", [{"id": "a", "document": a}, {"id": "b", "document": b}, {"id": "a", "document": b}])
    yield "duplicate id", path, (f"{path}:3: id 'a' is also the id of line 1; give every document its own id (the "
                                 f"output names each summary by it).")
    path = jsonl("two_bad", [{"id": 7, "document": a}, "not json", {"id": 2.5, "document": b}])
    yield "several", path, (
        f"{path}: 2 unusable documents of 3; fix them (each is listed below)\n"
        f"  {path}:2: not a JSON object (Expecting value); each line must hold one record like "
        f"{{\"document\": \"...\", \"id\": \"...\"}}.\n"
        f"  {path}:3: field 'id' must be a string or an integer, got float.")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"key": ["a"], "document": [a]}), parquet)
    yield "parquet without the id column", str(parquet), (
        f"{parquet}: column 'id' is missing (columns: ['key', 'document']); rename it or set id_field (--id_field "
        f"NAME).")
    yield "empty .txt", str(empty_txt), f"{empty_txt / 'two.txt'}: empty; remove the file or write the document into it."


def test_bad_documents_exit_2_naming_file_line_field_and_fix_before_the_weights(at_root, tmp_path, capsys,
                                                                             no_weights):
    records = validation_records(at_root, 2)
    cases = list(bad_inputs(tmp_path, records))
    for name, documents, message in cases:
        status = main("--checkpoint", "base", "--documents", documents, "--output", str(tmp_path / "out.jsonl"))
        captured = capsys.readouterr()
        assert (name, status, captured.err) == (name, 2, f"error: {message}\n")
        assert captured.out == ""
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.summarize.json").exists()
    # the settings of the command itself
    assert main("--checkpoint", "base", "--output", str(tmp_path / "out.jsonl")) == 2
    assert capsys.readouterr().err == ("error: setting 'documents' is unset: pass --documents FILE (.jsonl, .json or "
                                       ".parquet records) or --documents FOLDER (.txt files).\n")
    assert main("--checkpoint", "checkpoint-9", "--output_dir", str(tmp_path), "--documents", cases[2][1],
                "--output", str(tmp_path / "out.jsonl")) == 2
    assert capsys.readouterr().err == (f"error: setting 'checkpoint' = 'checkpoint-9': no such checkpoint in "
                                       f"{tmp_path}; pass --checkpoint checkpoint-N or base, or an adapter "
                                       f"directory.\n")


# --- too long: refused naming them, or cut and listed ----------------------------------------------------------------

INSTRUCTION = "Summarize the following legal document."  # 000's


def long_documents(tokenizer, records: list[dict]) -> tuple[list[dict], list[int], list[int], list[int]]:
    """(records: 0 and 1 as they are, then record 2's document three times and record 1's twice, too long; their
    prompt token counts; the template's ids before and after the document), from the tokenizer directly: the tiny
    template writes <|im_start|>user\n, the instruction + \n\n, the document, <|im_end|>\n<|im_start|>assistant\n."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    docs = [records[0]["document"], records[1]["document"], "\n\n".join([records[2]["document"]] * 3),
            "\n\n".join([records[1]["document"]] * 2)]
    before = ids("<|im_start|>user\n") + ids(INSTRUCTION + "\n\n")
    after = ids("<|im_end|>\n<|im_start|>assistant\n")
    rows = [{"id": f"doc-{i}", "document": doc} for i, doc in enumerate(docs)]
    return rows, [len(before) + len(ids(doc)) + len(after) for doc in docs], before, after


def test_documents_over_the_prompt_limit_are_refused_by_name_or_cut_and_listed(at_root, tmp_path, capsys,
                                                                               monkeypatch):
    model, data, generation = settings()
    tokenizer = load_tokenizer(model)
    rows, prompt_tokens, before, after = long_documents(tokenizer, validation_records(at_root, 3))
    assert prompt_tokens[0] < 1023 and prompt_tokens[1] < 1023 and min(prompt_tokens[2:]) > 1023  # the limit: 1024 - 1
    docs = str(write_jsonl(tmp_path / "docs.jsonl", rows))
    out = tmp_path / "out.jsonl"

    real_load = summarize.load_base_model
    monkeypatch.setattr(summarize, "load_base_model", refuse_weights)
    assert main("--checkpoint", "base", "--documents", docs, "--output", str(out)) == 2
    assert capsys.readouterr().err == (
        f"error: {docs}: 2 document(s) longer than the prompt limit of 1,023 tokens (max_seq_length 1,024 less the "
        f"end of turn, 1 token): doc-2 ({prompt_tokens[2]:,} prompt tokens), doc-3 ({prompt_tokens[3]:,} prompt "
        f"tokens); shorten or split them, or pass --length_policy truncate_document to cut the end of each to fit "
        f"(every cut is listed).\n")
    assert not out.exists()

    monkeypatch.setattr(summarize, "load_base_model", real_load)
    assert main("--checkpoint", "base", "--documents", docs, "--output", str(out), "--length_policy",
                "truncate_document", "--max_new_tokens", "4") == 0
    printed = capsys.readouterr().out
    assert (f"truncated 2 document(s) to the prompt limit of 1,023 tokens (max_seq_length 1,024 less the end of turn, "
            f"1 token), the end of each cut: doc-2 ({prompt_tokens[2]:,} -> 1,023 prompt tokens), doc-3 "
            f"({prompt_tokens[3]:,} -> 1,023 prompt tokens); listed in {tmp_path / 'out.summarize.json'}\n") in printed
    lines = {line["id"]: line for line in read_lines(out)}
    # ASCII text: every token ends on a character boundary, so a cut prompt fills the limit exactly
    assert {i: lines[i]["prompt_tokens"] for i in sorted(lines)} == {
        "doc-0": prompt_tokens[0], "doc-1": prompt_tokens[1], "doc-2": 1023, "doc-3": 1023}
    record = json.loads((tmp_path / "out.summarize.json").read_text())
    assert record["truncated"] == [
        {"id": "doc-2", "prompt_tokens": 1023, "original_prompt_tokens": prompt_tokens[2],
         "document_tokens_removed": prompt_tokens[2] - 1023},
        {"id": "doc-3", "prompt_tokens": 1023, "original_prompt_tokens": prompt_tokens[3],
         "document_tokens_removed": prompt_tokens[3] - 1023}]
    assert record["prompt_limit"] == 1023

    # the cut prompt: the template around the document's first ids, as many as the limit leaves
    cut = dataclasses.replace(data, length_policy="truncate_document")
    (prompt,), _, _ = summarize.document_prompts(tokenizer, model, cut, generation,
                                                 [summarize.Document("doc-2", rows[2]["document"])])
    document_ids = tokenizer(rows[2]["document"], add_special_tokens=False)["input_ids"]
    assert prompt.input_ids == before + document_ids[:1023 - len(before) - len(after)] + after


# --- resume ----------------------------------------------------------------------------------------------------------

def test_a_rerun_skips_whole_lines_and_redoes_a_line_cut_off_by_a_kill(at_root, tmp_path, capsys, monkeypatch):
    docs = str(write_jsonl(tmp_path / "docs.jsonl", validation_records(at_root, 3)))
    out = tmp_path / "out.jsonl"
    flags = ["--checkpoint", "base", "--documents", docs, "--output", str(out), "--generation_batch_size", "1",
             "--max_new_tokens", "8"]
    assert main(*flags) == 0
    whole = out.read_text()
    first, second, third = whole.splitlines(keepends=True)
    assert sorted(json.loads(line)["id"] for line in (first, second, third)) == CASES
    assert "3/3 documents summarized" in capsys.readouterr().out

    # killed while writing the second line (the third never written); the first is marked to see it kept
    marked = json.dumps({**json.loads(first), "summary": "KEPT"}) + "\n"
    out.write_text(marked + second[:len(second) // 2])
    assert main(*flags) == 0
    printed = capsys.readouterr().out
    assert (f"{out}: its last line was cut off ({len(second[:len(second) // 2].encode())} bytes, an earlier run was "
            f"stopped while writing it) and is dropped; that document is summarized again\n") in printed
    assert f"summarizing 2 of 3 documents of {docs} with base (the base model, no adapter)" in printed
    assert f"; 1 already in {out}, skipped\n" in printed and "3/3 documents summarized" in printed
    assert out.read_text() == marked + second + third  # the same batches as the uninterrupted run: the same lines

    monkeypatch.setattr(summarize, "load_base_model", refuse_weights)
    assert main(*flags) == 0
    assert capsys.readouterr().out == f"all 3 documents are already in {out}; nothing to summarize\n"
    assert main(*flags, "--preflight") == 4  # the launcher then exits 0 without starting any process
    # other settings would mix two models' summaries in one file
    assert main(*flags[:-1], "16") == 2
    assert capsys.readouterr().err == (
        f"error: {out} holds 3 summaries made with other settings (max_new_tokens: 8 then, 16 now); rerun with those "
        f"to resume it, or pass another --output, or delete {out} and {tmp_path / 'out.summarize.json'} to start "
        f"afresh.\n")
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"id": "x", "summary": "s"}, "{\"id\": \"y\"", "{}"])
    assert main(*flags[:5], str(broken)) == 2  # a whole line that is not a summary: not a file to append to
    assert capsys.readouterr().err == (f"error: {broken}:2: not a summary line ('{{\"id\": \"y\"'); pass another "
                                       f"--output, or remove the line.\n")
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"id": "x", "summary": "s"}])
    assert main(*flags[:5], str(foreign)) == 2
    assert capsys.readouterr().err == (
        f"error: {foreign} already holds 1 line(s) and no foreign.summarize.json beside it (what this command writes "
        f"with its output): it is not an output of summarize to resume; pass another --output, or delete it.\n")


def test_a_folder_of_txt_files_is_one_document_per_file_named_by_it(at_root, tmp_path):
    model, data, generation = settings()
    records = validation_records(at_root, 2)
    folder = tmp_path / "letters"
    folder.mkdir()
    (folder / "b.second.txt").write_bytes(records[1]["document"].encode("utf-8"))
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + records[0]["document"].encode("utf-8"))  # with a BOM
    (folder / "notes.md").write_text("not a document")
    documents = summarize.read_documents(str(folder), data)
    assert documents == [summarize.Document("a", records[0]["document"]),
                         summarize.Document("b.second", records[1]["document"])]
    tokenizer = load_tokenizer(model)
    from_folder, _, _ = summarize.document_prompts(tokenizer, model, data, generation, documents)
    from_records, _, _ = summarize.document_prompts(
        tokenizer, model, data, generation, summarize.read_documents(data.validation_file, data)[:2])
    assert [p.input_ids for p in from_folder] == [p.input_ids for p in from_records]


# --- the launcher, on the session's scored run -----------------------------------------------------------------------

@pytest.mark.e2e
def test_the_launcher_summarizes_with_the_best_checkpoint_as_evaluation_predicted_with_1_or_2_processes(
        scored_run, tiny_dir, tmp_path, monkeypatch, capsys):
    scored, _ = scored_run
    out = copy_run(scored, tmp_path / "run")  # without the evaluation's outputs: no best_checkpoint yet
    assert QUICK_TRAINING[QUICK_TRAINING.index("--max_eval_samples") + 1] == "4"  # scored on the first 4 records
    docs = str(write_jsonl(tmp_path / "docs.jsonl", validation_records(tiny_dir, 4)))
    flags = ["--documents", docs, "--generation_batch_size", "2"]  # the batches the scoring used (SCORE_FLAGS)

    monkeypatch.chdir(REPO_ROOT)
    assert main("--output_dir", str(out), *flags, "--output", str(tmp_path / "none.jsonl")) == 2
    assert capsys.readouterr().err == (
        f"error: {out}/best_checkpoint does not exist: the evaluation's report writes it (OUTPUT_DIR={out} bash "
        f"experiments/000_tiny_smoke/eval_all_checkpoints.sh); run that, or pass --checkpoint final_adapter, "
        f"checkpoint-2 to checkpoint-5 (3) or base.\n")

    best = os.readlink(scored / "best_checkpoint")
    os.symlink(best, out / "best_checkpoint")
    one = run(["bash", SUMMARIZE_000, *flags, "--output", tmp_path / "one.jsonl"], OUTPUT_DIR=str(out))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert f"with best_checkpoint -> {best} ({out}/best_checkpoint) on 1 process(es)" in one.stdout
    summaries = read_lines(tmp_path / "one.jsonl")
    predictions = predictions_of(scored / best)
    assert sorted(s["id"] for s in summaries) == sorted(p["id"] for p in predictions)
    by_id = {p["id"]: p for p in predictions}
    for line in summaries:
        assert set(line) == {"id", "summary", "prompt_tokens", "summary_tokens", "stopped_by"}
        assert (line["summary"], line["prompt_tokens"]) == (by_id[line["id"]]["prediction"],
                                                            by_id[line["id"]]["prompt_tokens"])
        # 48: 000's max_new_tokens; a row that ends at its end of turn has generated fewer tokens before it
        assert line["summary_tokens"] == 48 if line["stopped_by"] == "max_new_tokens" else line["summary_tokens"] < 48
    assert any(line["summary"] for line in summaries)

    two = run(["bash", SUMMARIZE_000, *flags, "--output", tmp_path / "two.jsonl"], OUTPUT_DIR=str(out),
              NUM_PROCESSES="2", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "accelerate launch --quiet --multi_gpu --num_processes 2" in two.stdout and "on 2 process(es)" in two.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert two.stdout.count("4/4 documents summarized") == 1  # rank 0 alone prints and writes


@pytest.mark.e2e
def test_the_launcher_lists_its_knobs_and_echoes_the_command_it_would_run(tmp_path):
    unset = {knob: "" for knob in ("CONFIG", "MASTER_PORT", "OMP_NUM_THREADS", "PYTHON", "CUDA_VISIBLE_DEVICES")}
    shown = run(["bash", SUMMARIZE_000, "--help"], **unset)
    assert (shown.returncode, shown.stderr) == (0, "")
    assert [line.split()[0] for line in shown.stdout.splitlines() if re.match(r"^  [A-Z_]+ ", line)] == [
        "OUTPUT_DIR", "CONFIG", "NUM_PROCESSES", "CUDA_VISIBLE_DEVICES", "MASTER_PORT", "OMP_NUM_THREADS", "DRY_RUN",
        "PYTHON"]
    assert shown.stdout.endswith("  python -m longctx.summarize --help\n")

    # from the caller's own directory: its relative --documents and --output are its own
    dry = subprocess.run(["bash", str(SUMMARIZE_000), "--documents", "d.jsonl", "--output=o.jsonl"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=subprocess_env(DRY_RUN="1", NUM_PROCESSES="2", OUTPUT_DIR=str(tmp_path / "run"), **unset))
    assert dry.returncode == 0, dry.stderr
    echoed = dry.stdout.splitlines()[0]  # no run there yet: the experiment's own config
    assert echoed.startswith("+ accelerate launch --quiet --multi_gpu --num_processes 2 --num_machines 1 "
                             "--main_process_port 29512 ")
    assert echoed.endswith(f" -m longctx.summarize --config {EXP_000}/config.yaml --output_dir {tmp_path}/run "
                           f"--documents {tmp_path}/d.jsonl --output={tmp_path}/o.jsonl")
