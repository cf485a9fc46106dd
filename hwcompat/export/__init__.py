"""Export: GGUF for llama.cpp and an Ollama Modelfile."""

#: The GGUF types hwcompat writes; the one list the CLI, the config and the writer share.
#: q4_k_m … q5_0 come from llama.cpp's quantizer (export/quantize.py, the optional extra hwcompat[gguf]).
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")
