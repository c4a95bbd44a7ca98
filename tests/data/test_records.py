"""longctx.data.records: every record read once, streaming, before anything expensive; every unusable one named by
file, line and field with the fix (the first 20, then the count), or skipped and listed."""

from __future__ import annotations

import json

import pytest

from longctx.data.records import check_records, scan_records, usable_copy
from longctx.errors import DataError
from longctx.settings import DataArguments
from support.env import write_jsonl

GOOD = {"id": "a", "document": "A document.", "summary": "A summary."}
FIX = "fix it, or set on_bad_record: skip to train without it (they are then listed in OUTPUT_DIR/bad_records.jsonl)"


def test_check_records_counts_good_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, "", GOOD])  # a blank line is skipped
    assert check_records(path, DataArguments()).count == 3


@pytest.mark.parametrize("bad, reason", [
    ({"id": "b", "document": "A document."},
     "field 'summary' is missing (fields present: ['document', 'id']); add it, or set document_field / summary_field "
     "to the field that holds it."),
    ({"id": "b", "document": "A document.", "summary": "   "},
     "field 'summary' is empty; remove the record or fill the field."),
    ({"id": "b", "document": 17, "summary": "A summary."}, "field 'document' must be a string, got int."),
    ('{"document": "A document.", "summary": ',
     "not a JSON object (Expecting value); each line must hold one record like "
     '{"document": "...", "summary": "..."}.'),
    ('["A document.", "A summary."]', "expected a JSON object, got list."),
], ids=["missing", "empty", "type", "not-json", "not-object"])
def test_a_bad_record_is_named_by_file_line_field_and_fix(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    assert str(info.value) == f"{path}: 1 unusable record of 3; {FIX}\n  {path}:2: {reason}"


def test_every_bad_record_is_reported_in_one_pass_the_first_20_by_name(tmp_path):
    # 25 bad records (lines 2, 4, ..., 50) between 26 good ones: all counted, the first 20 listed, then "5 more"
    rows = [GOOD]
    for _ in range(25):
        rows += [{"document": "d", "summary": ""}, GOOD]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    lines = str(info.value).split("\n")
    assert lines[0] == (f"{path}: 25 unusable records of 51; fix them, or set on_bad_record: skip to train without "
                        f"them (they are then listed in OUTPUT_DIR/bad_records.jsonl)")
    assert lines[1:21] == [f"  {path}:{n}: field 'summary' is empty; remove the record or fill the field."
                           for n in range(2, 42, 2)]
    assert lines[21:] == ["  ... and 5 more"]


def test_check_records_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "A document.", "abstract": "A summary."}, GOOD])
    data = DataArguments(document_field="text", summary_field="abstract")
    with pytest.raises(DataError) as info:
        check_records(path, data)
    assert str(info.value).endswith(f"  {path}:2: field 'text' is missing (fields present: ['document', 'id', "
                                    f"'summary']); add it, or set document_field / summary_field to the field that "
                                    f"holds it.")


@pytest.mark.parametrize("raw, expected", [
    (json.dumps(GOOD).encode() + b"\n" + b'{"document": "caf\xe9", "summary": "s"}\n',
     "{path}: 1 unusable record of 2; " + FIX + "\n  {path}:2: not valid UTF-8 (invalid continuation byte at byte "
     "17); re-encode the file as UTF-8."),
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n",  # a byte-order mark makes the whole file unreadable
     "{path}: line 1: starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM (e.g. "
     "`sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`)."),
], ids=["non-utf8-bytes", "byte-order-mark"])
def test_encoding_errors_name_the_line(tmp_path, raw, expected):
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    assert str(info.value) == expected.format(path=path)


def test_check_records_accepts_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(json.dumps(GOOD).encode() + b"\r\n" for _ in range(4)))
    assert check_records(path, DataArguments()).count == 4


def test_a_file_without_records_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    assert str(info.value) == f"{path}: holds no records; point train_file / validation_file at a file of usable records."


def test_skip_lists_bad_lines_and_the_copy_keeps_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"document": "d"}, "not json", {**GOOD, "id": "z"}])
    scan = check_records(path, DataArguments(on_bad_record="skip"))
    assert scan.count == 2 and scan.keep_lines == [1, 4]
    assert [(p["line"], p["file"]) for p in scan.problems] == [(2, str(path)), (3, str(path))]
    copy = usable_copy(scan, tmp_path / "usable")
    assert [json.loads(line)["id"] for line in copy.read_text().splitlines()] == ["a", "z"]


def test_all_unusable_is_an_error_even_under_skip(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{", '{"document": 1, "summary": "x"}'])
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments(on_bad_record="skip"))
    assert str(info.value) == (f"{path}: all 2 records are unusable (the first: {path}:1: not a JSON object "
                               f"(Expecting property name enclosed in double quotes); each line must hold one record "
                               f'like {{"document": "...", "summary": "..."}}.); point train_file / validation_file '
                               f"at a file of usable records.")


def test_parquet_is_read_row_group_by_row_group(tmp_path):
    """Three row groups of 2 rows; the bad one is row 4 (the second group's second row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, GOOD, GOOD, {**GOOD, "summary": ""}, GOOD, {**GOOD, "id": "last"}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    scan = scan_records(path, DataArguments())
    assert scan.count == 5 and [p["row"] for p in scan.problems] == [4]
    with pytest.raises(DataError) as info:
        check_records(path, DataArguments())
    assert str(info.value).endswith(f"\n  {path}:row 4: field 'summary' is empty; remove the record or fill the "
                                    f"field.")
    copy = usable_copy(scan, tmp_path / "usable")
    assert pq.read_table(copy).column("id").to_pylist() == ["a", "a", "a", "a", "last"]
