"""#39: the plan's verdict is a question (pipeline/fit.py ``plan_run`` changes nothing in the config) and
``apply_plan`` is the one place its decisions enter the config, each with its origin."""

import argparse
import copy

import pytest
import yaml

from tests.train.conftest import BF16_CPU, make_config


def _setup(tmp_path, model, task_files, memory_gib, **extra):
    from hwcompat.cli.common import plan_from_args
    from hwcompat.pipeline import launch
    from hwcompat.profiles import load_profiles
    from hwcompat.software import installed
    from hwcompat.train.config import load_config

    emulate = tmp_path / "cpu.yaml"
    emulate.write_text(yaml.safe_dump([{**BF16_CPU, "memory_bytes": memory_gib * 2**30}]))
    loaded = load_config(make_config(tmp_path, model, *task_files, **extra))
    plan = plan_from_args(argparse.Namespace(emulate=None, emulate_file=str(emulate), profile=None, set=[]))
    _, device = launch.training_device(plan, None)
    profile, _, _ = launch.apply_profile(loaded, device, load_profiles(), installed(), None)
    return loaded, device, profile, plan


def test_the_verdict_changes_nothing_and_apply_plan_writes_each_decision_with_its_origin(tmp_path, tiny_model,
                                                                                        task_files):
    from hwcompat.pipeline import fit

    loaded, device, profile, plan = _setup(tmp_path, tiny_model, task_files, 6, max_seq_len=4096,
                                           micro_batch_size=16)
    before = copy.deepcopy((loaded.config, loaded.origins, loaded.planned_peak_bytes))
    verdict = fit.plan_run(loaded, device, profile, 1.0, plan.host_ram_bytes)
    assert (loaded.config, loaded.origins, loaded.planned_peak_bytes) == before  # a question, not an edit
    assert verdict.refusal is None and verdict.peak_bytes > 0
    assert verdict.decided["attention"][0] == "sdpa" and "S^2 probabilities do not fit" in verdict.decided[
        "attention"][1]
    assert verdict.decided["offload"] == ("none", "plan (offload: auto)")
    note = fit.apply_plan(loaded, device, profile, plan, 1.0)
    assert note == verdict.note
    for key, (value, origin) in verdict.decided.items():
        assert getattr(loaded.config, key) == value and loaded.origins[key] == origin
    assert (loaded.planned_peak_bytes, loaded.planned_allocated_bytes) == (verdict.peak_bytes,
                                                                           verdict.allocated_bytes)
    assert fit.planned_profile(loaded, profile).attention == "sdpa"


def test_a_run_that_will_not_fit_is_refused_and_its_config_left_as_the_user_wrote_it(tmp_path, tiny_model,
                                                                                    task_files):
    from hwcompat.errors import HwcompatError
    from hwcompat.pipeline import fit

    loaded, device, profile, plan = _setup(tmp_path, tiny_model, task_files, 1, max_seq_len=8192,
                                           micro_batch_size=64, attention="sdpa")
    before = copy.deepcopy((loaded.config, loaded.origins))
    said = fit.apply_plan(loaded, device, profile, plan, 1.0)  # --print-config: the refusal is the note
    assert said.startswith(f"this run will not fit on {device.reading.name}: plan: peak") and "Change:" in said
    assert (loaded.config, loaded.origins) == before
    with pytest.raises(HwcompatError) as e:
        fit.apply_plan(loaded, device, profile, plan, 1.0, strict=True)
    assert str(e.value) == said
