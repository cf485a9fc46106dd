"""#27: `key=value` overrides take YAML flow lists (`train_data=[a.jsonl,b.jsonl]`), as Hydra/torchtune users type
them; the comma form still works, and a bad flow list is refused with the key and the two forms that work."""

import re
import pytest

from tests import cli

from hwcompat.errors import InputError
from hwcompat.train.config import load_config

BASE = "model: m\ntrain_data: [t.jsonl]\n"


def _load(tmp_path, *overrides):
    p = tmp_path / "c.yaml"
    p.write_text(BASE)
    return load_config(p, list(overrides)).config


@pytest.mark.parametrize("override,expected", [
    ("train_data=[a.jsonl,b.jsonl]", ["a.jsonl", "b.jsonl"]),
    ("train_data=[a.jsonl, 'my data/b.jsonl']", ["a.jsonl", "my data/b.jsonl"]),
    ("train_data=a.jsonl,b.jsonl", ["a.jsonl", "b.jsonl"]),
    ("eval_data=[]", []),
    ("lora_target_modules=[q_proj, v_proj]", ["q_proj", "v_proj"]),
])
def test_flow_lists_and_the_comma_form_give_the_same_list(tmp_path, override, expected):
    cfg = _load(tmp_path, override)
    key = override.split("=")[0]
    assert getattr(cfg, key) == expected


@pytest.mark.parametrize("override,message", [
    ("train_data=[a.jsonl, [b.jsonl]]", "train_data: expected a list of strings, e.g. train_data=[a.jsonl,b.jsonl]"),
    ("train_data=[a.jsonl, {x: 1}]", "train_data: expected a list of strings"),
    ("train_data=[a.jsonl, b.jsonl", "train_data: '[a.jsonl, b.jsonl' is not a YAML flow list"),
])
def test_a_bad_flow_list_is_refused_with_the_key_and_the_forms_that_work(tmp_path, override, message):
    with pytest.raises(InputError) as e:
        _load(tmp_path, override)
    assert message in str(e.value) and str(e.value).startswith("command line"), str(e.value)


def test_the_cli_takes_a_flow_list_as_typed(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(BASE)
    res = run_cli("train", str(tmp_path / "c.yaml"), "train_data=[a.jsonl, b.jsonl]", "--print-config")
    assert res.returncode == 0, res.stderr
    assert re.search(r'^train_data +: \["a.jsonl", "b.jsonl"\]  # command line$', res.stdout, re.M)


# --- #35 family 17 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train_data=[a.jsonl,\x07b.jsonl]", "is not a YAML flow list (unacceptable character"),
    ("train_data=[a.jsonl,\udcffb.jsonl]", "is not a YAML flow list ("),  # a byte not UTF-8, as argv decodes it
    ("train_data=" + "[" * 3000 + "]" * 3000, "train_data: expected a list of strings"),
    ("report_to=[tensorboard, [mlflow]]", "report_to: expected a list of strings, e.g. report_to=[tensorboard,mlflow]"),
])
def test_a_flow_list_with_a_control_byte_or_deep_nesting_is_refused_in_one_line(tmp_path, override, message):
    with pytest.raises(InputError) as e:
        _load(tmp_path, override)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "a.jsonl" not in str(e.value).split("e.g.")[-1] or not override.startswith("report_to")


def test_a_non_utf8_override_on_the_real_command_line_is_one_clear_error(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(BASE)
    res = cli.run("train", tmp_path / "c.yaml", b"train_data=[a.jsonl,\xffb.jsonl]", "--print-config", text=False)
    assert res.returncode == 2 and b"Traceback" not in res.stderr, res.stderr
    assert b"train_data" in res.stderr and b"is not a YAML flow list" in res.stderr
