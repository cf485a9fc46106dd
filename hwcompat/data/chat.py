"""Chat rendering: a conversation to the text or token ids a model is given, through its own chat template.

Training (loss masks), eval, generation and export's verification render prompts here, so a prompt reads the
same in each. Without a template (or with ``chat_template: false``) plain ``### User:`` headers are used.
"""

from __future__ import annotations

from typing import Any

# Used when the tokenizer has no chat template (or chat_template=false).
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def as_dicts(messages) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in messages]


def ids_of(encoded: Any) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding (transformers 5)."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def template(tokenizer, messages, where: str = "", **kw: Any):
    """``apply_chat_template``; a template that refuses the conversation (Gemma's "System role not supported",
    "roles must alternate") raises ValueError naming the row, like every other data problem."""
    try:
        return tokenizer.apply_chat_template(as_dicts(messages), **kw)
    except ValueError:
        raise
    except Exception as exc:  # jinja2's TemplateError (raise_exception in the template) and its kin
        if type(exc).__module__.split(".")[0] != "jinja2":
            raise
        at = f"{where}: " if where else ""
        raise ValueError(f"{at}the tokenizer's chat template refused this conversation ({str(exc)[:160]}); fix the "
                         "row (e.g. fold a system message into the first user turn for models without a system "
                         "role), or set chat_template=false") from None


def uses_chat_template(tokenizer, setting: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "true" and not has:
        from hwcompat.errors import InputError

        raise InputError("chat_template=true but the tokenizer has no chat template; set chat_template=false "
                         "(plain '### User:' headers) or use a tokenizer that has one")
    return has if setting == "auto" else setting == "true"


def render_prompt_ids(tokenizer, messages, chat: bool) -> list[int]:
    """Token ids of everything before the last assistant turn, ready for generation."""
    msgs = list(messages)
    last = max(i for i, (r, _) in enumerate(msgs) if r == "assistant")
    if chat:
        return ids_of(template(tokenizer, msgs[:last], tokenize=True, add_generation_prompt=True))
    return bos_ids(tokenizer) + tokenizer.encode(plain_prompt(msgs[:last]), add_special_tokens=False)


def render_prompt_text(tokenizer, messages, chat: bool) -> str:
    """The text of ``render_prompt_ids``: what a runtime that tokenizes it itself (llama.cpp, Ollama) is given."""
    msgs = list(messages)
    last = max(i for i, (r, _) in enumerate(msgs) if r == "assistant")
    if chat:
        return template(tokenizer, msgs[:last], tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + plain_prompt(msgs[:last])


def plain_prompt(msgs) -> str:
    return "".join(f"{PLAIN_HEADERS[r]}{c}\n\n" for r, c in msgs) + PLAIN_HEADERS["assistant"]


def bos_ids(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []
