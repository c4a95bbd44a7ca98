"""longctx.records: every record read once before anything expensive; unusable ones named by file, line and field,
or skipped and listed."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from longctx.records import DataError, check_records
from longctx.settings import DataArguments

GOOD = {"id": "a", "document": "A document.", "summary": "A summary."}


def test_check_records_counts_good_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, "", GOOD])  # a blank line is skipped
    assert check_records(path, DataArguments()).count == 3


@pytest.mark.parametrize("bad, line_no, needles", [
    ({"id": "b", "document": "A document."}, 2, ["field 'summary' is missing"]),
    ({"id": "b", "document": "A document.", "summary": "   "}, 2, ["field 'summary' is empty"]),
    ({"id": "b", "document": 17, "summary": "A summary."}, 2, ["field 'document' must be a string", "int"]),
    ('{"document": "A document.", "summary": ', 2, ["not a JSON object"]),
    ('["A document.", "A summary."]', 2, ["expected a JSON object", "list"]),
])
def test_check_records_bad_record_names_file_line_field(tmp_path, bad, line_no, needles):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    message = str(info.value)
    assert f"{path}: line {line_no}:" in message
    for needle in needles:
        assert needle in message


def test_check_records_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "A document.", "abstract": "A summary."}, GOOD])
    data = DataArguments(document_field="text", summary_field="abstract")
    with pytest.raises(DataError, match=r"line 2: field 'text' is missing"):
        check_records(path, data)


@pytest.mark.parametrize("raw, line, reason", [
    (json.dumps(GOOD).encode() + b"\n" + b'{"document": "caf\xe9", "summary": "s"}\n', 2, "not valid UTF-8"),
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n", 1, "byte-order mark"),
], ids=["non_utf8_bytes", "utf8_bom"])
def test_check_records_encoding_errors_name_the_line(tmp_path, raw, line, reason):
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    message = str(info.value)
    assert f"{path}: line {line}:" in message
    assert reason in message


def test_check_records_accepts_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(json.dumps(GOOD).encode() + b"\r\n" for _ in range(4)))
    assert check_records(path, DataArguments()).count == 4


def test_check_records_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no records"):
        check_records(path, DataArguments())


def test_check_records_skip_lists_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"document": "d"}, "not json", GOOD])
    scan = check_records(path, DataArguments(on_bad_record="skip"))
    assert scan.count == 2
    assert [(p["line"], p["file"]) for p in scan.problems] == [(2, str(path)), (3, str(path))]
    assert "field 'summary' is missing" in scan.problems[0]["reason"]
    assert scan.keep_lines == [1, 4]
