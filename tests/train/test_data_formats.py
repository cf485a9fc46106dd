"""#27: the data people have — ShareGPT, OpenAI chat rows (content parts, weights; tool calls refused with the row),
gzip JSONL, CSV/TSV with a column mapping, Parquet, Arrow and datasets' save_to_disk folders, DPO pairs in the same
containers. Each has a good-file test and a bad-row test asserting the message and the location a user can open."""

import csv
import gzip
import json
import sys

import pytest

from hwcompat.data.pairs import read_pairs
from hwcompat.data.problems import Report
from hwcompat.data.rows import read_jsonl



@pytest.fixture
def pa():
    """pyarrow, for the Parquet and Arrow tests only: without it they skip, the JSONL/ShareGPT/OpenAI/gzip/CSV tests
    still run (a module-level skip hid them)."""
    return pytest.importorskip("pyarrow")


@pytest.fixture
def pq(pa):
    import pyarrow.parquet

    return pyarrow.parquet

QA = [{"question": f"What color is the {k}?", "answer": v} for k, v in
      [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("apple", "red")]]
MAP = {"prompt": "question", "completion": "answer"}


def _read(path, fmt="auto", columns=None):
    report = Report()
    rows = read_jsonl(path, fmt, report, columns=columns)
    return rows, report


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- ShareGPT ---------------------------------------------------------------------------------------------------

def test_sharegpt_rows_become_chat_turns(tmp_path):
    f = _jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Color of sky?"}, {"from": "gpt", "value": "Blue."}]}])
    rows, report = _read(f)
    assert report.ok, report.errors
    assert rows[0].messages == (("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."),
                                ("user", "Color of sky?"), ("assistant", "Blue."))
    assert report.formats[str(f)] == "ShareGPT conversations" and report.sources[str(f)] == "JSONL"
    assert f"read 1 row(s) from {f} (JSONL, ShareGPT conversations)" in report.render()


@pytest.mark.parametrize("turn,message", [
    ({"from": "function_call", "value": "{}"}, "conversations[1].from: 'function_call' is a tool turn; hwcompat does "
                                               "not train tool use yet: drop the row, or its tool turns"),
    ({"from": "narrator", "value": "x"}, "conversations[1].from: expected one of human, gpt, system (or user, "
                                         "assistant, model), got 'narrator'"),
    ({"from": "gpt", "value": ""}, "conversations[1].value: empty"),
    ({"from": "human", "value": "again"}, "conversations[1].role: expected 'assistant' after 'user', got 'user'"),
])
def test_a_bad_sharegpt_row_is_located_and_named(tmp_path, turn, message):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {"conversations": [{"from": "human", "value": "a"}, turn] + ([{"from": "gpt", "value": "c"}]
                                                                       if turn["from"] == "human" else [])}
    f = _jsonl(tmp_path / "sg.jsonl", [good, bad])
    _, report = _read(f)
    assert report.errors == [f"{f}:2: {message}"]


# --- OpenAI chat rows -------------------------------------------------------------------------------------------

def test_openai_rows_with_content_parts_and_weights(tmp_path, tiny_model):
    from hwcompat import hfload
    from hwcompat.train.batching import IGNORE, tokenize_example

    f = _jsonl(tmp_path / "oa.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What color "}, {"type": "text", "text": "is the sky?"}]},
        {"role": "assistant", "content": "green", "weight": 0},
        {"role": "user", "content": "Wrong. Again?", "name": "ana"},
        {"role": "assistant", "content": "blue", "weight": 1}]}])
    rows, report = _read(f)
    assert report.ok, report.errors
    ex = rows[0]
    assert ex.messages[0] == ("user", "What color is the sky?") and ex.untrained == frozenset({1})
    tok = hfload.tokenizer(tiny_model)
    t = tokenize_example(tok, ex, chat=False)
    trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])
    assert "blue" in trained and "green" not in trained  # weight 0: context, not trained
    with_all = tokenize_example(tok, type(ex)(ex.messages, ex.file, ex.line), chat=False)
    assert "green" in tok.decode([i for i, lab in zip(with_all.input_ids, with_all.labels) if lab != IGNORE])


@pytest.mark.parametrize("message_json,message", [
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
     "messages[1].tool_calls: a tool call; hwcompat does not train tool use yet (each chat template writes tool calls "
     "its own way): drop the row, or its tool turns"),
    ({"role": "tool", "content": "42"}, "messages[1].role: a tool result; hwcompat does not train tool use yet"),
    ({"role": "assistant", "content": "x", "weight": 2}, "messages[1].weight: expected 0 (context, not trained) or "
                                                         "1, got 2"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "messages[1].content[0]: expected a text part {type: text, text}, got 'image_url'; hwcompat trains text only"),
    ({"role": "assistant", "content": "x", "weight": 0}, "messages: every assistant turn has weight 0: nothing to "
                                                         "train"),
])
def test_a_bad_openai_row_is_located_and_named(tmp_path, message_json, message):
    f = _jsonl(tmp_path / "oa.jsonl", [{"messages": [{"role": "user", "content": "q"}, message_json]}])
    _, report = _read(f)
    assert len(report.errors) == 1 and report.errors[0].startswith(f"{f}:1: {message}"), report.errors


