"""#35 family 18 / #36: QLoRA through the shipped trainer on the CPU (--cpu-emulation of a card with NF4): it used
to end in a traceback (the model load mapped the CPU to accelerator 0). bitsandbytes' own CPU NF4 kernels run it."""

import json

import pytest

from tests.train.conftest import make_config

pytest.importorskip("bitsandbytes")


@pytest.mark.slow
def test_qlora_trains_under_cpu_emulation(tmp_path, tiny_model, task_files, run_cli):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=3, qlora=True, eval_metrics="none",
                      eval_at_start=False)
    res = run_cli("train", str(cfg), "--emulate", "rtx4090", "--cpu-emulation", timeout=600)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "Skipping publisher trust check" not in res.stderr  # #40 §5: the kernels package's line on every run
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    spec = json.loads((run / "run.json").read_text())
    assert spec["config"]["qlora"] is True and spec["cpu_emulation"] is True
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    assert len(losses) == 3 and all(x == x for x in losses)  # finite: the 4-bit base ran forward and backward
