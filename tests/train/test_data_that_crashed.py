"""Data that used to crash the tokenizer or eat memory is a data error with file:line, found before tokenising."""

import json
import time


from tests import cli

from hwcompat.data.problems import Report
from hwcompat.data.rows import read_jsonl


def _read(tmp_path, body: bytes, **kw):
    f = tmp_path / "d.jsonl"
    f.write_bytes(body)
    report = Report()
    rows = read_jsonl(f, "auto", report, **kw)
    return f, rows, report


def _row(prompt, completion="ok"):
    return (json.dumps({"prompt": prompt, "completion": completion}) + "\n").encode()


def test_lone_surrogate_is_an_error_with_file_line(tmp_path):
    f, rows, report = _read(tmp_path, _row("fine") + b'{"prompt": "bad \\ud800 here", "completion": "x"}\n')
    assert len(rows) == 1
    assert report.errors == [f"{f}:2: prompt: lone surrogate \\ud800 at character 5: not valid Unicode (a broken "
                             "\\ud8xx escape, usually half of an emoji); fix or drop the row"]


def test_escaped_nul_is_as_bad_as_a_raw_one(tmp_path):
    f, rows, report = _read(tmp_path, b'{"prompt": "a\\u0000b", "completion": "x"}\n')
    assert rows == [] and report.errors[0].startswith(f"{f}:1: prompt: NUL character (\\u0000) at character 2")


def test_other_control_characters_warn(tmp_path):
    f, rows, report = _read(tmp_path, b'{"prompt": "a\\u0007b", "completion": "x"}\n')
    assert len(rows) == 1 and not report.errors
    assert report.warnings["control characters"] == [f"{f}:1: prompt: 1 control character(s), e.g. \\u0007"]


def test_deep_json_and_huge_integers(tmp_path):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "completion": "x"}\n'
    huge = b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 5000 + b"}\n"
    f, rows, report = _read(tmp_path, deep + huge)
    assert report.errors[0] == f"{f}:1: JSON nested too deeply to read; a training row is a flat object"
    assert report.errors[1].startswith(f"{f}:2: a value cannot be read (Exceeds the limit")


def test_bom_is_tolerated_with_a_warning(tmp_path):
    f, rows, report = _read(tmp_path, b"\xef\xbb\xbf" + _row("hello"))
    assert len(rows) == 1 and not report.errors
    assert report.warnings["byte order mark"] == [f"{f}:1: the file starts with a UTF-8 BOM; it was ignored"]


def test_a_row_far_beyond_max_seq_len_is_flagged_before_tokenising(tmp_path):
    big = _row("x" * 5_000_000)
    f, rows, report = _read(tmp_path, _row("fine") + big, max_seq_len=1024)
    assert len(rows) == 1 and report.errors[0].startswith(f"{f}:2: 5,000,") and "far beyond max_seq_len=1024" in \
        report.errors[0]


def test_data_check_cli_flags_a_50mb_line_quickly(tmp_path):
    f = tmp_path / "d.jsonl"
    with open(f, "wb") as fh:
        fh.write(_row("fine"))
        fh.write(_row("y" * 50_000_000))
    start = time.time()
    res = cli.run("data", "check", f)
    assert res.returncode == 1 and f"{f}:2: 50,000,0" in res.stderr and "far beyond max_seq_len=1024" in res.stderr
    assert time.time() - start < 30
