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

from .files import atomic_path
from .settings import DataArguments

BAD_RECORDS_REPORT = "bad_records.jsonl"


class DataError(ValueError):
    """A record is unusable. The message names the file, the 1-based line, the field and the fix."""


@dataclass
class RecordScan:
    """What reading a data file found: usable records, and the unusable ones (only under on_bad_record: skip)."""

    path: Path
    count: int
    problems: list[dict] = field(default_factory=list)  # {"file", "line" or "row", "reason"}
    keep_lines: list[int] | None = None  # 1-based lines / rows of the usable records, when some were skipped


def check_records(path: str | Path, data: DataArguments) -> RecordScan:
    """Read every record once, before anything expensive.

    on_bad_record: error stops at the first unusable record with a message naming the file, the 1-based line (or
    parquet row), the field and the fix; skip collects them instead. A file with no usable record is an error.
    """
    path = Path(path)
    fields = (data.document_field, data.summary_field)
    skip = data.on_bad_record == "skip"
    problems, keep = [], []

    def check(record, number: int, where: str, unit: str) -> None:
        try:
            _check_record(record, fields, where)
            keep.append(number)
        except DataError as err:
            if not skip:
                raise
            problems.append({"file": str(path), unit: number, "reason": str(err).split(": ", 2)[-1]})

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [f for f in fields if f not in table.column_names]
        if missing:
            raise DataError(f"{path}: column '{missing[0]}' is missing (columns: {table.column_names}); "
                            f"rename it or set document_field / summary_field.")
        for row_number, record in enumerate(table.select(list(fields)).to_pylist(), start=1):
            check(record, row_number, f"{path}: row {row_number}", "row")
    else:
        raw = path.read_bytes()
        if raw.startswith(b"\xef\xbb\xbf"):
            raise DataError(f"{path}: line 1: starts with a UTF-8 byte-order mark; save the file as UTF-8 "
                            f"without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`).")
        for line_number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                                    f"re-encode the file as UTF-8.") from err
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not a JSON object ({err.msg}); each line must hold one record "
                                    f"like {{\"{fields[0]}\": \"...\", \"{fields[1]}\": \"...\"}}.") from err
            except DataError as err:
                if not skip:
                    raise
                problems.append({"file": str(path), "line": line_number, "reason": str(err).split(": ", 2)[-1]})
                continue
            check(record, line_number, where, "line")
    if not keep:
        why = f"all {len(problems)} records are unusable (see the first: {problems[0]['reason']})" if problems \
            else "holds no records"
        raise DataError(f"{path}: {why}; point train_file / validation_file at a file of usable records.")
    return RecordScan(path, len(keep), problems, keep if problems else None)


def usable_copy(scan: RecordScan, directory: str | Path) -> Path:
    """The data file itself when every record is usable; else a copy without the skipped records, in directory."""
    if scan.keep_lines is None:
        return scan.path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / scan.path.name
    with atomic_path(out) as tmp:
        if scan.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(scan.path)
            pq.write_table(table.take([row - 1 for row in scan.keep_lines]), tmp)
        else:
            lines = scan.path.read_bytes().split(b"\n")
            tmp.write_bytes(b"\n".join(lines[n - 1].rstrip(b"\r") for n in scan.keep_lines) + b"\n")
    return out


def _check_record(record: Any, fields: tuple[str, str], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    for name in fields:
        if name not in record:
            raise DataError(f"{where}: field '{name}' is missing (fields present: {sorted(record)}); add it, or "
                            f"set document_field / summary_field to the field that holds it.")
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}.")
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty; remove the record or fill the field.")
