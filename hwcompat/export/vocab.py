"""The tokenizer in GGUF, read from ``tokenizer.json`` (what HF trained and evaluated with).

Two kinds, as llama.cpp's converter writes them:
- byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2 style): ``tokenizer.ggml.model = gpt2`` with merges, and the
  pre-tokenizer llama.cpp should split with (``tokenizer.ggml.pre``);
- SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3): ``tokenizer.ggml.model = llama`` with
  one score per piece. llama.cpp merges the adjacent pair whose joined piece scores highest, so the scores must rank
  pieces as HF's merge list does: SentencePiece's own scores when ``tokenizer.model`` is there and ``sentencepiece``
  is installed (exactly what llama.cpp's converter writes), else minus the rank of the first merge that makes the
  piece (the same order: HF's list is built from those scores). Whether a space is put before the text follows the
  tokenizer's normalizer / Metaspace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hwcompat.errors import InputError

#: tokenizer.ggml.pre: llama.cpp picks the pre-tokenizer regex by name. Recognised here from the
#: tokenizer.json pre_tokenizer; anything else is written as "default" and said so.
PRE_TOKENIZERS = (
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}", "llama-bpe"),
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?", "qwen2"),
)
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def kind(src: Path) -> tuple[str, dict[str, Any]]:
    """("gpt2" | "llama", the parsed tokenizer.json); an input error for anything llama.cpp could not read alike."""
    path = src / "tokenizer.json"
    if not path.exists():
        raise InputError(f"{src}: no tokenizer.json; GGUF export reads the fast tokenizer (save it with "
                         "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") == "BPE":
        return ("llama" if model.get("byte_fallback") else "gpt2"), tok
    raise InputError(f"{src}: tokenizer is {model.get('type')}; GGUF export handles byte-level BPE (Llama 3, Qwen, "
                     "SmolLM) and SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1, Gemma, Phi-3)")


def write_vocab(writer, src: Path, cfg: dict[str, Any], model_type: str) -> tuple[str, str]:
    """Write the tokenizer keys; return (tokenizer model, pre-tokenizer name)."""
    import gguf

    model, tok = kind(src)
    n_vocab = int(cfg.get("vocab_size") or len(tok["model"]["vocab"]))
    if model == "gpt2":
        pre = pre_tokenizer_name(src, tok, model_type)
        _byte_level(writer, tok, n_vocab, pre, gguf)
    else:
        pre = "default"
        _sentencepiece(writer, src, tok, n_vocab, gguf)
    special = gguf.SpecialVocab(str(src), load_merges=model == "gpt2", n_vocab=n_vocab)
    special.add_to_gguf(writer)
    if not special.chat_template:
        template = _chat_template(src)
        if template:
            writer.add_chat_template(template)
    return model, pre


def _chat_template(src: Path) -> str | None:
    tcfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.exists() else {}
    if tcfg.get("chat_template"):
        return tcfg["chat_template"]
    jinja = src / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.exists() else None


def _byte_level(writer, tok: dict[str, Any], n_vocab: int, pre: str, gguf) -> None:
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _sentencepiece(writer, src: Path, tok: dict[str, Any], n_vocab: int, gguf) -> None:
    model = tok["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    scores = piece_scores(src, model)
    tokens, values, types = [], [], []
    for i in range(n_vocab):
        if i in added:  # as llama.cpp's converter: special -> control, else user-defined with spaces restored
            a = added[i]
            tokens.append(a["content"] if a.get("special") else a["content"].replace("\u2581", " "))
            values.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            t = by_id[i]
            tokens.append(t)
            values.append(scores.get(t, 0.0))
            types.append(gguf.TokenType.BYTE if BYTE_TOKEN.fullmatch(t) else gguf.TokenType.UNKNOWN
                         if t == model.get("unk_token") else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            values.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(values)
    writer.add_token_types(types)
    writer.add_add_space_prefix(adds_space_prefix(tok))


def piece_scores(src: Path, model: dict[str, Any]) -> dict[str, float]:
    """Piece -> score that ranks merges as the tokenizer does (see the module docstring)."""
    path = src / "tokenizer.model"
    if path.exists():
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError:
            pass
        else:
            sp = SentencePieceProcessor()
            sp.LoadFromFile(str(path))
            return {sp.IdToPiece(i): float(sp.GetScore(i)) for i in range(sp.vocab_size())}
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(a + b, -float(rank))
    return scores


def adds_space_prefix(tok: dict[str, Any]) -> bool:
    """Does the tokenizer put "▁" before the text (Llama 2's Prepend normalizer, or a prepending Metaspace)?"""
    for node in _walk(tok.get("normalizer")):
        if node.get("type") == "Prepend":
            return True
    for node in _walk(tok.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme") or ("always" if node.get("add_prefix_space", True) else "never")
            return scheme != "never"
    return False


def _walk(node):
    if not node:
        return
    yield node
    for sub in node.get("normalizers") or node.get("pretokenizers") or []:
        yield from _walk(sub)


def pre_tokenizer_name(src: Path, tok: dict[str, Any], model_type: str) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer does. Its tokenizer.json shape decides when
    hwcompat knows it exactly; else the name llama.cpp's converter gives it, the SHA-256 of its ids for llama.cpp's
    check text (catalog/gguf_pretokenizers.yaml). Shape first because the check text can be blind: SmolLM2's
    tokenizer as transformers rebuilds it from a GGUF (plain byte-level) hashes like the original ("smollm", digits
    split first), yet splits "x  1" differently, and llama.cpp's tokens then differ (tests/test_export_llama.py)."""
    shape = _pre_tokenizer(tok)
    if shape != "default":
        return shape
    import hashlib

    from hwcompat.yamlfile import load_packaged_yaml
    from transformers import AutoTokenizer

    from hwcompat.datafiles import data_dir

    table = load_packaged_yaml(data_dir("catalog") / "gguf_pretokenizers.yaml", "pre-tokenizer table")
    try:
        ids = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False).encode(table["chktxt"])
    except (OSError, ValueError) as exc:  # no loadable tokenizer here: the shape decides
        ids = f"unloadable: {exc}"
    return table["hashes"].get(hashlib.sha256(str(ids).encode()).hexdigest()) or "default"


def _pre_tokenizer(tok: dict[str, Any]) -> str:
    text = json.dumps(tok.get("pre_tokenizer") or {})
    for needle, name in PRE_TOKENIZERS:
        if json.dumps(needle)[1:-1] in text:
            return name
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # plain byte-level with GPT-2's regex
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if [p.get("type") for p in parts] == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's regex
    return "default"
