"""An Ollama Modelfile next to the GGUF: FROM, a TEMPLATE from the chat template, stops, parameters.

Ollama's TEMPLATE is a Go template, not Jinja, so the model's chat template is
recognised by its markers (ChatML, Llama 3, Mistral [INST], Gemma, or the
plain "### User:" headers hwcompat trains with when a tokenizer has none)
and the matching Go template is written. Extraction and classification
adapters want deterministic output: temperature 0 by default.
"""

from __future__ import annotations

import json
from pathlib import Path

from hwcompat.errors import InputError

TEMPLATES = {
    "chatml": ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ["<|im_end|>", "<|im_start|>"]),
    "llama3": ('<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}'
               '<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
               '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
               ["<|eot_id|>", "<|start_header_id|>"]),
    "mistral": ('{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if $.System }}{{ $.System }}\n\n{{ end }}'
                '{{ .Content }}[/INST]{{ else }} {{ .Content }}</s>{{ end }}{{ end }}', ["[INST]", "</s>"]),
    "gemma": ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
              '{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n', ["<end_of_turn>"]),
    # hwcompat's plain format (batching.PLAIN_HEADERS) for models trained without a chat template
    "plain": ('{{- if .System }}### System:\n{{ .System }}\n\n{{ end }}{{- range .Messages }}'
              '{{- if eq .Role "user" }}### User:\n{{ .Content }}\n\n{{ else }}### Assistant:\n{{ .Content }}\n\n'
              '{{ end }}{{ end }}### Assistant:\n', ["### User:", "### System:"]),
}


def detect_template(model_dir: Path) -> str:
    tcfg = model_dir / "tokenizer_config.json"
    template = ""
    if tcfg.exists():
        template = json.loads(tcfg.read_text()).get("chat_template") or ""
    if not template and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    if not template:
        return "plain"
    for marker, kind in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral"),
                         ("<start_of_turn>", "gemma")):
        if marker in template:
            return kind
    raise InputError(f"{model_dir}: the chat template matches no known family (ChatML, Llama 3, Mistral, Gemma); "
                     "write the Modelfile TEMPLATE by hand")


def write_modelfile(gguf_path: Path, model_dir: Path, temperature: float = 0.0, system: str | None = None,
                    num_ctx: int | None = None, overwrite: bool = False) -> tuple[Path, str]:
    """Write ``Modelfile`` beside the GGUF (never over a hand-written one without ``overwrite``);
    returns (path, the `ollama create` command)."""
    from hwcompat.fsutil import atomic_write_text, output_target

    kind = detect_template(model_dir)
    template, stops = TEMPLATES[kind]
    lines = [f"# Written by hwcompat export ({kind} chat template)", f"FROM ./{gguf_path.name}",
             f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    with output_target(gguf_path.parent / "Modelfile", "hwcompat export", overwrite) as path:
        atomic_write_text(path, "\n".join(lines) + "\n")
    name = gguf_path.stem.lower().replace("_", "-")
    return path, f"ollama create {name} -f {path}"
