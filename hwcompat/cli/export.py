"""``hwcompat export MODEL_DIR --gguf OUT.gguf [--type f16|q8_0|…] [--ollama]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hwcompat.export import EXPORT_TYPES


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat.errors import InputError
    from hwcompat.export.gguf import export_gguf

    if args.tag:
        from hwcompat.export.ollama import check_tag

        if not args.ollama:
            raise InputError("--tag names the Ollama model: use it with --ollama")
        check_tag(args.tag)

    if args.ollama and (Path(args.gguf).parent / "Modelfile").exists() and not args.overwrite:
        raise InputError(f"{Path(args.gguf).parent / 'Modelfile'} already exists; pass --overwrite to replace it "
                         "(nothing was written)")
    res = export_gguf(args.model, args.gguf, args.type, overwrite=args.overwrite)
    print(f"wrote {res.path} ({res.arch}, {res.tensors} tensors, {res.qtype}, pre-tokenizer {res.pre_tokenizer})")
    if res.pre_tokenizer == "default":
        print("note: the pre-tokenizer was not recognised; llama.cpp will use its default regex")
    if args.ollama:
        from hwcompat.export.ollama import write_modelfile

        path, cmd = write_modelfile(Path(args.gguf), Path(args.model), args.temperature, args.system,
                                    overwrite=args.overwrite, tag=args.tag)
        print(f"wrote {path}\nrun: {cmd}")
        if args.tag:
            from hwcompat.export.ollama import release_commands

            print(f"then try it (ollama run {args.tag}), and only when it answers right: "
                  f"{release_commands(args.tag, path)[1]}")
    return 0