# --- gzip JSONL -------------------------------------------------------------------------------------------------

def test_gzip_jsonl_reads_like_jsonl_and_locates_by_line(tmp_path):
    f = tmp_path / "train.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": ""}\n'))
    rows, report = _read(f)
    assert [r.messages for r in rows] == [(("user", "a"), ("assistant", "b"))]
    assert report.errors == [f"{f}:2: completion: empty"] and report.sources[str(f)] == "gzip JSONL"
    f.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b\\u0000"}\n' * 3)[:-9])  # cut short
    _, report = _read(f)
    assert report.errors == [f"{f}: the gzip stream is cut short (a partial download or copy?); nothing was read"]


# --- CSV / TSV --------------------------------------------------------------------------------------------------

def _csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def test_csv_with_a_column_mapping_and_a_multiline_cell(tmp_path):
    rows = [dict(QA[0], ticket="1"), {"question": "Two\nlines?", "answer": "yes", "ticket": "2"}, dict(QA[1], ticket="3")]
    f = _csv(tmp_path / "tickets.csv", rows)
    got, report = _read(f, columns=MAP)
    assert report.ok, report.errors
    assert [e.messages[1][1] for e in got] == ["blue", "yes", "green"]
    assert [e.line for e in got] == [2, 3, 5]  # the line each record starts on: the multi-line cell takes 3 and 4
    assert "(CSV, prompt/completion)" in report.render()


def test_a_bad_csv_row_names_its_line_and_a_wrong_mapping_lists_the_columns(tmp_path):
    f = tmp_path / "tickets.csv"
    f.write_text('question,answer\n"Sky?",blue\n"Two\nlines?",\n"Three?",x,extra\n')
    _, report = _read(f, columns=MAP)
    assert report.errors == [f"{f}:3: completion: empty",
                             f"{f}:5: 3 field(s), the header has 2; quote a cell that holds the delimiter or a line "
                             "break"]
    _, report = _read(f, columns={"prompt": "q", "completion": "answer"})
    assert report.errors == [f"{f}: columns: 'q' not in the file; its columns: answer, question"]
    _, report = _read(f)
    assert "needs columns: {prompt: YOUR_COLUMN, completion: YOUR_COLUMN}" in report.errors[0]
    f.write_bytes(b"question,answer\nSky?,bl\xe9\n")
    _, report = _read(f, columns=MAP)
    assert report.errors == [f"{f}:2: invalid UTF-8 (byte 0xe9); re-encode the file as UTF-8 (a spreadsheet's 'CSV "
                             "UTF-8' export)"]


def test_tsv(tmp_path):
    f = _csv(tmp_path / "t.tsv", [{"prompt": "a, b", "completion": "c"}], delimiter="\t")
    got, report = _read(f)
    assert report.ok and got[0].messages == (("user", "a, b"), ("assistant", "c")) and report.sources[str(f)] == "TSV"
    f.write_text("prompt\tcompletion\nok?\tyes\nbad\x00row\tno\n")
    _, report = _read(f)
    assert report.errors == [f"{f}:3: NUL byte (\\x00): the file is corrupted (often a scraper or an encoding bug); "
                             "remove the bytes or the row"]


# --- Parquet / Arrow / save_to_disk -----------------------------------------------------------------------------

def test_parquet_with_chat_rows_and_a_mapping(tmp_path, pq, pa):
    f = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": q["question"]},
                                                       {"role": "assistant", "content": q["answer"]}]} for q in QA]), f)
    got, report = _read(f)
    assert report.ok and len(got) == 4 and got[3].messages[1] == ("assistant", "red")
    assert "(Parquet, chat messages)" in report.render()
    g = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(QA), g, row_group_size=2)
    got, report = _read(g, columns=MAP)
    assert report.ok and [e.line for e in got] == [0, 1, 2, 3]


def test_a_bad_parquet_row_is_located_by_row_as_dataset_indexes_it(tmp_path, pq, pa):
    f = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(QA[:2] + [{"question": "Null?", "answer": None}]), f)
    _, report = _read(f, columns=MAP)
    assert report.errors == [f"{f}:row 2: completion: missing"]
    f.write_bytes(b"PAR1 not really")
    _, report = _read(f)
    assert report.errors[0].startswith(f"{f}: not a readable Parquet file (")


