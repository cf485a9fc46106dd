"""A tiny Llama and a locally trained tokenizer, built from a config.

For tests (no hub) and as the demo's plain fallback when the packaged
SmolLM2 cannot be converted on some machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE tokenizer trained on ``texts`` (a few seconds, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>" if chat_template
                                   else "</s>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def build_model(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=True,
                      # Wide init: with the default 0.02 a tied random head cannot produce sharp logits,
                      # so LoRA (which leaves embeddings frozen) could never fit even one example.
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def write_tiny(path: str | Path, texts: Iterable[str], chat_template: bool = True, **model_kw) -> Path:
    """Build and save a tiny model + tokenizer folder that from_pretrained loads."""
    path = Path(path)
    tok = build_tokenizer(texts, chat_template=chat_template)
    model = build_model(tok, **model_kw)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path
