"""Export: GGUF for llama.cpp and an Ollama Modelfile."""

#: The GGUF types hwcompat writes; the one list the CLI, the config and the writer share.
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")
