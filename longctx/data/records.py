"""Reading and checking the records of a data file (JSONL or parquet) before anything expensive: every record is read
once, and an unusable one (missing field, empty text, wrong type, not JSON, not UTF-8, a byte-order mark) is named
by file, 1-based line (or parquet row) and field, with the fix. Under on_bad_record: skip, unusable records are left
out of a copy of the file and listed in OUTPUT_DIR/bad_records.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..run.layout import BAD_RECORDS_REPORT
from ..settings import DataArguments
from ..utils.atomic_write import atomic_path

MAX_LISTED = 20  # bad records named one by one in the error; the rest are counted


@dataclass
class RecordScan:
    """What reading a data file found: the usable records, and every unusable one."""

    path: Path
    count: int  # usable records
    problems: list[dict] = field(default_factory=list)  # {"file", "line" or "row", "reason"}
    keep_lines: list[int] | None = None  # 1-based lines / rows of the usable records, when some are unusable


def scan_records(path: str | Path, data: DataArguments) -> RecordScan:
    """Read every record of a file once, streaming (JSONL line by line, parquet row group by row group), and
    collect every unusable one with its reason. Raises DataError only for what makes the whole file unreadable
    (a byte-order mark, a missing parquet column)."""
    path = Path(path)
    fields = (data.document_field, data.summary_field)
    problems, keep = [], []
    unit = "row" if path.suffix == ".parquet" else "line"
    for number, record_or_error in read_records(path, fields):
        try:
            if isinstance(record_or_error, DataError):
                raise record_or_error
            _check_record(record_or_error, fields)
            keep.append(number)
        except DataError as err:
            problems.append({"file": str(path), unit: number, "reason": str(err)})
    return RecordScan(path, len(keep), problems, keep if problems else None)


def check_records(path: str | Path, data: DataArguments) -> RecordScan:
    """scan_records, then the verdict: under on_bad_record: error, any unusable record is a DataError listing the
    first MAX_LISTED (file:line: reason) and the count, and naming on_bad_record: skip; a file with no usable
    record is an error either way."""
    scan = scan_records(path, data)
    if not scan.count:
        why = (f"all {len(scan.problems)} records are unusable (the first: {_where(scan.problems[0])}: "
               f"{scan.problems[0]['reason']})" if scan.problems else "holds no records")
        raise DataError(f"{scan.path}: {why}; point train_file / validation_file at a file of usable records.")
    if scan.problems and data.on_bad_record == "error":
        raise DataError(bad_records_message(scan))
    return scan


def bad_records_message(scan: RecordScan) -> str:
    """'FILE: N unusable record(s) ...' then one line per record (the first MAX_LISTED), then how many more."""
    count = len(scan.problems)
    lines = [f"{scan.path}: {count} unusable record{'s' if count > 1 else ''} of {count + scan.count}; fix "
             f"{'them' if count > 1 else 'it'}, or set on_bad_record: skip to train without "
             f"{'them' if count > 1 else 'it'} (they are then listed in OUTPUT_DIR/{BAD_RECORDS_REPORT})"]
    lines += [f"  {_where(p)}: {p['reason']}" for p in scan.problems[:MAX_LISTED]]
    if count > MAX_LISTED:
        lines.append(f"  ... and {count - MAX_LISTED} more")
    return "\n".join(lines)


def _where(problem: dict) -> str:
    """file:line (JSONL, as compilers name a place) or file:row N (parquet)."""
    return f"{problem['file']}:{problem['line']}" if "line" in problem else f"{problem['file']}:row {problem['row']}"


def read_records(path: Path, fields: tuple[str, str]):
    """(1-based number, record or the DataError that makes that line unusable), streaming."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        missing = [f for f in fields if f not in parquet.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: column '{missing[0]}' is missing (columns: {parquet.schema_arrow.names}); "
                            f"rename it or set document_field / summary_field.")
        number = 0
        for group in range(parquet.num_row_groups):
            for record in parquet.read_row_group(group, columns=list(fields)).to_pylist():
                number += 1
                yield number, record
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                raise DataError(f"{path}: line 1: starts with a UTF-8 byte-order mark; save the file as UTF-8 "
                                f"without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`).")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, DataError(f"not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file "
                                        f"as UTF-8.")
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, DataError(f"not a JSON object ({err.msg}); each line must hold one record like "
                                        f"{{\"{fields[0]}\": \"...\", \"{fields[1]}\": \"...\"}}.")


def usable_copy(scan: RecordScan, directory: str | Path) -> Path:
    """The data file itself when every record is usable; else a copy without the skipped records, in directory
    (streamed, like the scan)."""
    if scan.keep_lines is None:
        return scan.path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / scan.path.name
    keep = set(scan.keep_lines)
    with atomic_path(out) as tmp:
        if scan.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(scan.path)
            with pq.ParquetWriter(tmp, parquet.schema_arrow) as writer:
                first = 1
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group)
                    rows = [i for i in range(table.num_rows) if first + i in keep]
                    writer.write_table(table.take(rows))
                    first += table.num_rows
        else:
            with scan.path.open("rb") as src, tmp.open("wb") as dst:
                for number, line in enumerate(src, start=1):
                    if number in keep:
                        dst.write(line.rstrip(b"\r\n") + b"\n")
    return out


def _check_record(record: Any, fields: tuple[str, str]) -> None:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}.")
    for name in fields:
        if name not in record:
            raise DataError(f"field '{name}' is missing (fields present: {sorted(record)}); add it, or set "
                            f"document_field / summary_field to the field that holds it.")
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"field '{name}' must be a string, got {type(value).__name__}.")
        if not value.strip():
            raise DataError(f"field '{name}' is empty; remove the record or fill the field.")
