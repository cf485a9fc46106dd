"""Each data check on a bad file, with the exact message a user reads."""

import json

import pytest

from hwcompat.cli import main
from hwcompat.data.problems import Report
from hwcompat.data.rows import load_datasets, read_jsonl

GOOD = '{"prompt": "p", "completion": "c"}\n'


def _check(tmp_path, capsys, content: bytes, *extra):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    code = main(["data", "check", str(f), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, f


@pytest.mark.parametrize("content,message", [
    (GOOD.encode() + b'{"prompt": "a\x00b", "completion": "c"}\n',
     ":2: NUL byte (\\x00) at column 14: the file is corrupted (often a scraper or an encoding bug); "
     "remove the bytes or the row"),
    (GOOD.encode() + b'{"prompt": "caf\xe9", "completion": "c"}\n',
     ":2: invalid UTF-8 at column 16 (byte 0xe9); re-encode the file as UTF-8"),
    (GOOD.encode() + b'{"prompt": "a", "completion": }\n', ":2: not valid JSON (Expecting value at column 31)"),
    (GOOD.encode() + b'["prompt", "completion"]\n', ":2: expected a JSON object per line, got list"),
    (GOOD.encode() + b'{"prompt": "a"}\n', ":2: completion: missing"),
    (GOOD.encode() + b'{"prompt": "a", "completion": "  "}\n', ":2: completion: empty"),
    (GOOD.encode() + b'{"prompt": 3, "completion": "c"}\n', ":2: prompt: expected a string, got int"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n',
     ":1: messages[1].role: expected 'assistant' after 'user', got 'user'"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}\n',
     ":1: messages[0].role: expected 'user' after 'the start', got 'assistant'"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n',
     ":1: messages: the last turn must be 'assistant' (nothing to train on), got 'user'"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n',
     ":1: messages[0].role: expected one of system, user, assistant, got 'bot'"),
    (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}\n',
     ":1: messages[0].content: empty"),
    (b'{"text": "hello"}\n', ":1: cannot tell the data format: expected 'messages', 'conversations' "
                             "(ShareGPT), 'prompt'/'completion' or 'instruction'/'output' keys, got ['text']"),
    (b'', ": no examples (the file is empty)"),
    (b'{"instruction": "do", "input": 5, "output": "x"}\n', ":1: input: expected a string, got int"),
])
def test_bad_rows_exact_messages(tmp_path, capsys, content, message):
    code, out, f = _check(tmp_path, capsys, content)
    assert code == 1
    assert f"error: {f}{message}" in out, out


def test_error_cap_and_count(tmp_path, capsys):
    code, out, _ = _check(tmp_path, capsys, b'{"prompt": 1}\n' * 30)
    assert code == 1
    assert out.count("error: ") == 21  # 20 shown + the summary line
    assert "… and 40 more errors" in out  # two errors per row (prompt and completion)


def test_warnings_duplicates_and_leakage(tmp_path, capsys):
    train = tmp_path / "t.jsonl"
    train.write_text(GOOD * 3 + '{"prompt": "q", "completion": "a"}\n')
    ev = tmp_path / "e.jsonl"
    ev.write_text('{"prompt": "q", "completion": "a"}\n')
    assert main(["data", "check", str(train), "--eval", str(ev)]) == 0
    out = capsys.readouterr().out
    assert f"warning: exact duplicates in train: 2 row(s): {train}:2 repeats line 1; {train}:3 repeats line 1" in out
    assert f"warning: eval rows also in train: 1 row(s): {ev}:1 = {train}:4" in out
    assert out.strip().endswith("ok: no errors")


def test_formats_normalise_to_turns(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "Sum", "input": "1 2", "output": "3"}\n{"instruction": "Hi", "output": "Yo"}\n')
    rows = read_jsonl(f, "auto", Report())
    assert rows[0].messages == (("user", "Sum\n\n1 2"), ("assistant", "3"))
    assert rows[1].messages == (("user", "Hi"), ("assistant", "Yo"))
    rows = read_jsonl(f, "auto", Report(), system_prompt="Be brief.")
    assert rows[0].messages[0] == ("system", "Be brief.")


def test_json_output_and_crlf(tmp_path, capsys):
    f = tmp_path / "w.jsonl"
    f.write_bytes(GOOD.replace("\n", "\r\n").encode() * 2)
    assert main(["data", "check", str(f), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["rows"] == {str(f): 2}


def test_eval_split_is_deterministic(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(50)))
    a = load_datasets([str(f)], [], "auto", 0.2, seed=3)
    b = load_datasets([str(f)], [], "auto", 0.2, seed=3)
    assert [e.line for e in a[1]] == [e.line for e in b[1]] and len(a[1]) == 10 and len(a[0]) == 40


def test_token_level_checks_alone(tmp_path, capsys, tiny_model):
    f = tmp_path / "d.jsonl"
    rows = [{"prompt": "What color is the sky?", "completion": "blue"}] * 3
    rows.append({"prompt": "What color is the apple? " * 30, "completion": "red"})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["data", "check", str(f), "--tokenizer", str(tiny_model), "--max-seq-len", "32"])
    out = capsys.readouterr()
    assert code == 1
    assert f"error: {f}:4: response: no trainable tokens after truncation to max_seq_len=32" in out.err
    assert "warning: train rows over max_seq_len=32, truncated: 1 row(s)" in out.err
    assert main(["data", "check", str(f), "--tokenizer", str(tiny_model), "--max-seq-len", "32",
                 "--overlong", "drop"]) == 0