def _save_to_disk(pa, folder, rows):
    """The layout datasets' save_to_disk writes (an Arrow IPC stream per shard, listed in state.json); the real
    library is used below where it is installed."""
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    for i, part in enumerate((table.slice(0, 2), table.slice(2))):
        with pa.ipc.new_stream(folder / f"data-0000{i}-of-00002.arrow", table.schema) as w:
            w.write_table(part)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-0000{i}-of-00002.arrow"}
                                                                   for i in range(2)]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_a_save_to_disk_folder_and_an_arrow_file(tmp_path, pa):
    folder = _save_to_disk(pa, tmp_path / "ds", QA[:3] + [{"question": "Empty?", "answer": " "}])
    got, report = _read(folder, columns=MAP)
    assert [e.messages[1][1] for e in got] == ["blue", "green", "yellow"]
    assert report.errors == [f"{folder}:row 3: completion: empty"]  # rows counted across the shards
    got, report = _read(folder / "data-00000-of-00002.arrow", columns=MAP)
    assert report.ok and len(got) == 2 and report.sources[str(folder / "data-00000-of-00002.arrow")] == "Arrow"
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    _, report = _read(tmp_path / "dd")
    assert report.errors == [f"{tmp_path / 'dd'}: a DatasetDict folder; give one split's folder, e.g. "
                             f"{tmp_path / 'dd' / 'train'} or {tmp_path / 'dd' / 'test'}"]


def test_the_real_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "real"))
    got, report = _read(tmp_path / "real", columns=MAP)
    assert report.ok and [e.messages[1][1] for e in got] == [q["answer"] for q in QA]


def test_without_pyarrow_parquet_is_a_clear_error(tmp_path, monkeypatch, pq, pa):
    f = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(QA), f)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    _, report = _read(f, columns=MAP)
    assert report.errors == [f"{f}: Parquet and Arrow data need pyarrow: pip install pyarrow (or hwcompat[data]); or export "
                             "the data as JSONL"]


# --- DPO pairs in the same containers ---------------------------------------------------------------------------

def test_preference_pairs_in_parquet_and_csv(tmp_path, pq, pa):
    pairs = [{"q": "Sky?", "good": "blue", "bad": "green"}, {"q": "Sun?", "good": "yellow", "bad": "yellow"}]
    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), f)
    report = Report()
    got = read_pairs(f, report, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [p.chosen for p in got] == ["blue"]
    assert report.errors == [f"{f}:row 1: chosen and rejected are identical: the pair teaches nothing; fix or drop the "
                             "row"]
    g = _csv(tmp_path / "pairs.csv", pairs[:1])
    report = Report()
    got = read_pairs(g, report, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert report.ok and got[0].rejected == "green" and got[0].line == 2


# --- end to end -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_data_check_says_the_detected_format_and_a_csv_trains(tmp_path, tiny_model, run_cli):
    from tests.train.conftest import COLORS, make_config

    rows = [{"question": f"What color is the {k}?", "answer": v} for k, v in COLORS.items()] * 4
    train = _csv(tmp_path / "train.csv", rows)
    res = run_cli("data", "check", str(train), "--columns", "{prompt: question, completion: answer}")
    assert res.returncode == 0, res.stderr
    assert f"read 80 row(s) from {train} (CSV, prompt/completion)" in res.stdout
    cfg = make_config(tmp_path, tiny_model, train, train, max_steps=2, eval_at_start=False, eval_metrics="none",
                      columns={"prompt": "question", "completion": "answer"})
    res = run_cli("train", str(cfg), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    res = run_cli("train", str(cfg), "columns={prompt: q}", "--overwrite", timeout=300)
    assert res.returncode != 0 and f"{train}: columns: 'q' not in the file; its columns: answer, question" in res.stderr


@pytest.mark.parametrize("override,message", [
    ("columns={prompts: question}", "columns: 'prompts' is not a row field; the fields are prompt, completion"),
    ("columns=[a, b]", "columns: expected a mapping of field: column, e.g. columns={prompt: question, completion: "
                       "answer}"),
])
def test_a_bad_columns_setting_is_refused(tmp_path, override, message):
    from hwcompat.errors import InputError
    from hwcompat.train.config import load_config

    (tmp_path / "c.yaml").write_text("model: m\ntrain_data: [t.jsonl]\n")
    with pytest.raises(InputError) as e:
        load_config(tmp_path / "c.yaml", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("row, fmt, turns", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "messages",
     [("user", "Hi"), ("assistant", "Yo")]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, "sharegpt",
     [("user", "Hi"), ("assistant", "Yo")]),
    ({"prompt": "Hi", "completion": "Yo"}, "prompt_completion", [("user", "Hi"), ("assistant", "Yo")]),
    ({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", [("user", "Add\n\n1 2"), ("assistant", "3")]),
])
def test_every_format_is_one_row_of_the_format_table(tmp_path, row, fmt, turns):
    """#39 §3: one RowFormat per format (recognised, named, read as turns, a prompt-only row's answer key): the same
    rows the config's data_format vocabulary names, detected by 'auto' and read alike when named."""
    from hwcompat.choices import DATA_FORMATS
    from hwcompat.data import rows

    assert set(rows.FORMATS) == set(DATA_FORMATS) - {"auto"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for setting in ("auto", fmt):
        report = Report()
        got = read_jsonl(path, setting, report)
        assert not report.errors and [list(e.messages) for e in got] == [turns], (setting, got)
        assert report.formats[str(path)] == rows.FORMATS[fmt].label
