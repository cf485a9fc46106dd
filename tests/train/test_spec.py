"""The run spec (run.json) is the one typed record that crosses into the trainer; it is checked on load."""

import json

import pytest

from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedProfile
from hwcompat.train.config import TrainConfig
from hwcompat.train.spec import RunSpec, TrainDevice, load_spec
from tests.train.conftest import make_config, prepare_run


@pytest.fixture
def run_json(tmp_path, tiny_model, task_files):
    return prepare_run(make_config(tmp_path, tiny_model, *task_files, max_steps=1)) / "run.json"


def test_the_launchers_spec_loads_typed(run_json):
    spec = load_spec(run_json)
    assert isinstance(spec, RunSpec) and isinstance(spec.config, TrainConfig)
    assert isinstance(spec.profile, ResolvedProfile) and spec.profile.name == "cpu"
    assert spec.device == TrainDevice(kind="cpu", vendor="cpu", name=spec.device.name, emulated=False)
    assert spec.config.output_dir == str(run_json.parent)
    assert RunSpec(**{**spec.__dict__}).to_dict() == json.loads(run_json.read_text())  # a lossless round trip


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["profile"].update(data_type=s["profile"].pop("dtype")), "profile.data_type: unknown key"),
    (lambda s: s["profile"].pop("attention"), "profile: missing required key 'attention'"),
    (lambda s: s["profile"].update(env=["PYTORCH_CUDA_ALLOC_CONF"]),
     "profile.env: expected a mapping, got ['PYTORCH_CUDA_ALLOC_CONF']"),
    (lambda s: s["profile"].update(quantization="nf4"), "profile.quantization: expected a list, got 'nf4'"),
    (lambda s: s["device"].update(kind=7), "device.kind: expected a string, got 7"),
    (lambda s: s.pop("device"), "device missing or not a mapping"),
    (lambda s: s.update(cpu_emulation="yes"), "cpu_emulation: expected true or false, got 'yes'"),
    (lambda s: s.update(resume_from=3), "resume_from: unknown key"),
    (lambda s: s["config"].update(optimiser="adamw"), "unknown key 'optimiser'; did you mean 'optimizer'"),
    (lambda s: s["config"].update(method="ppo"), "method: 'ppo' is not one of: sft, dpo"),
])
def test_a_renamed_or_wrongly_typed_field_is_a_clear_error(run_json, edit, message):
    spec = json.loads(run_json.read_text())
    edit(spec)
    run_json.write_text(json.dumps(spec))
    with pytest.raises(InputError) as e:
        load_spec(run_json)
    assert message in str(e.value) and str(run_json) in str(e.value)
    if ": config:" not in str(e.value):  # the spec's own fields also say how to recover
        assert "start the run again with hwcompat train CONFIG" in str(e.value)


def test_damaged_spec(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read the run's record"):
        load_spec(tmp_path / "run.json")
