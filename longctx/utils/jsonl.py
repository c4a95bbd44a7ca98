"""Reading a JSON-lines file that this project wrote and another hand may have touched."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def numbered_values(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any, str | bytes]]:
    """(its line number from 1, its JSON value or None when it holds none, the line) for every line that is not
    blank; the caller decides what a line that is not its kind of row means."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        yield number, value, line
