"""`hwcompat train` end to end on CPU with a tiny Llama: learning, adapter, resume, signals, DDP."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import cli
from tests.train.conftest import make_config


def _train(*args, env=None, timeout=300):
    return cli.run("train", *args, env=env, timeout=timeout)


@pytest.mark.slow
def test_train_learns_and_writes_a_plain_peft_adapter(tmp_path, tiny_model, task_files, host_cpu_dtype,
                                                     host_cpu_attention):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=100, learning_rate=0.005)
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_loss"] < before["eval_loss"] / 4
    assert after["accuracy"] >= before["accuracy"] + 0.3  # the task metric moves, not only the loss
    assert summary["profile_env_applied"] and summary["dtype"] == host_cpu_dtype and summary["steps"] == 100
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["planned_peak_bytes"] > 0 and summary["first_step_peak_bytes"] is None  # device peak: GPU only
    from hwcompat import summary as summary_file

    assert summary_file.read(run).extra == {}  # the writer writes the schema, no key beside it
    for name in ("config.yaml", "profile.json", "devices.json", "metrics.jsonl", "summary.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"):
        assert (run / name).exists(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, 101))
    assert f"profile cpu ({host_cpu_dtype}, {host_cpu_attention}, compile eager)" in res.stderr
    # plain PEFT loads the adapter as is and reproduces the trained model's eval behaviour
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r})
m = PeftModel.from_pretrained(base, {str(run / 'adapter')!r}).eval()
tok = AutoTokenizer.from_pretrained({str(run / 'adapter')!r})
ids = tok("<s>### User:\\nWhat color is the lemon?\\n\\n### Assistant:\\n", add_special_tokens=False, return_tensors="pt")
out = m.generate(**ids, max_new_tokens=4, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, tiny_model, task_files):
    from safetensors.torch import load_file

    a = tmp_path / "a"
    a.mkdir()
    cfg_a = make_config(a, tiny_model, *task_files, max_steps=12, checkpoint_every=6, lora_dropout=0.1,
                        eval_at_start=False, eval_metrics="none")
    assert _train(cfg_a).returncode == 0
    b = tmp_path / "b"
    b.mkdir()
    cfg_b = make_config(b, tiny_model, *task_files, max_steps=12, checkpoint_every=6, lora_dropout=0.1,
                        eval_at_start=False, eval_metrics="none")
    assert _train(cfg_b).returncode == 0
    # Interrupted after step 6: only the checkpoint survives; resume must redo steps 7..12 identically.
    run_b = b / "run"
    shutil.rmtree(run_b / "adapter")
    (run_b / "summary.json").unlink()
    assert sorted(p.name for p in (run_b / "checkpoints").iterdir()) == ["step-0000006"]
    res = _train(run_b / "config.yaml", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 6/12" in res.stderr
    wa = load_file(str(a / "run" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-5, k
    steps = [json.loads(x)["step"] for x in (run_b / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 13))  # history continues without duplicates


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=1_000_000, learning_rate=1e-4,
                      eval_at_start=False)
    proc = cli.popen("train", cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted at step" in err and "resume with: hwcompat train" in err
    (ck,) = (tmp_path / "run" / "checkpoints").iterdir()
    step = int(ck.name.split("-")[1])
    assert step >= 3
    res = _train(tmp_path / "run" / "config.yaml", "--resume", f"max_steps={step + 2}", "eval_metrics=none")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at step {step}/{step + 2}" in res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == step + 2


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=6, eval_at_start=False, eval_metrics="none")
    res = _train(cfg, "--devices", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_bad_data_refused_before_any_model_load(tmp_path, tiny_model):
    train = tmp_path / "train.jsonl"
    train.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "x\x00", "completion": "y"}\n')
    cfg = make_config(tmp_path, tiny_model, train, train)
    res = _train(cfg)
    assert res.returncode == 2
    assert f"{train}:2: NUL byte" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=2, eval_at_start=False, eval_metrics="none")
    assert _train(cfg).returncode == 0
    res = _train(cfg)
    assert res.returncode == 2 and "already holds a run; continue it with --resume" in res.stderr


def test_fp16_on_cpu_is_refused(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, dtype="float16")
    res = _train(cfg)
    assert res.returncode == 2 and "cannot train in fp16" in res.stderr


def test_missing_model_is_a_clear_error(tmp_path, task_files):
    cfg = make_config(tmp_path, tmp_path / "no-such-model", *task_files)
    res = _train(cfg)
    assert res.returncode == 2 and "cannot load it" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_chat_template_model_trains(tmp_path, tiny_chat_model):
    rows = [{"messages": [{"role": "user", "content": f"What color is the {k}?"},
                          {"role": "assistant", "content": v}]} for k, v in
            [("sky", "blue"), ("lemon", "yellow"), ("grass", "green"), ("apple", "red")] * 8]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(tmp_path, tiny_chat_model, f, f, max_steps=5, eval_max_rows=4, batching="packed",
                      gradient_checkpointing=True, gradient_accumulation=2)
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batching packed" in res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["batching"] == "packed" and summary["steps"] == 5


def test_qlora_refused_where_the_profile_has_no_nf4(tmp_path, tiny_model, task_files):
    cfg = make_config(tmp_path, tiny_model, *task_files, qlora=True)
    res = _train(cfg)
    assert res.returncode == 2 and "cannot run 4-bit NF4" in res.stderr and "qlora=false" in res.stderr
    res = _train(cfg, "--print-config", "--emulate", "m40")
    assert res.returncode == 2 and "bitsandbytes Linux wheels start at sm_60" in res.stderr


def test_out_of_memory_is_answered_with_what_to_change(tmp_path, tiny_model, task_files, monkeypatch):
    """A CUDA OOM mid-run becomes advice, not a traceback (simulated: CPU has no OOM to provoke)."""
    import torch

    from hwcompat.errors import HwcompatError
    from hwcompat.train import batching, loop

    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=3, eval_at_start=False, eval_metrics="none",
                      micro_batch_size=8, gradient_accumulation=1)
    # prepare the run dir exactly as the launcher does, then run the loop in this process
    res = _train(cfg, "--print-config")
    assert res.returncode == 0
    from hwcompat.cli.common import plan_from_args
    from hwcompat.profiles import load_profiles
    from hwcompat.software import installed
    from hwcompat.pipeline import launch as L
    from hwcompat.train.config import load_config
    import argparse

    loaded = load_config(cfg)
    args = argparse.Namespace(emulate=None, emulate_file=None, profile=None, set=[])
    plan = plan_from_args(args)
    _, dev = L.training_device(plan, None)
    profile, _, _ = L.apply_profile(loaded, dev, load_profiles(), installed(), None)
    run_dir = L.prepare_run_dir(loaded, profile, dev, plan, resume=False, overwrite=False).path
    real = batching.collate

    def boom(items, mode, pad_id):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(batching, "collate", boom)
    with pytest.raises(HwcompatError) as e:
        loop.run(run_dir)
    monkeypatch.setattr(batching, "collate", real)
    msg = str(e.value)
    assert msg.startswith("out of memory at step 0 (micro_batch_size=8, max_seq_len=64). Try one of: "
                          "micro_batch_size=4 gradient_accumulation=2 (same effective batch)")
    assert "gradient_checkpointing=true" in msg and "hwcompat plan" in msg
