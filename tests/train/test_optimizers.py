"""optimizer: adamw | adamw_8bit | paged_adamw_8bit — trained for real on the CPU, refused where the card has no kernels."""

import json

import pytest

from tests import cli
from tests.train.conftest import make_config


def _train(*args):
    return cli.run("train", *args)


@pytest.mark.slow
def test_8bit_adamw_trains_and_learns(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=20, optimizer="adamw_8bit", eval_metrics="none",
                      lora_r=64)
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Failed to load CPU gemm_4bit_forward" not in res.stderr  # bitsandbytes' import noise is not shown
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["eval_after"]["eval_loss"] < 0.7 * s["eval_before"]["eval_loss"]
    ck = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert ck["optimizer"] == "adamw_8bit"


def test_8bit_optimizer_refused_where_bitsandbytes_has_no_kernels(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, optimizer="paged_adamw_8bit")
    res = _train(cfg, "--emulate", "m40", "--print-config")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("optimizer=paged_adamw_8bit: the maxwell profile has no bitsandbytes 8-bit optimizer (no bitsandbytes "
            "kernels for this card: PyPI bitsandbytes Linux wheels start at sm_60") in res.stderr
    assert "use optimizer=adamw" in res.stderr


@pytest.mark.slow
def test_resume_keeps_the_8bit_optimizer_state(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=4, checkpoint_every=2, optimizer="adamw_8bit",
                      eval_at_start=False, eval_metrics="none")
    assert _train(cfg).returncode == 0
    res = _train(tmp_path / "run" / "config.yaml", "--resume", "max_steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 2/6" in res.stderr  # the last checkpoint (step 2)
