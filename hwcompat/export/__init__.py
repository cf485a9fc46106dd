"""Export: GGUF for llama.cpp and an Ollama Modelfile (the types they write: hwcompat.choices)."""
