"""longctx.utils.jsonl: each non-blank line with its number (blank lines count) and its JSON value, or None."""

from longctx.utils.jsonl import numbered_values


def test_blank_lines_are_skipped_but_counted_and_a_line_without_json_gives_none():
    lines = ['{"a": 1}', "", "   ", '{"cut off', "[1, 2]", "7"]
    # by hand: line 1 an object, lines 2-3 blank, line 4 no JSON, line 5 a list, line 6 a number
    assert list(numbered_values(lines)) == [(1, {"a": 1}, '{"a": 1}'), (4, None, '{"cut off'), (5, [1, 2], "[1, 2]"),
                                            (6, 7, "7")]


def test_bytes_lines_are_read_alike():
    assert list(numbered_values([b'{"id": "x"}', b"\xff"])) == [(1, {"id": "x"}, b'{"id": "x"}'), (2, None, b"\xff")]
