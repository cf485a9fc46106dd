"""Selftest: does this card train with its profile, through the recipe users run? Minutes, no download.

    hwcompat selftest [--device N] [--profile NAME] [--memory-limit GIB] [--json] [--out FILE] [--keep DIR]

Builds a small Llama from a config (random weights, a tokenizer trained on the spot) and a repeated-pattern
SFT task, then runs ``hwcompat train`` on them: the launcher applies the profile (dtype, attention kernel,
compile backend, environment) and the LoRA recipe of ``hwcompat.train`` trains, exactly as a user's run would.
The result is read from what the run wrote (metrics.jsonl, summary.json). Checks: the kernels load (no "no
kernel image is available"), loss and gradients are finite, the loss goes down, and on a GPU the first step's
peak (the run's largest micro-batch) is within the planner's margin. Reports tokens/s after warm-up, achieved
TFLOP/s and MFU against the profile's datasheet peak.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwcompat import summary as summary_file
from hwcompat.choices import Vendor
from hwcompat.errors import InputError
from hwcompat.resolve import ResolvedDevice

MEMORY_MARGIN = 0.25  # selftest tolerance between planned and measured peak allocation
WARMUP_STEPS = 3  # not timed: allocation, autotuning and compilation happen here

#: A small Llama: big enough on a GPU for the kernels, the plan and the speed to mean something.
GPU_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=8192)
CPU_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
GPU_RUN = dict(max_seq_len=1024, micro_batch_size=8)
CPU_RUN = dict(max_seq_len=128, micro_batch_size=4)
KERNEL_ERRORS = ("no kernel image", "invalid device function", "CUDA error: unspecified launch failure")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class SelftestOptions:
    """What to test: the steps, where the run happens, and the launch flags passed on to ``hwcompat train``."""

    steps: int = 30
    keep: Path | None = None  # keep the model, data and run here (default: a temporary folder, removed)
    train_args: tuple[str, ...] = ()  # --device N, --profile NAME, --emulate X --cpu-emulation
    memory_limit_gib: float = 0.0  # rehearse a smaller card (train's memory_limit_gib)
    timeout_s: int = 1200


@dataclass
class SelftestResult:
    device: str
    profile: str
    dtype: str
    attention: str
    compile_backend: str
    passed: bool
    checks: list[Check]
    recipe: str = "hwcompat train (hwcompat.train, LoRA)"
    tokens_per_s: float = 0.0
    achieved_tflops: float = 0.0
    peak_tflops: float | None = None
    peak_card: str = ""
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    planned_memory_bytes: int | None = None
    memory_limit_gib: float = 0.0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_peak(device: ResolvedDevice, prof) -> tuple[str, float | None]:
    """(the card, its dense peak in the profile's dtype) for MFU: this card's own row in catalog/throughput.yaml,
    else the profile's representative card only when this is that card; else none (an RTX 5090 or a GB10 measured
    against a B200's peak was off 10-50x)."""
    from hwcompat.plan import peak_tflops

    name = device.reading.name
    own = peak_tflops(name, prof.dtype)
    if own:
        return name, own
    if prof.peak_card and prof.peak_card in name:
        return prof.peak_card, prof.peak_tflops.get(prof.dtype)
    return "", None


def run_selftest(device: ResolvedDevice, opts: SelftestOptions, fix_hint: str = "") -> SelftestResult:
    """Write the model and data, train them with `hwcompat train`, and judge what the run wrote."""
    prof = device.profile
    assert prof is not None
    on_gpu = device.reading.vendor != Vendor.cpu and "--cpu-emulation" not in opts.train_args
    card, peak = device_peak(device, prof) if on_gpu else ("", None)  # CPU emulation: not the card
    res = SelftestResult(device=device.reading.name, profile=prof.name, dtype=prof.dtype, attention=prof.attention,
                         compile_backend=prof.compile_backend, passed=False, checks=[], peak_card=card,
                         peak_tflops=peak, memory_limit_gib=opts.memory_limit_gib)
    work = opts.keep or Path(tempfile.mkdtemp(prefix="hwcompat-selftest-"))
    try:
        config = write_inputs(work, on_gpu, opts)
        proc = _train(config, opts)
        run = work / "run"
        res.run_dir = str(run) if opts.keep else ""
        _judge(res, proc, run, on_gpu, fix_hint)
    finally:
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)  # the folder this call made, nothing else
    res.passed = bool(res.checks) and all(c.ok is not False for c in res.checks)
    return res


