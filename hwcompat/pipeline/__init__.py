"""What chains the rooms for one command: launch (resolve -> preflight -> run spec -> exec), the worker (the
recipe, then the export chain when asked and nothing regressed), the torchrun shim, and the one export chain
(merge -> GGUF -> verify -> Modelfile) that ``hwcompat train --export`` and ``hwcompat export`` share.

The trainer (``hwcompat.train``) ends at summary.json and never imports the exporter; this wing is the only
place the two meet, through the run folder's files, as torchtune's recipes meet their quantization recipe."""
