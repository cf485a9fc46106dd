"""#35: the data containers read every row or refuse: multi-member gzip, bounded gunzip, one TSV quoting rule,
Arrow's null weights, ShareGPT weights, a real digest for a save_to_disk folder, metadata of odd shapes, a columns
mapping checked at every row, and table rows located as ``file:row N`` in every warning. Each test failed on the
code before it."""

import gzip
import json
import time
import tracemalloc

import pytest

from hwcompat.data.problems import Report
from hwcompat.data.rows import load_datasets, read_jsonl

ROW = b'{"prompt": "What color is the sky?", "completion": "blue"}\n'


def _read(path, fmt="auto", columns=None):
    report = Report()
    return read_jsonl(path, fmt, report, columns=columns), report


def _jsonl_rows(n, start=0):
    return b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n"
                    for i in range(start, start + n))


# --- 4: every gzip member, nothing after the last -------------------------------------------------------------

def test_a_multi_member_gzip_reads_every_member(tmp_path):
    f = tmp_path / "joined.jsonl.gz"
    f.write_bytes(gzip.compress(_jsonl_rows(3)) + gzip.compress(_jsonl_rows(4, 3)))  # cat a.gz b.gz
    rows, report = _read(f)
    assert report.ok, report.errors
    assert [r.messages[0][1] for r in rows] == [f"q{i}" for i in range(7)]
    assert [r.line for r in rows] == list(range(1, 8))  # lines counted across members, as zcat shows them


def test_a_member_boundary_inside_a_line_joins_the_line(tmp_path):
    data = _jsonl_rows(2)
    f = tmp_path / "split.jsonl.gz"
    f.write_bytes(gzip.compress(data[:20]) + gzip.compress(data[20:]))  # bgzip cuts blocks anywhere
    rows, report = _read(f)
    assert report.ok and len(rows) == 2


def test_bytes_after_the_gzip_stream_are_refused(tmp_path):
    f = tmp_path / "trailing.jsonl.gz"
    f.write_bytes(gzip.compress(_jsonl_rows(2)) + b"garbage that is not gzip")
    _, report = _read(f)
    assert len(report.errors) == 1
    assert "24 byte(s) after the gzip data" in report.errors[0] and "not gzip" in report.errors[0]


# --- 5: memory and time bounded ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_gunzip_streams_rows_instead_of_holding_the_file(tmp_path):
    from hwcompat.data.sources import rows

    f = tmp_path / "big.jsonl.gz"
    f.write_bytes(gzip.compress(ROW * 200_000, 1))  # 11 MB of rows
    tracemalloc.start()
    n = sum(1 for _ in rows(f, Report()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 200_000 and peak < 8 << 20, peak  # one chunk and a line at a time, not 11 MB joined + split


def test_a_gzip_of_blank_lines_is_refused_early(tmp_path):
    f = tmp_path / "blank.jsonl.gz"
    import zlib

    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    f.write_bytes(b"".join([z.compress(b"\n" * (1 << 20)) for _ in range(300)] + [z.flush()]))  # ~300 KB
    size = f.stat().st_size
    t = time.monotonic()
    _, report = _read(f)
    assert time.monotonic() - t < 30
    assert len(report.errors) == 1 and "over 200x its size" in report.errors[0], (size, report.errors)
    assert "gunzip it" in report.errors[0]


# --- 6: one quoting rule, said --------------------------------------------------------------------------------

def test_a_tsv_cell_starting_with_a_quote_is_said_with_its_line(tmp_path):
    f = tmp_path / "q.tsv"
    f.write_text('prompt\tcompletion\nsay "hi"\tok\n"quoted" text\tfine\n')
    rows, report = _read(f)
    assert report.ok and [r.messages[0][1] for r in rows] == ['say "hi"', "quoted text"]
    assert report.warnings["TSV quoting"] == [f"{f}:3: a cell starts with a double quote and was read quote-aware, "
                                              "as pandas and datasets read TSV (its quotes removed)"]
    assert '(TSV read quote-aware as pandas reads it: a cell may be quoted with ", prompt/completion)' in report.render()


@pytest.mark.parametrize("suffix,delim", [(".tsv", "\t"), (".csv", ",")])
def test_an_unclosed_quote_is_an_error_at_the_line_it_opened(tmp_path, suffix, delim):
    f = tmp_path / f"u{suffix}"
    f.write_text(f"prompt{delim}completion\na{delim}b\n\"never closed{delim}x\nc{delim}d\ne{delim}f\n")
    _, report = _read(f)
    assert report.errors == [f"{f}:3: a quoted cell opens on this line and is never closed, so lines 3-5 read as one "
                             "cell; close the quote, or write a quote that is text as \"\" inside a quoted cell"]
    assert "quote a cell" not in report.render()


def test_a_semicolon_csv_is_told_its_delimiter(tmp_path):
    f = tmp_path / "eu.csv"
    f.write_text("prompt;completion\nWhat?;That.\n")
    _, report = _read(f)
    assert len(report.errors) == 1 and "separated by ';': hwcompat reads CSV separated by commas" in report.errors[0]
    assert "columns" not in report.errors[0]


def test_a_csv_gz_is_read_as_csv(tmp_path):
    f = tmp_path / "t.csv.gz"
    f.write_bytes(gzip.compress(b'prompt,completion\n"a, b",c\nd,e\n'))
    rows, report = _read(f)
    assert report.ok, report.errors
    assert [r.messages[0][1] for r in rows] == ["a, b", "d"] and report.sources[str(f)] == "gzip CSV"
    p = tmp_path / "t.parquet.gz"
    p.write_bytes(gzip.compress(b"PAR1"))
    _, report = _read(p)
    assert "gunzip it and pass the plain file" in report.errors[0]


# --- 7: weights as Arrow writes them, ShareGPT weights ----------------------------------------------------------

def test_openai_weights_in_parquet_with_arrow_nulls(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    f = tmp_path / "oa.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)  # every message gets weight: null where it had none
    got, report = _read(f)
    assert report.ok, report.errors
    assert [g.untrained for g in got] == [frozenset({1}), frozenset()]


def test_sharegpt_weight_zero_is_not_trained(tmp_path, tiny_model):
    from hwcompat import hfload
    from hwcompat.train.batching import IGNORE, tokenize_example

    f = tmp_path / "sg.jsonl"
    f.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "wrong", "weight": 0},
        {"from": "human", "value": "Again"}, {"from": "gpt", "value": "right", "weight": 1}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "a", "weight": 0},
                                        {"from": "gpt", "value": "b"}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b",
                                                                         "weight": 0}]}) + "\n")
    got, report = _read(f)
    assert got[0].untrained == frozenset({1})
    assert report.errors == [f"{f}:2: conversations[0].weight: only an assistant turn has a weight",
                             f"{f}:3: conversations: every assistant turn has weight 0: nothing to train"]
    tok = hfload.tokenizer(tiny_model)
    t = tokenize_example(tok, got[0], chat=False)
    trained = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])
    assert "right" in trained and "wrong" not in trained