def write_inputs(work: Path, on_gpu: bool, opts: SelftestOptions) -> Path:
    """The model folder, the task's JSONL files and the run's config, all under ``work``; returns the config."""
    from hwcompat.fsutil import atomic_write_text

    shape, run = (GPU_SHAPE, GPU_RUN) if on_gpu else (CPU_SHAPE, CPU_RUN)
    train, evals = _task(run["max_seq_len"])
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        atomic_write_text(work / name, "".join(json.dumps(r) + "\n" for r in rows))
    write_model(work / "model", shape, [r["prompt"] + r["completion"] for r in train])
    config = {"model": str(work / "model"), "train_data": [str(work / "train.jsonl")],
              "eval_data": [str(work / "eval.jsonl")], "output_dir": str(work / "run"), "max_steps": opts.steps,
              "learning_rate": 2e-3, "lr_schedule": "constant", "warmup_ratio": 0.0, "lora_dropout": 0.0,
              "eval_at_start": False, "eval_metrics": "none", "batching": "padded", "chat_template": "false",
              "memory_limit_gib": opts.memory_limit_gib, **run}
    path = work / "selftest.yaml"
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def _task(seq_len: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A fixed 64-word pattern as every row's answer: a stack that computes correctly learns it in a few steps."""
    import random

    gen = random.Random(1)
    pattern = " ".join(f"w{gen.randrange(200)}" for _ in range(64))
    answer = " " + " ".join([pattern] * (seq_len // 64 + 1))
    rows = [{"prompt": f"row {i}: continue the pattern.", "completion": answer} for i in range(72)]
    return rows[:64], rows[64:]


def write_model(path: Path, shape: dict[str, int], texts: list[str], dtype: str = "float32") -> None:
    """A random-weight Llama of ``shape`` with a tokenizer trained on the task's text, saved as safetensors."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from hwcompat.train.tiny import build_tokenizer

    tok = build_tokenizer(texts, vocab_size=min(shape["vocab_size"], 512), chat_template=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tok))}, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id,
                      # sharper logits than the default 0.02, so 30 LoRA steps move the loss far (the head is frozen)
                      initializer_range=0.1)
    transformers.utils.logging.disable_progress_bar()
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


def _train(config: Path, opts: SelftestOptions) -> subprocess.CompletedProcess:
    """``hwcompat train`` in a child process, as a user starts it: the launcher, its profile env, the worker."""
    cmd = [sys.executable, "-m", "hwcompat", "train", str(config), "--overwrite", *opts.train_args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {opts.timeout_s} s")


def _judge(res: SelftestResult, proc: subprocess.CompletedProcess, run: Path, on_gpu: bool, fix_hint: str) -> None:
    summary, records = _read_run(run)
    if proc.returncode != 0 or summary is None:
        output = (proc.stderr or "") + (proc.stdout or "")
        kernel = any(k in output for k in KERNEL_ERRORS)
        last = next((x for x in reversed(output.strip().splitlines()) if x.strip()), "no output")
        res.checks.append(Check("kernels", False, f"`hwcompat train` exited {proc.returncode}: {last[:300]}",
                                fix_hint if kernel else "run `hwcompat doctor`"))
        res.losses = [r["loss"] for r in records]
        return
    res.versions = summary.versions
    res.dtype, res.attention, res.compile_backend = summary.dtype, summary.attention, summary.compile_backend
    res.checks.append(Check("kernels", True, f"`hwcompat train` ran {len(records)} LoRA steps in {res.dtype} with "
                                             f"{res.attention} attention, compile {res.compile_backend}"))
    res.losses = [r["loss"] for r in records]
    res.grad_norms = [r["grad_norm"] for r in records]
    res.checks += learning_checks(res.losses, res.grad_norms)
    _speed(res, records, run)
    res.checks.append(_memory_check(res, summary) if on_gpu else
                      Check("memory", None, "not measured on the CPU (no allocator statistics)"))


def _read_run(run: Path) -> tuple[summary_file.Summary | None, list[dict[str, Any]]]:
    records = []
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "train":
                records.append(rec)
    except (OSError, ValueError):
        pass
    try:
        summary = summary_file.read(run)
    except (OSError, InputError):
        summary = None
    return summary, records


def learning_checks(losses: list[float], grad_norms: list[float]) -> list[Check]:
    finite = bool(losses) and all(math.isfinite(x) for x in losses + grad_norms)
    n = max(1, min(3, len(losses) // 3))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    down = finite and len(losses) >= 2 and last < first * 0.7
    return [Check("finite", finite, "loss and gradients finite" if finite else
                  f"non-finite loss or gradients ({losses[-3:]}, grad norms {grad_norms[-3:]})",
                  "" if finite else "try dtype=float32 for this card (fp16 overflow) and run `hwcompat doctor`"),
            Check("learns", down, f"loss {first:.3f} -> {last:.3f}",
                  "" if down else "the stack computes but does not learn: check the dtype and driver")]


def lora_flops_per_token(config: dict[str, Any], lora_r: int, seq_len: int) -> float:
    """Training FLOPs per token of a LoRA run on every linear projection of a Llama-shaped model.

    A frozen weight costs 2 FLOPs/parameter forward and 2 backward (the input's gradient only; no weight
    gradient), a trained one 2 + 4; causal attention's score and value products add 6 * layers * seq * hidden
    (Kaplan et al. 2020, forward + backward). Counting a LoRA run as 6N would overstate its MFU by half.
    """
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    frozen = layers * sum(i * o for i, o in shapes) + h * config["vocab_size"]  # + the LM head
    trained = layers * sum(lora_r * (i + o) for i, o in shapes)
    return 4.0 * frozen + 6.0 * trained + 6.0 * layers * seq_len * h


def model_flops_per_token(config: dict[str, Any], seq_len: int) -> float:
    """NeMo AutoModel's model FLOPs per token of a Llama (its ``llama3_flops`` / ``gbs * seq_len``).

    NeMo counts a LoRA run with the full-training formula (every GEMM forward, weight gradient and input
    gradient: 3 x 2 x 2 FLOPs per parameter pair, causal attention halved, the LM head included), so its
    "~41 % MFU for Llama-3-8B LoRA on one H100" is this count; reporting it beside ``lora_flops_per_token``
    lets our figure be compared with theirs. Source: NVIDIA-NeMo/Automodel,
    nemo_automodel/components/utils/flops_utils.py (llama3_flops).
    """
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    groups = config["num_key_value_heads"] / config["num_attention_heads"]
    return layers * h * h * (12 + 12 * groups + 18 * config["intermediate_size"] / h + 12 * seq_len / h * 0.5
                             + 6 * config["vocab_size"] / (layers * h))


def _speed(res: SelftestResult, records: list[dict[str, Any]], run: Path) -> None:
    """Tokens/s after warm-up, from the run's cumulative counters; FLOP/s from the model's config."""
    if len(records) <= WARMUP_STEPS or "train_seconds" not in records[-1]:
        return
    a, b = records[WARMUP_STEPS - 1], records[-1]
    seconds = b["train_seconds"] - a["train_seconds"]
    res.tokens_per_s = (b["tokens"] - a["tokens"]) / seconds if seconds > 0 else 0.0
    try:
        config = json.loads((run.parent / "model" / "config.json").read_text())
        spec = json.loads((run / "run.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return
    flops = lora_flops_per_token(config, spec["lora_r"], spec["max_seq_len"])
    res.achieved_tflops = res.tokens_per_s * flops / 1e12
    res.mfu = res.achieved_tflops / res.peak_tflops if res.peak_tflops else None


def _memory_check(res: SelftestResult, summary: summary_file.Summary) -> Check:
    """The allocator peak of the run's costliest micro-batch (probed before the first step) against the plan's allocator
    side."""
    measured, planned = summary.first_step_peak_bytes, summary.planned_allocated_bytes
    if not measured or not planned:
        return Check("memory", None, "the run recorded no first-step peak or no plan (planner skipped this model)")
    res.peak_memory_bytes, res.planned_memory_bytes = measured, planned
    ratio = measured / planned
    ok = abs(ratio - 1) <= MEMORY_MARGIN
    cap = f" under a {res.memory_limit_gib:g} GiB limit" if res.memory_limit_gib else ""
    return Check("memory", ok, f"first step measured {measured / 2**20:.0f} MiB vs planned {planned / 2**20:.0f} MiB "
                               f"({ratio:.2f}x){cap}",
                 "" if ok else "the planner is off for this card: please report this result")


def render(res: SelftestResult) -> str:
    lines = [f"selftest on {res.device}: profile {res.profile} ({res.dtype}, {res.attention}, "
             f"compile {res.compile_backend}) through {res.recipe}"]
    for c in res.checks:
        mark = "PASS" if c.ok else ("n/a " if c.ok is None else "FAIL")
        lines.append(f"  {mark}  {c.name:8} {c.detail}")
        if c.ok is False and c.fix:
            lines.append(f"        fix: {c.fix}")
    if res.tokens_per_s:
        mfu = f", MFU {res.mfu:.1%} of {res.peak_card}'s {res.peak_tflops:g} TFLOP/s" if res.mfu is not None else \
            " (no datasheet peak for this dtype)"
        lines.append(f"  {res.tokens_per_s:,.0f} tokens/s, {res.achieved_tflops:.2f} TFLOP/s{mfu}")
    lines.append("PASS" if res.passed else "FAIL")
    return "\n".join(lines)
