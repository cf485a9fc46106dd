"""#39: summary.json has one typed schema (hwcompat/summary.py) for its writer and its five readers: a field of the
wrong kind is said with its name, an older summary reads with defaults, and a newer one's keys survive a rewrite."""

import dataclasses
import json
import math

import pytest

from hwcompat import summary as summary_file
from hwcompat.errors import InputError


def _written(**fields) -> dict:
    s = summary_file.Summary(steps=4, total_steps=4, tokens_per_s=812.5, peak_memory_bytes=3 * 2**30,
                             eval_before={"step": 0, "eval_loss": 1.2}, eval_after={"step": 4, "eval_loss": 0.7},
                             regressed=(summary_file.Regression("exact_match", 0.5, 0.3, 20.0),), **fields)
    return json.loads(json.dumps(s.to_json()))


def test_what_the_writer_writes_reads_back_equal(tmp_path):
    s = summary_file.Summary(steps=7, final_train_loss=0.25, cpu_allocator="tcmalloc", planned_peak_bytes=5,
                             regressed=(summary_file.Regression("accuracy", 0.9, 0.7, 20.0),))
    summary_file.write(tmp_path, s)
    assert summary_file.read(tmp_path) == s
    assert summary_file.read(tmp_path / "elsewhere") is None  # no summary: the run did not finish


def test_every_field_of_the_schema_is_written_and_the_guard_flags_read_as_merge_prints_them():
    data = _written()
    assert set(data) == {f.name for f in dataclasses.fields(summary_file.Summary)} - {"extra", "forgetting"}
    assert data["regressed"] == [{"metric": "exact_match", "before": 0.5, "after": 0.3, "drop_points": 20.0}]
    assert summary_file.parse(data).flags() == ["exact_match 0.5 -> 0.3"]
    older = {"regressed": [{"metric": "exact_match", "before": 0.5, "after": 0.2}]}  # before drop_points was written
    assert summary_file.parse(older).regressed == (summary_file.Regression("exact_match", 0.5, 0.2, 30.0),)


def test_an_older_summary_reads_with_defaults_and_a_newer_ones_keys_are_kept(tmp_path):
    old = {"steps": 3, "tokens_per_s": 10, "eval_after": {"eval_loss": 1.0}}  # an int where a float goes is fine
    s = summary_file.parse(old)
    assert (s.steps, s.tokens_per_s, s.output, s.regressed) == (3, 10, "adapter", ())
    assert math.isnan(s.final_train_loss)
    newer = {**_written(), "a_future_field": {"x": 1}}
    summary_file.write(tmp_path, dataclasses.replace(summary_file.parse(newer), forgetting={"kl": 0.01}))
    back = json.loads((tmp_path / "summary.json").read_text())
    assert back["a_future_field"] == {"x": 1} and back["forgetting"] == {"kl": 0.01}


@pytest.mark.parametrize("field,value,said", [
    ("steps", "4", "field 'steps' is '4', expected int"),
    ("steps", True, "field 'steps' is True, expected int"),
    ("tokens_per_s", "fast", "field 'tokens_per_s' is 'fast', expected float"),
    ("eval_after", [1], "field 'eval_after' is [1], expected dict"),
    ("regressed", {"metric": "x"}, "expected a list of flagged metrics"),
    ("regressed", [{"metric": "x"}], "a 'regressed' entry is {'metric': 'x'}, expected metric, before and after"),
    ("regressed", [3], "a 'regressed' entry is 3"),
])
def test_a_field_of_the_wrong_kind_is_named_with_the_file(tmp_path, field, value, said):
    (tmp_path / "summary.json").write_text(json.dumps({**_written(), field: value}))
    with pytest.raises(InputError) as e:
        summary_file.read(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'summary.json'}: ") and said in str(e.value)
