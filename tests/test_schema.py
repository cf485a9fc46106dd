"""#39 §2: one set of rules for a value a user wrote (hwcompat/schema.py), read by the config, the profiles and the
emulate files: the same mistake is said in the same words wherever it is made."""

import pytest
import yaml

from hwcompat import schema
from hwcompat.errors import InputError, ProfileError


@pytest.mark.parametrize("value,kind,said", [
    ("8", "integer", "expected an integer, got '8'"), (True, "integer", "expected an integer, got True"),
    (-1, "count", "must not be negative, got -1"), (True, "number", "expected a number, got True"),
    ("yes", "bool", "expected true or false, got 'yes'"), ("  ", "text", "expected a non-empty string, got '  '"),
    (["a", 1], "strings", "expected a list of strings, got ['a', 1]"), ([], "mapping", "expected a mapping, got []"),
])
def test_each_kind_says_what_it_expected_and_what_it_got(value, kind, said):
    assert schema.kind_problem(value, kind) == said


@pytest.mark.parametrize("value,kind", [(8, "integer"), (0, "count"), (1.5, "number"), (2, "number"),
                                        (False, "bool"), ("", "string"), ("x", "text"), ([], "strings"),
                                        ({}, "mapping")])
def test_a_value_of_its_kind_has_no_problem(value, kind):
    assert schema.kind_problem(value, kind) is None


def test_keys_and_choices():
    assert schema.unknown_key({"dtyp": 1, "name": 2}, ["dtype", "name"]) == ("dtyp", " (did you mean 'dtype'?)")
    assert schema.unknown_key({"zzz": 1}, ["dtype"]) == ("zzz", "")
    assert schema.missing_key({"a": ""}, ["a"]) == "a" and schema.missing_key({"a": ""}, ["a"], False) is None
    assert schema.choice_problem("fp8", ["float32", "bfloat16"]) == "'fp8' is not one of: float32, bfloat16"
    assert schema.choice_problem("float32", ["float32"]) is None


def test_the_three_readers_say_a_wrong_kind_in_the_same_words(tmp_path):
    """An integer field given text: the config, an emulate file and a profile say "expected an integer"."""
    from hwcompat.probe.emulate import parse_reading
    from hwcompat.profiles import load_profiles, parse_profile
    from hwcompat.train.config import config_from_dict

    with pytest.raises(InputError) as config:
        config_from_dict({"model": "m", "train_data": ["t.jsonl"], "lora_r": "eight"}, "c.yaml")
    with pytest.raises(InputError) as reading:
        parse_reading({"vendor": "cpu", "name": "x", "memory_bytes": "eight"}, "entry 1")
    raw = yaml.safe_load(open(load_profiles()["cpu"].path))
    with pytest.raises(ProfileError) as profile:
        parse_profile({**raw, "title": 8}, load_profiles()["cpu"].path)
    assert "lora_r: expected an integer, got 'eight'" in str(config.value)
    assert "field 'memory_bytes': expected an integer, got 'eight'" in str(reading.value)
    assert "title: expected a non-empty string, got 8" in str(profile.value)


def test_the_walker_names_the_path_through_mappings_and_lists():
    """One walker for every structure: a wrong value deep inside says where, as keys and list indices."""
    from hwcompat.schema import Field, Problem, Shape, check

    item = Shape({"name": Field("text", required=True), "size": Field("count")})
    top = Shape({"items": Field(each=item, required=True), "opt": Field("integer", null=True)})
    check({"items": [{"name": "a"}, {"name": "b", "size": 2}], "opt": None}, top)
    cases = [({"items": [{"name": "a"}, {"name": "b", "size": -1}]}, "items[1].size", "must not be negative, got -1"),
             ({"items": [{"nam": "a"}]}, "items[0].nam", "unknown key (did you mean 'name'?)"),
             ({"items": [{}]}, "items[0]", "missing required key 'name'"),
             ({}, "top", "missing required key 'items'"),
             ({"items": {}}, "items", "expected a list, got {}"),
             ({"items": [], "opt": "x"}, "opt", "expected an integer, got 'x'")]
    for value, where, why in cases:
        with pytest.raises(Problem) as e:
            check(value, top)
        assert (e.value.dotted("top"), e.value.why) == (where, why)
    check({"items": []}, top)
    with pytest.raises(Problem):
        check({"items": [{"name": "a"}], "opt": None}, Shape({"items": Field(each=item), "opt": Field("integer")}))
    assert top.loose().required() == [] and top.required() == ["items"]


def test_blank_is_missing_where_the_shape_says_so():
    from hwcompat.schema import Field, Problem, Shape, check

    with pytest.raises(Problem, match="missing required key 'a'"):
        check({"a": ""}, Shape({"a": Field("string", required=True)}, blank_is_missing=True))
    with pytest.raises(Problem, match="expected a non-empty string"):
        check({"a": ""}, Shape({"a": Field("text", required=True)}))


def test_the_reading_table_covers_every_field_a_user_may_set():
    """A field added to DeviceReading but not to the emulate table would be refused as unknown in every file."""
    from dataclasses import fields

    from hwcompat.probe.emulate import READING
    from hwcompat.readings import DeviceReading

    assert set(READING.fields) == {f.name for f in fields(DeviceReading)} - {"source", "emulated"}


def test_a_profile_variant_is_walked_like_the_profile(tmp_path):
    """The variant's overrides use the profile's own tables (loosened): a typo deep in one is named by its path."""
    from hwcompat.profiles import load_profiles, parse_profile

    path = load_profiles()["volta"].path
    raw = yaml.safe_load(open(path))
    raw["variants"] = [{"match": raw["match"], "note": "n", "hardware": {"bf17": True}}]
    with pytest.raises(ProfileError, match=r"variants\[0\]\.hardware\.bf17: unknown key \(did you mean 'bf16'\?\)"):
        parse_profile(raw, path)
    raw["variants"] = [{"match": raw["match"], "note": "n", "hardware": {"bf16": True}}]
    assert parse_profile(raw, path).variants[0].fields["hardware"] == {"bf16": True}


def test_a_dataclass_is_its_own_table():
    """The run spec's records (machine-written, read back in every worker) are walked by the same walker, their
    table made from the annotations; an annotation the walker cannot say fails when the table is made."""
    from dataclasses import dataclass, field
    from typing import Any

    from hwcompat.schema import Problem, check, shape_of

    @dataclass
    class Rec:
        name: str
        peaks: dict[str, float] = field(default_factory=dict)
        tags: list[str] = field(default_factory=list)
        limit: int | None = None
        extra: Any = None

    shape = shape_of(Rec)
    assert shape.required() == ["name"]
    check({"name": "x", "peaks": {"bf16": 1, "fp32": 2.5}, "tags": ["a"], "limit": None, "extra": [1]}, shape)
    for value, where, why in [({"name": 1}, "name", "expected a string, got 1"),
                              ({"name": "x", "peaks": {"bf16": "fast"}}, "peaks.bf16", "expected a number, got 'fast'"),
                              ({"name": "x", "tags": "a"}, "tags", "expected a list, got 'a'"),
                              ({"name": "x", "limit": 1.5}, "limit", "expected an integer, got 1.5")]:
        with pytest.raises(Problem) as e:
            check(value, shape)
        assert (e.value.dotted(), e.value.why) == (where, why)

    @dataclass
    class Odd:
        either: int | str

    with pytest.raises(TypeError, match="no schema kind"):
        shape_of(Odd)
