"""Every family hwcompat exports, as a tiny model with its family's tokenizer kind, through llama.cpp and --verify:
Llama and Mistral with a Llama-2-style SentencePiece tokenizer, Gemma and Gemma 2 with Gemma's (no space prefix),
Phi-3 with its rstrip chat tokens, and Phi-3's 128k LongRoPE. Byte-level BPE families are in test_export*.py.

The SentencePiece models are trained here (sentencepiece, BPE with byte fallback, as Llama 2's) and converted by
transformers (which needs protobuf), so nothing comes from a model hub.
"""

import json
import re
import random
import shutil
from pathlib import Path

import pytest

from hwcompat.errors import InputError

DATA = Path(__file__).resolve().parents[1] / "hwcompat" / "demo" / "data"
TEMPLATES = {
    "llama2": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
              "' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
              "{% endfor %}",
    "gemma": "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
             "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    "phi3": "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}
#: case -> (model_type, tokenizer style, config overrides)
CASES = {
    "llama2": ("llama", "llama2", {}),
    "mistral": ("mistral", "llama2", {"sliding_window": None}),
    "gemma": ("gemma", "gemma", {"head_dim": 16, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "gemma2": ("gemma2", "gemma", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                                   "tie_word_embeddings": True}),
    "phi3": ("phi3", "phi3", {"num_key_value_heads": 4, "pad_token_id": 0}),
    "phi3-128k": ("phi3", "phi3", {"num_key_value_heads": 4, "pad_token_id": 0, "max_position_embeddings": 131072,
                                   "original_max_position_embeddings": 4096, "rope_parameters": LONGROPE}),
}


def _spm_tokenizer(folder: Path, style: str, legacy: bool = True):
    """A SentencePiece BPE tokenizer with byte fallback, trained on the bundled demo text, as transformers loads it.
    ``legacy`` True: a space before every text segment (Llama 2 / Mistral v0.1 as published); False: transformers'
    prepend_scheme=first."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(line for f in sorted(DATA.glob("*.jsonl")) for line in f.read_text().splitlines()))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   add_dummy_prefix=style != "gemma", normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer" if style == "gemma" else "LlamaTokenizer", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": legacy}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    if style == "gemma":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    if style == "phi3":  # as Phi-3's tokenizer.json: its chat tokens (and </s>) eat the whitespace after them
        tok.add_special_tokens({"eos_token": AddedToken("</s>", rstrip=True, special=True, normalized=False)})
        tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|endoftext|>", special=True)] + [
            AddedToken(t, rstrip=True, special=True, normalized=False)
            for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")]})
    tok.chat_template = TEMPLATES[style]
    return tok


def _save(tok, folder: Path, legacy: bool) -> None:
    tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"  # transformers 5 drops `legacy` on save; a reload must see it
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = legacy
    cfg_path.write_text(json.dumps(cfg))


def _model(tmp_path: Path, case: str, legacy: bool = True) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mt, style, overrides = CASES[case]
    tok = _spm_tokenizer(tmp_path / "tok", style, legacy)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, initializer_range=0.2, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **kw))
    folder = tmp_path / case  # general.name: llama.cpp keys Phi-3's token flags on "phi3" in it
    model.save_pretrained(str(folder))
    _save(tok, folder, legacy)
    return folder


def _fields(path):
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()
            if not k.startswith("tokenizer.ggml.t") and k != "tokenizer.ggml.scores"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_family_exports_and_passes_verify_in_llama_cpp(llama_cpp, tmp_path, case):  # noqa: F811
    from hwcompat.export.gguf import export_gguf
    from hwcompat.export.verify import verify

    folder = _model(tmp_path, case)
    res = export_gguf(folder, tmp_path / f"{case}.gguf", "f32")
    fields = _fields(res.path)
    assert res.tokenizer == "llama" and fields["tokenizer.ggml.model"] == "llama"
    assert res.arch == {"llama": "llama", "mistral": "llama"}.get(CASES[case][0], CASES[case][0])
    assert fields["tokenizer.ggml.add_space_prefix"] is (CASES[case][1] != "gemma")
    if case == "phi3-128k":
        assert fields["phi3.rope.scaling.original_context_length"] == 4096
        assert res.tensors == 2 + 2 * 6 + 1 + 2  # embed, norm, 6 per layer, output, the long/short factors
    verdict = verify(folder, res.path, "f32", rows=6, max_new_tokens=24, progress=lambda m: None)
    assert verdict.passed, verdict.failures
    assert verdict.tokenization["mismatches"] == 0
    assert verdict.generations["identical"] == verdict.generations["prompts"] == 6


@pytest.mark.parametrize("style", ["llama2", "gemma"])
@pytest.mark.parametrize("scores", ["from tokenizer.json merges", "from tokenizer.model"])
def test_sentencepiece_gguf_tokenizes_like_hf_on_a_fuzz_set(llama_cpp, tmp_path, style, scores):  # noqa: F811
    """llama.cpp merges pieces by score: the scores hwcompat writes (SentencePiece's own, or derived from the merge
    order when only tokenizer.json is there) must give HF's tokens, 2,000 fuzzed strings each."""
    from transformers import AutoTokenizer

    from hwcompat.export.gguf import export_gguf

    case = "llama2" if style == "llama2" else "gemma"
    folder = _model(tmp_path, case)
    if scores == "from tokenizer.model":
        shutil.copy(tmp_path / "tok" / "tokenizer.model", folder / "tokenizer.model")
    else:
        assert not (folder / "tokenizer.model").exists()
    out = export_gguf(folder, tmp_path / "t.gguf", "f16").path
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(folder))
    rng = random.Random(1)
    pieces = ["1234567", "42", " ", "  ", "\n", "\t", "\n\n", "the", " The", "é", "日本", "🙂", "'s", "x=", "3.14",
              "{\"people\": [\"Ada\"]}", "def f():", "    ", "Ελλάδα", "HTTP/1.1", "--", "ß", "organizations", "Berlin"]
    strings = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).lstrip() or "a" for _ in range(2000)]
    bad = [s for s in strings if list(llm.tokenize(s.encode(), add_bos=False, special=True))
           != hf.encode(s, add_special_tokens=False)]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"


