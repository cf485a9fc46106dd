"""hwcompat: fine-tune an LLM on the GPU you already have.

Importing this package does no hardware work and loads neither torch, pynvml
nor amdsmi; every probe and every heavy import happens inside the function
that needs it.
"""

__version__ = "0.1.0"
