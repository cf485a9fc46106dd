import functools
import json
import os
import random

import pytest


def pytest_collection_modifyitems(config, items):
    """gpu tests skip cleanly unless a CUDA/ROCm device is really there."""
    has_gpu = False
    if any("gpu" in item.keywords for item in items):
        try:
            import torch  # noqa: WPS433 (only when gpu tests were collected)

            has_gpu = torch.cuda.is_available()
        except Exception:
            has_gpu = False
    skip = pytest.mark.skip(reason="needs a GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture
def run_cli():
    """Run `python -m hwcompat ARGS` as a real subprocess (tests/cli.py); returns CompletedProcess."""
    from tests import cli

    return functools.partial(cli.run, timeout=120)


@pytest.fixture(scope="session")
def host_cpu_dtype():
    """The dtype this machine's CPU profile picks from its own flags (#41: bf16 where the CPU has native bf16
    dot products, else fp32): what a run here trains in by default."""
    return _host_cpu_profile().dtype


@pytest.fixture(scope="session")
def host_cpu_attention():
    """The attention this machine's CPU profile picks (#41: hwcompat's cpu_bf16 kernel where it trains in bf16)."""
    return _host_cpu_profile().attention


def _host_cpu_profile():
    from hwcompat.probe import cpu
    from hwcompat.profiles import load_profiles
    from hwcompat.resolve import resolve_device
    from hwcompat.software import Software

    return resolve_device(cpu.probe()[0], load_profiles(), Software.with_torch("2.13.0+cpu")).profile


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("HWCOMPAT_") or k == "HSA_OVERRIDE_GFX_VERSION":
            monkeypatch.delenv(k, raising=False)


# --- llama.cpp (the gguf extra): shared by the export tests ---------------------------------------------------

REQUIRE_LLAMA = os.environ.get("HWCOMPAT_REQUIRE_LLAMA") == "1"  # read at import: the autouse fixture clears HWCOMPAT_*
LLAMA_COLORS = {"sky": "blue", "grass": "green", "sun": "yellow", "blood": "red", "snow": "white", "coal": "black",
                "sea": "blue", "leaf": "green", "banana": "yellow", "cherry": "red", "milk": "white", "night": "black"}


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if REQUIRE_LLAMA:
            pytest.fail("HWCOMPAT_REQUIRE_LLAMA=1 but llama_cpp does not import")
        pytest.skip("llama-cpp-python (hwcompat[gguf]) is not installed")
    return llama_cpp


def color_rows(n, seed, every=False):
    rng = random.Random(seed)
    items = sorted(LLAMA_COLORS)
    keys = (items * n)[:n] if every else [rng.choice(items) for _ in range(n)]
    rng.shuffle(keys)
    return [{"messages": [{"role": "user", "content": f"What color is the {k}?"},
                          {"role": "assistant", "content": LLAMA_COLORS[k]}]} for k in keys]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama (rows of 256: k-quant blocks apply) trained until it answers the color task: a random model's
    near-flat logits would make quantization noise look like a verdict."""
    import torch

    from hwcompat.train.tiny import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("llama") / "merged"
    texts = [f"What color is the {k}? {v}" for k, v in LLAMA_COLORS.items()] * 5
    tok = build_tokenizer(texts, chat_template=True)
    model = build_model(tok, hidden=256, layers=2, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [r["messages"] for r in color_rows(48, 0, every=True)]
    convs = [chat_ids(tok.apply_chat_template(m, tokenize=True)) for m in rows]
    prompts = [len(chat_ids(tok.apply_chat_template(m[:1], tokenize=True, add_generation_prompt=True))) for m in rows]
    for step in range(300):
        at = (step * 8) % 48
        batch, starts = convs[at:at + 8], prompts[at:at + 8]
        width = max(len(c) for c in batch)
        ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in batch])
        labels = torch.tensor([[-100] * s + c[s:] + [-100] * (width - len(c)) for c, s in zip(batch, starts)])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5, loss.item()
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    data = folder.parent / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in color_rows(12, 1)))
    return folder, data


def chat_ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


#: SmolLM2's own pre-tokenizer (tokenizer.json), as the GGUF exporter must recognise it
SMOLLM_ORIGINAL = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}


# --- the fox model: a tiny chat Llama for the export, merge and clear-error tests (a fresh one per module) --------

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from hwcompat.train.tiny import write_tiny
    return write_tiny(tmp_path_factory.mktemp("m") / "tiny", TEXTS, hidden=64, layers=2, chat_template=True)


@pytest.fixture
def rows(tmp_path):
    """20 prompt/completion rows in a train.jsonl."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, model):
    """A real run (2 steps) of hwcompat train on the fox model: its run.json records the base model's digest."""
    import yaml

    from tests import cli

    d = tmp_path_factory.mktemp("trained")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(16)))
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model), "train_data": [str(data)], "max_steps": 2,
                                   "micro_batch_size": 4, "eval_metrics": "none", "eval_at_start": False,
                                   "output_dir": str(d / "run"), "max_seq_len": 32, "num_threads": 1}))
    res = cli.run("train", cfg, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return d / "run"