# --- 8, 15: save_to_disk folders --------------------------------------------------------------------------------

def _save_to_disk(tmp_path, rows):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def test_a_save_to_disk_folder_has_a_real_digest(tmp_path):
    from hwcompat.fingerprint import changed_inputs, data_digest

    folder = _save_to_disk(tmp_path, [{"prompt": "a", "completion": "b"}])
    before = data_digest(folder)
    assert before != "missing" and before == data_digest(folder)
    _save_to_disk(tmp_path, [{"prompt": "a", "completion": "CHANGED"}])
    after = data_digest(folder)
    assert after != before
    assert changed_inputs({"data": {str(folder): before}}, {"data": {str(folder): after}}) == [
        f"the content of {folder}"]


@pytest.mark.parametrize("name,content", [
    ("state.json", {"_data_files": "data.arrow"}),
    ("state.json", {"_data_files": ["data.arrow"]}),
    ("state.json", {"_data_files": [1, None]}),
    ("state.json", {"_data_files": {"filename": "x.arrow"}}),
    ("dataset_dict.json", {"splits": "train"}),
    ("dataset_dict.json", {"splits": [1, {"a": 2}]}),
])
def test_save_to_disk_metadata_of_odd_shapes_is_a_clear_error(tmp_path, name, content, run_cli):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / name).write_text(json.dumps(content))
    if name == "state.json":
        (folder / "data.arrow").write_bytes(b"")
    r = run_cli("data", "check", str(folder))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # data check: 1 = the data has errors
    assert str(folder) in r.stdout + r.stderr


# --- 16: a columns mapping checked at every row -----------------------------------------------------------------

def test_a_later_row_without_the_mapped_column_is_located(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"q": "a", "ans": "b"}\n{"q": "c"}\n{"q": "e", "ans": "f"}\n')
    rows, report = _read(f, columns={"prompt": "q", "completion": "ans"})
    assert len(rows) == 2
    assert report.errors == [f"{f}:2: 'ans' missing (columns maps completion to it)"]


@pytest.mark.parametrize("field", ["role", "weight", "from"])
def test_a_deeply_nested_value_is_named_not_dumped(tmp_path, field):
    deep = "[" * 990 + "]" * 990
    turn = ('{"from": %s, "value": "x"}' if field == "from" else
            '{"role": "assistant", "content": "b", "weight": %s}' if field == "weight" else '{"role": %s}') % deep
    key = "conversations" if field == "from" else "messages"
    f = tmp_path / "t.jsonl"
    f.write_text('{"%s": [{"role": "user", "content": "a", "from": "human", "value": "a"}, %s]}\n' % (key, turn))
    rows, report = _read(f)
    assert not rows and len(report.errors) == 1 and len(report.errors[0]) < 300, report.errors
    assert "nested too deeply" in report.errors[0] or "[[[[[" in report.errors[0]


# --- 20: table rows located as file:row N ------------------------------------------------------------------------

def test_duplicate_and_leak_warnings_name_table_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "same", "completion": "x"}, {"prompt": "other", "completion": "y"},
            {"prompt": "same", "completion": "x"}]
    f = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    e = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "other", "completion": "z"}]), e)
    _, _, report = load_datasets([str(f)], [str(e)], "auto", 0.1, 0)
    assert report.warnings["exact duplicates in train"] == [f"{f}:row 2 repeats row 0"]
    assert report.warnings["eval rows also in train"] == [f"{e}:row 0 = {f}:row 1"]
