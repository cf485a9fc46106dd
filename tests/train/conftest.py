"""A tiny Llama with a locally trained tokenizer and a learnable synthetic task (no hub)."""

import json
import random
from types import SimpleNamespace

import pytest

COLORS = {"apple": "red", "cherry": "red", "tomato": "red", "ruby": "red", "brick": "red",
          "banana": "yellow", "lemon": "yellow", "sun": "yellow", "corn": "yellow", "butter": "yellow",
          "grass": "green", "lime": "green", "frog": "green", "leaf": "green", "mint": "green",
          "sky": "blue", "ocean": "blue", "sapphire": "blue", "jeans": "blue", "whale": "blue"}


def task_rows(n, seed):
    rng = random.Random(seed)
    items = sorted(COLORS)
    rows = []
    for _ in range(n):
        item = rng.choice(items)
        rows.append({"prompt": f"What color is the {item}?", "completion": COLORS[item]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny

    path = tmp_path_factory.mktemp("tiny") / "model"
    texts = [f"What color is the {k}? {v}" for k, v in COLORS.items()] * 5 + ["### User:\n### Assistant:\n"]
    return write_tiny(path, texts, chat_template=False, hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny

    path = tmp_path_factory.mktemp("tinychat") / "model"
    texts = [f"What color is the {k}? {v}" for k, v in COLORS.items()] * 5
    return write_tiny(path, texts, chat_template=True, hidden=64, layers=2)


#: A CPU reading with native bf16 (what /proc/cpuinfo shows on Zen 4 or Cooper Lake): `--emulate-file` with it
#: resolves the cpu profile's AVX512-BF16 variant on any CI CPU, so bf16 runs are tested everywhere (#41).
BF16_CPU = {"vendor": "cpu", "name": "Emulated AVX512-BF16 CPU", "memory_bytes": 2**34, "cpu_cores": 2,
            "cpu_flags": ["avx", "avx2", "fma", "avx512f", "avx512_bf16"]}


@pytest.fixture
def bf16_cpu(tmp_path):
    """An emulate file holding BF16_CPU."""
    import yaml

    path = tmp_path / "bf16-cpu.yaml"
    path.write_text(yaml.safe_dump([BF16_CPU]))
    return path


@pytest.fixture
def task_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", task_rows(160, 1))
    evals = write_jsonl(tmp_path / "eval.jsonl", task_rows(24, 2))
    return train, evals


def make_config(tmp_path, model, train, evals, **extra):
    import yaml

    cfg = {"model": str(model), "train_data": [str(train)], "eval_data": [str(evals)], "max_seq_len": 64,
           "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "learning_rate": 0.02, "micro_batch_size": 8,
           "max_steps": 40, "warmup_ratio": 0.0, "eval_max_rows": 24, "output_dir": str(tmp_path / "run"),
           "num_threads": 1}
    cfg.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prepare_run(config_path):
    """Resolve the profile and prepare the run folder exactly as `hwcompat train` does (lock released)."""
    import argparse

    from hwcompat.cli.common import plan_from_args
    from hwcompat.profiles import load_profiles
    from hwcompat.software import installed
    from hwcompat.pipeline import launch as L
    from hwcompat.train.config import load_config

    loaded = load_config(config_path)
    plan = plan_from_args(argparse.Namespace(emulate=None, emulate_file=None, profile=None, set=[]))
    _, dev = L.training_device(plan, None)
    profile, _, _ = L.apply_profile(loaded, dev, load_profiles(), installed(), None)
    run = L.prepare_run_dir(loaded, profile, dev, plan, resume=False, overwrite=False)
    run.lock.release()
    return run.path


SIGTERM_SITE = """
import os, signal
if os.environ.get("TEST_SIGTERM_AT_STEP"):
    import hwcompat.train.loop as L
    real = L._log_step
    def log_step(r, bar, step, *a):
        real(r, bar, step, *a)
        if step == int(os.environ["TEST_SIGTERM_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGTERM)  # what `docker stop` sends
    L._log_step = log_step
if os.environ.get("TEST_SIGTERM_AT_MICRO"):  # the N-th micro-batch of the run (0-based), mid-accumulation
    import hwcompat.train.loop as L
    real_micro = L.micro_batches
    def micro_batches(r, start):
        for i, item in enumerate(real_micro(r, start)):
            if i == int(os.environ["TEST_SIGTERM_AT_MICRO"]):
                import time
                with open(os.environ.get("TEST_SIGTERM_STAMP", os.devnull), "w") as f:
                    f.write(str(time.time()))  # when the signal went: the test times the response
                os.kill(os.getpid(), signal.SIGTERM)
            yield item
    L.micro_batches = micro_batches
"""


def sigterm_site(folder):
    """A folder for PYTHONPATH whose sitecustomize makes a real `hwcompat train` (launcher, then the worker it
    execs) SIGTERM itself right after step TEST_SIGTERM_AT_STEP is logged, or as micro-batch TEST_SIGTERM_AT_MICRO
    comes up: a signal at a known point, not after a sleep that a fast or slow machine misses."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SIGTERM_SITE)
    return folder


# --- DPO: preference pairs of the colour task ---------------------------------------------------------------

WRONG = {"red": "blue", "yellow": "green", "green": "red", "blue": "yellow"}


def pair_rows(n, seed):
    """task_rows' prompts with the right colour chosen and a wrong one rejected."""
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": WRONG[r["completion"]]}
            for r in task_rows(n, seed)]


@pytest.fixture
def pair_files(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows(96, 1)), write_jsonl(tmp_path / "pairs_eval.jsonl",
                                                                                  pair_rows(16, 2))


def dpo_objective(tiny_model, tmp_path, pair_files, beta=0.3, rpo_alpha=0.0, init_adapter=None):
    """A DPO objective bound to a LoRA model whose policy has moved away from its reference (B ~ N(0, 0.2)); with
    ``init_adapter`` (after SFT) the reference is that moved adapter, bound after it is set."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hwcompat.train.config import TrainConfig
    from hwcompat.train.objectives.dpo import DPO

    cfg = TrainConfig(model=str(tiny_model), train_data=[str(pair_files[0])], eval_data=[str(pair_files[1])],
                      method="dpo", beta=beta, max_seq_len=64, micro_batch_size=4, chat_template="false",
                      rpo_alpha=rpo_alpha, init_adapter=init_adapter)
    profile = SimpleNamespace(dtype="float32", name="cpu")
    obj = DPO(cfg, profile, torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = tok.pad_token or tok.eos_token
    obj.load(tok, print)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.0))
    if init_adapter is None:
        obj.bind(model, "eager")  # the reference: the model now (B = 0, so the base)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # move the policy away from the reference (or: the SFT adapter)
    if init_adapter is not None:
        obj.bind(model, "eager")  # the reference: the adapter as loaded, swapped in when it is needed
    return obj, model
