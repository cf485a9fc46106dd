"""Garbage in a config is refused with a clear message (never a traceback, never a hang, never exit 0)."""

import subprocess
import sys
import time

import pytest

from hwcompat.errors import InputError
from hwcompat.train.config import load_config
from tests.train.conftest import make_config, prepare_run

BASE = "model: m\ntrain_data: [t.jsonl]\n"


def _load(tmp_path, text, *overrides):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, list(overrides))


@pytest.mark.parametrize("text,overrides,message", [
    (BASE + "lora_r:\n", (), "lora_r: expected an integer, got None"),
    (BASE + "lora_r: [16, 32]\n", (), "lora_r: expected an integer, got [16, 32]"),
    (BASE + "lora_r: {a: 1}\n", (), "lora_r: expected an integer, got {'a': 1}"),
    (BASE + "epochs: .inf\n", (), "epochs: must be a finite number, got inf"),
    (BASE + "learning_rate: .inf\n", (), "learning_rate: must be a finite number, got inf"),
    (BASE + "learning_rate: .nan\n", (), "learning_rate: must be a finite number, got nan"),
    (BASE, ("max_grad_norm=-1",), "max_grad_norm: must be in (0, 1e6], got -1.0 (the clipping threshold"),
    (BASE, ("eval_max_new_tokens=-1",), "eval_max_new_tokens: must be in [0, 1048576], got -1"),
    (BASE, ("eval_max_rows=0",), "eval_max_rows: must be in [1, 1e7], got 0"),
    (BASE, ("weight_decay=-0.1",), "weight_decay: must be in [0, 10], got -0.1"),
    (BASE, ("max_seq_len=" + "9" * 5000,), "max_seq_len: expected an integer, got '999999"),
    (BASE + "max_seq_len: " + "9" * 5000 + "\n", (), "a value cannot be read (Exceeds the limit"),
])
def test_bad_values_are_refused_with_the_key(tmp_path, text, overrides, message):
    with pytest.raises(InputError) as e:
        _load(tmp_path, text, *overrides)
    assert message in str(e.value), str(e.value)
    assert len(str(e.value)) < 400  # a bounded excerpt, never the whole value


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    start = time.time()
    with pytest.raises(InputError, match="alias bomb"):
        _load(tmp_path, BASE + bomb)
    assert time.time() - start < 5


def test_alias_bomb_as_a_value_gets_a_bounded_message(tmp_path):
    """Below the expansion limit, a bad value built from aliases is still shown as an excerpt."""
    text = BASE + "lora_r: [&x [1, 2, 3, 4], &y [*x, *x, *x, *x], *y, *y, *y]\n"
    with pytest.raises(InputError) as e:
        _load(tmp_path, text)
    assert "lora_r: expected an integer" in str(e.value) and len(str(e.value)) < 300


def test_deep_nesting_is_an_error_not_a_recursion_traceback(tmp_path):
    with pytest.raises(InputError, match="nests more than 200 levels deep"):
        _load(tmp_path, BASE + "x: " + "[" * 100_000 + "]" * 100_000 + "\n")


def test_detect_emulate_file_alias_bomb(tmp_path, run_cli):
    lines = ["- &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for i in range(1, 9):
        lines.append(f"- &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    f = tmp_path / "devs.yaml"
    f.write_text("\n".join(lines) + "\n")
    start = time.time()
    res = run_cli("detect", "--emulate-file", str(f), timeout=60)
    assert res.returncode == 2 and "alias bomb" in res.stderr and "Traceback" not in res.stderr
    assert time.time() - start < 30


def test_nan_loss_stops_the_run_before_it_writes_an_adapter(tmp_path, tiny_model, task_files, monkeypatch):
    from hwcompat.errors import HwcompatError
    from hwcompat.train import loop
    from hwcompat.train.objectives.sft import ResponseLoss

    run_dir = prepare_run(make_config(tmp_path, tiny_model, *task_files, max_steps=20, eval_at_start=False,
                                      eval_metrics="none"))
    real = ResponseLoss.__call__
    monkeypatch.setattr(ResponseLoss, "__call__", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(HwcompatError) as e:
        loop.run(run_dir)
    assert str(e.value).startswith("training diverged: loss nan and gradient norm nan were not finite for 3 steps "
                                   "in a row (at step 3); no adapter was written. Try a lower learning_rate")
    assert not (run_dir / "adapter").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["config"].update(lora_rank=s["config"].pop("lora_r")),
     "unknown key 'lora_rank'; did you mean 'lora_r'"),
    (lambda s: s["config"].update(lora_r="sixteen"), "lora_r: expected an integer, got 'sixteen'"),
    (lambda s: s["config"].update(learning_rate=-1), "learning_rate: must be in (0, 1], got -1"),
    (lambda s: s.pop("profile"), "profile missing or not a mapping"),
])
def test_run_json_is_validated_again_when_the_trainer_reads_it(tmp_path, tiny_model, task_files, edit, message):
    """run.json crosses the process boundary: the worker checks it as strictly as the launcher did."""
    import json

    run_dir = prepare_run(make_config(tmp_path, tiny_model, *task_files, max_steps=1))
    spec = json.loads((run_dir / "run.json").read_text())
    edit(spec)
    (run_dir / "run.json").write_text(json.dumps(spec))
    res = subprocess.run([sys.executable, "-m", "hwcompat.pipeline.worker", str(run_dir)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]
