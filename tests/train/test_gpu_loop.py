"""#36 §3: the loop on the lent card, through `hwcompat train` (skipped without a GPU; bench/gpu_evidence.sh runs it,
and a run where every gpu test skipped fails there): the numerics check before the first step, the profile's
dtype under autocast, and memory_limit_gib holding. fp16 with the GradScaler (path-volta), layer streaming
(stream) and the other families' code paths (path-*) are gpu_evidence.sh's own steps; QLoRA through `hwcompat
train` is here (stream's qlora engine is the bench's own loop)."""

import json
import math

import pytest

from tests.train.conftest import make_config

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_the_numerics_check_runs_first_and_the_step_holds_its_memory_limit(tmp_path, tiny_model, task_files,
                                                                            run_cli):
    config = make_config(tmp_path, tiny_model, *task_files, max_steps=6, eval_metrics="none", eval_at_start=False,
                         memory_limit_gib=2)
    res = run_cli("train", str(config), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "numerics: 5 checks" in res.stderr and "match the float64 reference" in res.stderr
    assert res.stderr.index("numerics: ") < res.stderr.index("step 1/6")
    run = tmp_path / "run"
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["peak_memory_bytes"] <= 2 * 2**30 and summary["profile_env_applied"]
    assert summary["dtype"] == json.loads((run / "profile.json").read_text())["dtype"]


def test_qlora_trains_through_hwcompat_train_on_the_card(tmp_path, tiny_model, task_files, run_cli):
    """#36 §3: QLoRA through the shipped trainer on the card (bitsandbytes' CUDA NF4 kernels), not a bench's own
    loop: the base's linear layers load as Linear4bit, the adapter trains and is written."""
    pytest.importorskip("bitsandbytes")
    config = make_config(tmp_path, tiny_model, *task_files, max_steps=4, qlora=True, eval_metrics="none",
                         eval_at_start=False)
    res = run_cli("train", str(config), timeout=600)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    spec = json.loads((run / "run.json").read_text())
    assert spec["config"]["qlora"] is True and not spec.get("cpu_emulation")
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses


def test_grpo_rollouts_and_loss_run_on_the_card(tmp_path, tiny_model, task_files, run_cli):
    """#37: GRPO through `hwcompat train` on the card: the rollout's sampling generator lives on the device, the
    KV-expanded generation and the prefix-shared loss run under the profile's dtype."""
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, references, **kw):\n"
                                           "    return [-len(c) / 40.0 for c in completions]\n")
    config = make_config(tmp_path, tiny_model, *task_files, method="grpo", rewards=["my_rewards:short"],
                         num_generations=4, micro_batch_size=8, max_completion_length=12, max_steps=4,
                         eval_metrics="none", eval_at_start=False)
    res = run_cli("train", str(config), timeout=600)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    recs = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
    assert len(recs) == 4 and all(r["completions"] == 8 and math.isfinite(r["loss"]) for r in recs)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tune_offloaded_to_host_ram_trains_on_the_card(tmp_path, tiny_model, task_files, run_cli):
    """#38: optimizer_offload=host on the card: pinned fp32 masters, gradients copied down by the hooks while
    backward runs, the working copy in the profile's dtype; its losses track the resident AMP run's (not to the
    bit: the offloaded gradients are the working dtype's, the resident ones fp32)."""
    losses = {}
    for offload in ("none", "host"):
        folder = tmp_path / offload
        folder.mkdir()
        config = make_config(folder, tiny_model, *task_files, finetune="full", optimizer_offload=offload,
                             learning_rate=1e-3, max_steps=6, gradient_accumulation=2, eval_metrics="none",
                             eval_at_start=False)
        res = run_cli("train", str(config), timeout=600)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
        run = folder / "run"
        assert json.loads((run / "summary.json").read_text())["optimizer_offload"] == offload
        losses[offload] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                           if r["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses["host"])
    assert all(abs(a - b) <= 0.05 * abs(a) + 0.05 for a, b in zip(losses["none"], losses["host"])), losses
