"""``hwcompat export MODEL_DIR --gguf OUT.gguf [--type f16|q8_0|…] [--ollama]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hwcompat.choices import EXPORT_TYPES
from hwcompat.pipeline.export_chain import ExportOptions, export_model


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a merged model to GGUF (llama.cpp) and an Ollama Modelfile")
    p.add_argument("model", help="a model folder (the output of `hwcompat merge`)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf")
    p.add_argument("--type", default="f16", choices=EXPORT_TYPES)
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile next to the GGUF")
    p.add_argument("--temperature", type=float, default=0.0, help="Modelfile temperature (default 0: extraction)")
    p.add_argument("--system", help="Modelfile SYSTEM prompt")
    p.add_argument("--tag", metavar="NAME:VERSION", help="with --ollama: print the `ollama create NAME:VERSION` command "
                                                          "and the `ollama cp … NAME:latest` that promotes it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF / Modelfile")
    p.add_argument("--force", action="store_true", help="export a model merged from a run its regression guard "
                                                         "flagged (worse than its base on your task)")
    q = p.add_argument_group("importance matrix (k-quants and q4_0/q5_0: llama-quantize --imatrix)")
    q.add_argument("--imatrix", nargs="?", const="", default=None, metavar="FILE.gguf",
                   help="weight the quantization by how much each column's activations matter on your rows: without "
                        "FILE, measured now and written as OUT.imatrix.gguf (llama.cpp's format); with FILE, one "
                        "llama-imatrix or an earlier export wrote")
    q.add_argument("--imatrix-data", metavar="TRAIN.jsonl", help="the rows to measure on (SFT format; default: "
                                                                 "--data, else bundled general prompts)")
    v = p.add_argument_group("verify in llama.cpp (needs hwcompat[gguf]; on by default when it is installed)")
    v.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="load the GGUF in llama.cpp and compare tokenization, next-token distributions and greedy "
                        "answers with the merged model; figures in OUT.export.json")
    v.add_argument("--data", metavar="EVAL.jsonl", help="verify on these rows (SFT format) and compare task metrics "
                                                       "(default: bundled general prompts)")
    v.add_argument("--verify-rows", type=int, default=8, metavar="N", help="prompts to generate for (default 8)")
    p.set_defaults(func=run)


def options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(gguf=Path(args.gguf), qtype=args.type, ollama=args.ollama, temperature=args.temperature,
                         system=args.system, tag=args.tag, overwrite=args.overwrite, verify=args.verify,
                         data=args.data, verify_rows=args.verify_rows, force=args.force, imatrix=args.imatrix,
                         imatrix_data=args.imatrix_data)


def run(args: argparse.Namespace) -> int:
    return export_model(Path(args.model), options(args))
