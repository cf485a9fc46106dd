"""#41 §1: a CPU with native bf16 trains in bf16 autocast by default, and that training tracks fp32.

The CPU is emulated from its flags (an ``--emulate-file`` reading, the path a real /proc/cpuinfo takes), so the test
runs the same on any CI CPU; torch's bf16 arithmetic is the same format whether oneDNN runs it natively or not.
Tolerances from the measurement, with room: on this tiny task at its high learning rate (0.02, 40 steps) the two
runs measured a first-5-steps gap of 0.10, a mean per-step gap of 0.11 (single steps up to 0.68: at this rate a
step's batch loss swings by 1.0 between neighbours in either precision), last-10-step means 0.85 vs 0.89, final eval
losses 0.713 vs 0.746 and the same accuracy (0.25).
"""

import json

import pytest
import yaml

from tests.train.conftest import BF16_CPU, make_config

pytestmark = pytest.mark.slow

AVX2_CPU = {**BF16_CPU, "name": "Emulated AVX2 CPU", "cpu_flags": ["avx", "avx2", "fma"]}


def _emulate_file(tmp_path, reading):
    path = tmp_path / f"{reading['name'].split()[1]}.yaml"
    path.write_text(yaml.safe_dump([reading]))
    return path


def _train(run_cli, tmp_path, name, model, task_files, reading, **extra):
    folder = tmp_path / name
    folder.mkdir()
    cfg = make_config(folder, model, *task_files, **extra)
    res = run_cli("train", str(cfg), "--emulate-file", str(_emulate_file(folder, reading)), timeout=600)
    return res, folder / "run"


def _losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def test_bf16_is_the_default_on_a_bf16_cpu_and_tracks_fp32(run_cli, tmp_path, tiny_model, task_files):
    res16, run16 = _train(run_cli, tmp_path, "bf16", tiny_model, task_files, BF16_CPU)
    res32, run32 = _train(run_cli, tmp_path, "fp32", tiny_model, task_files, BF16_CPU, dtype="float32")
    assert res16.returncode == 0, res16.stderr[-3000:]
    assert res32.returncode == 0, res32.stderr[-3000:]
    s16, s32 = (json.loads((r / "summary.json").read_text()) for r in (run16, run32))
    assert (s16["dtype"], s32["dtype"]) == ("bfloat16", "float32")
    assert "profile cpu (bfloat16" in res16.stderr
    why = json.loads((run16 / "profile.json").read_text())["reasons"]["dtype"]
    assert "avx512_bf16" in why and "fp32 master weights" in why
    l16, l32 = _losses(run16), _losses(run32)
    assert len(l16) == len(l32) == 40 and l16 != l32  # really two precisions, not one run twice
    gaps = [abs(a - b) for a, b in zip(l16, l32)]
    assert max(gaps[:5]) < 0.2 and sum(gaps) / len(gaps) < 0.25
    assert abs(sum(l16[-10:]) - sum(l32[-10:])) / 10 < 0.15
    e16, e32 = s16["eval_after"], s32["eval_after"]
    assert e32["eval_loss"] < s32["eval_before"]["eval_loss"] / 4  # fp32 learned the task ...
    assert abs(e16["eval_loss"] - e32["eval_loss"]) < 0.1  # ... and bf16 ended where fp32 did
    assert e16["accuracy"] >= e32["accuracy"] - 0.1
    import safetensors.torch as st

    adapter = st.load_file(str(run16 / "adapter" / "adapter_model.safetensors"))
    assert {str(t.dtype) for t in adapter.values()} == {"torch.float32"}  # fp32 master weights, saved as such


def test_bf16_on_a_cpu_without_it_is_refused_before_loading(run_cli, tmp_path, tiny_model, task_files):
    res, run = _train(run_cli, tmp_path, "avx2", tiny_model, task_files, AVX2_CPU, dtype="bfloat16")
    assert res.returncode == 2
    assert "dtype=bfloat16: Emulated AVX2 CPU (cpu) has no bf16 hardware (no avx512_bf16 or amx_bf16" in res.stderr
    assert "pytorch/pytorch#146508" in res.stderr and "Traceback" not in res.stderr
    assert not (run / "metrics.jsonl").exists()