def test_verify_reports_the_space_llama_cpp_puts_after_special_tokens(llama_cpp, tmp_path):  # noqa: F811
    """transformers' prepend_scheme=first puts no space after a special token; llama.cpp always does, and no GGUF
    key says otherwise. Verify names that difference (not a tokenizer bug), and the greedy answers start from
    llama.cpp's own ids, so what it costs is measured, not hidden."""
    from hwcompat.export.gguf import export_gguf
    from hwcompat.export.verify import verify

    folder = _model(tmp_path, "llama2", legacy=False)
    res = export_gguf(folder, tmp_path / "first.gguf", "f32")
    verdict = verify(folder, res.path, "f32", rows=6, max_new_tokens=8, progress=lambda m: None)
    t = verdict.tokenization
    assert t["mismatches"] == 0 and t["space_prefix"] >= 6  # every rendered prompt: "<s>[INST]" -> "<s> [INST]"
    # every rendered prompt checked (verify renders all it may need to reach its answer positions)
    assert any("legacy" in n and re.search(r"\b([6-9]|\d\d+) rendered prompts", n) for n in verdict.notes), verdict.notes


def test_gemma_with_its_own_head_or_another_query_scale_is_refused(tmp_path):
    from hwcompat.export.gguf import export_gguf

    folder = _model(tmp_path, "gemma2")
    cfg = json.loads((folder / "config.json").read_text())
    for change, message in (({"tie_word_embeddings": False}, "reads the head from the token embedding"),
                            ({"query_pre_attn_scalar": 20}, "query_pre_attn_scalar 20")):
        (folder / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(InputError, match=message):
            export_gguf(folder, tmp_path / "g.gguf", "f16")
        assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".g.gguf.*"))
