"""An Ollama Modelfile next to the GGUF: FROM, a TEMPLATE that renders what the chat template renders, stops.

Ollama's TEMPLATE is a Go template, not Jinja, so the model's chat template is recognised by its markers
(ChatML, Llama 3, Mistral [INST], Gemma, Phi-3, or the plain "### User:" headers hwcompat trains with when a
tokenizer has none) and the matching Go template is written. How Ollama fills it (template/template.go,
server/routes.go): the Modelfile's SYSTEM becomes a leading system message unless the conversation starts
with one; ``.Messages`` holds every message *including* the system ones (consecutive same-role messages
merged), and ``.System`` their joined text. So the templates loop over ``.Messages`` only (printing ``.System``
as well would print the system prompt twice), a chat template's default system prompt (SmolLM2's, Qwen2.5's)
is read by rendering it and written in for conversations without one, and no template starts with a BOS
text: the GGUF's ``add_bos_token`` makes llama.cpp add it (a literal one would be a second BOS).
``tests/test_ollama_template.py`` renders every kind with Go's text/template the way Ollama does and compares
with ``apply_chat_template``. Go templates have no trim: content with surrounding whitespace keeps it (Llama
3's template strips it). Extraction and classification adapters want deterministic output: temperature 0.
"""

from __future__ import annotations

import re
from pathlib import Path

from hwcompat.errors import InputError
from hwcompat.sampling import check_temperature

LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"  # Ollama's own idiom for "the last message"

#: kind -> (Go template with {default} where a default system block goes, stop strings)
TEMPLATES = {
    "chatml": ("{default}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ["<|im_end|>", "<|im_start|>"]),
    "llama3": ("{default}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
               "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ["<|eot_id|>", "<|start_header_id|>"]),
    # Mistral's template puts the system prompt before the *last* user message, inside its [INST]
    "mistral": ("{{- range $i, $_ := .Messages }}" + LAST + "{{- if eq .Role \"user\" }}[INST] "
                "{{ if and $.System $last }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
                "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{- end }}{{- end }}", ["[INST]", "</s>"]),
    # Gemma has no system role: its template folds a system prompt into the first user turn
    "gemma": ("{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}<start_of_turn>user\n"
              "{{ if and $.System (eq (index $.Messages 0).Role \"system\") (eq $i 1) }}{{ $.System }}\n\n{{ end }}"
              "{{ .Content }}<end_of_turn>\n{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}"
              "<end_of_turn>\n{{ end }}{{- end }}<start_of_turn>model\n", ["<end_of_turn>"]),
    # Phi-3: a tag per role, <|end|> after each message (its chat tokens eat the newline after them in llama.cpp
    # and HF alike)
    "phi3": ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
             ["<|end|>", "<|user|>", "<|endoftext|>"]),
    # hwcompat's plain format (batching.PLAIN_HEADERS) for models trained without a chat template
    "plain": ("{{- range .Messages }}{{- if eq .Role \"system\" }}### System:\n{{ .Content }}\n\n"
              "{{ else if eq .Role \"user\" }}### User:\n{{ .Content }}\n\n{{ else }}### Assistant:\n{{ .Content }}"
              "\n\n{{ end }}{{- end }}### Assistant:\n", ["### User:", "### System:"]),
}
#: kind -> the Go text of a default system block ({text} is the chat template's default prompt)
DEFAULT_BLOCKS = {
    "chatml": "<|im_start|>system\n{text}<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
}
MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral"),
           ("<start_of_turn>", "gemma"), ("<|user|>", "phi3"))


def chat_template(model_dir: Path) -> str:
    """The model folder's Jinja chat template ('' when it has none)."""
    tcfg = model_dir / "tokenizer_config.json"
    template = ""
    if tcfg.exists():
        from hwcompat.userfile import read_json_object

        template = read_json_object(tcfg, "tokenizer config").get("chat_template") or ""
    if not template and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    return template if isinstance(template, str) else ""


def detect_template(model_dir: Path) -> str:
    template = chat_template(model_dir)
    if not template:
        return "plain"
    for marker, kind in MARKERS:
        if marker in template:
            return kind
    raise InputError(f"{model_dir}: the chat template matches no known family (ChatML, Llama 3, Mistral, Gemma, Phi-3); "
                     "write the Modelfile TEMPLATE by hand")


def default_system(model_dir: Path, kind: str) -> str | None:
    """The system prompt the chat template injects when a conversation has none (SmolLM2 and Qwen2.5 do),
    read by rendering the template with and without a system message."""
    if kind not in DEFAULT_BLOCKS:
        return None
    from hwcompat import hfload

    tok = hfload.tokenizer(model_dir, "model")
    user = [{"role": "user", "content": "\x00user\x00"}]
    plain = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    head = plain[:plain.index("\x00user\x00")]
    block = DEFAULT_BLOCKS[kind]
    before, _, after = block.partition("{text}")
    start = head.find(before)
    if start < 0 or not head[start + len(before):].count(after):
        return None
    return head[start + len(before):head.index(after, start + len(before))]


def render_template(kind: str, default: str | None) -> str:
    """The Go template for ``kind``; with ``default``, conversations without a system message get it."""
    template, _ = TEMPLATES[kind]
    block = ""
    if default is not None and kind in DEFAULT_BLOCKS:
        block = ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                 + DEFAULT_BLOCKS[kind].replace("{text}", default) + "{{ end }}")
    return template.replace("{default}", block)


#: An Ollama model reference: [namespace/]name:tag (the parts Ollama's name parser accepts, without a host).
TAG = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,79}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,79}:[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_tag(tag: str) -> str:
    """``--tag NAME:VERSION``, checked before anything is written."""
    if not TAG.fullmatch(tag):
        raise InputError(f"--tag {tag!r}: expected NAME:VERSION (letters, digits, '.', '-', '_'; an optional "
                         "namespace/ before the name), e.g. tickets:2026-11-24 or me/tickets:v3")
    return tag


#: A GGUF file name the Modelfile's ``FROM ./NAME`` line can hold as is (no quoting rule of Ollama's is needed).
GGUF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}")


def check_gguf_name(path: Path) -> None:
    """The GGUF's file name goes into ``FROM ./NAME``: a line break there would add Modelfile directives."""
    if not GGUF_NAME.fullmatch(path.name):
        raise InputError(f"--gguf {str(path)!r}: the file name {path.name!r} is written into the Modelfile's FROM line, "
                         "so it may hold only letters, digits, '.', '_', '+' and '-' (no spaces, quotes or line "
                         "breaks); e.g. --gguf out/model-q4_k_m.gguf. Nothing was written")


def check_system(system: str | None) -> None:
    """SYSTEM is written as a triple-quoted block, which Ollama's parser ends at the first \"\"\" (it has no
    escape): a prompt holding one would close the block and add directives (FROM, ADAPTER, PARAMETER …)."""
    if system is None:
        return
    from hwcompat.textcheck import text_problem

    problem = text_problem(system)
    if problem:
        raise InputError(f"--system: {problem}. Nothing was written")
    if '"""' in system or system.endswith('"'):
        raise InputError("--system: the prompt holds three double quotes (\"\"\") or ends with a double quote; "
                         "Ollama's Modelfile has no escape inside a triple-quoted block, so it would end the SYSTEM "
                         "text there and read the rest as directives. Reword it (e.g. use ' or “”). Nothing was "
                         "written")


def release_commands(tag: str, modelfile: Path) -> list[str]:
    """The release flow: a versioned tag first; `latest` only after the export was verified."""
    import shlex

    name = tag.rsplit(":", 1)[0]
    return [f"ollama create {tag} -f {shlex.quote(str(modelfile))}", f"ollama cp {tag} {name}:latest"]


def modelfile_path(gguf_path: Path) -> Path:
    """``q4.gguf`` -> ``q4.Modelfile`` beside it: one Modelfile per GGUF, so two variants exported into one folder
    never fight over one ``Modelfile`` (``ollama create NAME -f q4.Modelfile`` takes any file name)."""
    return gguf_path.with_name(f"{gguf_path.stem}.Modelfile")


def write_modelfile(gguf_path: Path, model_dir: Path, temperature: float = 0.0, system: str | None = None,
                    num_ctx: int | None = None, overwrite: bool = False, tag: str | None = None) -> tuple[Path, str]:
    """Write ``<stem>.Modelfile`` beside the GGUF (never over a hand-written one without ``overwrite``);
    returns (path, the `ollama create` command: with ``tag``, that versioned name)."""
    import shlex

    from hwcompat.fsutil import atomic_write_text, output_target

    check_gguf_name(gguf_path)
    check_system(system)
    temperature = check_temperature(temperature, "temperature")
    if num_ctx is not None and (not isinstance(num_ctx, int) or not 0 < num_ctx <= 1 << 24):
        raise InputError(f"num_ctx {num_ctx}: give a positive number of tokens")
    kind = detect_template(model_dir)
    default = default_system(model_dir, kind)
    _, stops = TEMPLATES[kind]
    lines = [f"# Written by hwcompat export ({kind} chat template"
             f"{', with its default system prompt' if default else ''})", f"FROM ./{gguf_path.name}",
             f'TEMPLATE """{render_template(kind, default)}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    with output_target(modelfile_path(gguf_path), "hwcompat export", overwrite) as path:
        atomic_write_text(path, "\n".join(lines) + "\n")
    if tag:
        return path, release_commands(tag, path)[0]
    name = re.sub(r"[^a-z0-9.-]+", "-", gguf_path.stem.lower()).strip(".-") or "model"
    return path, f"ollama create {name} -f {shlex.quote(str(path))}"
