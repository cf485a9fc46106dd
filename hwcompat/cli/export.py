"""``hwcompat export MODEL_DIR --gguf OUT.gguf [--type f16|q8_0|…] [--ollama]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hwcompat.choices import EXPORT_TYPES


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
    v = p.add_argument_group("verify in llama.cpp (needs hwcompat[gguf]; on by default when it is installed)")
    v.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="load the GGUF in llama.cpp and compare tokenization, next-token distributions and greedy "
                        "answers with the merged model; figures in OUT.export.json")
    v.add_argument("--data", metavar="EVAL.jsonl", help="verify on these rows (SFT format) and compare task metrics "
                                                       "(default: bundled general prompts)")
    v.add_argument("--verify-rows", type=int, default=8, metavar="N", help="prompts to generate for (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat.errors import InputError
    from hwcompat.export.gguf import export_gguf

    if args.tag:
        from hwcompat.export.ollama import check_tag

        if not args.ollama:
            raise InputError("--tag names the Ollama model: use it with --ollama")
        check_tag(args.tag)

    if args.ollama:  # everything the Modelfile needs is checked before the GGUF is written
        from hwcompat.export.ollama import check_gguf_name, check_system
        from hwcompat.sampling import check_temperature

        check_gguf_name(Path(args.gguf))
        check_system(args.system)
        check_temperature(args.temperature)
        if (Path(args.gguf).parent / "Modelfile").is_dir():
            raise InputError(f"{Path(args.gguf).parent / 'Modelfile'} is a folder; the Modelfile is written at that "
                             "name: move the folder or export into another folder (nothing was written)")
    if args.ollama and (Path(args.gguf).parent / "Modelfile").exists() and not args.overwrite:
        raise InputError(f"{Path(args.gguf).parent / 'Modelfile'} already exists; pass --overwrite to replace it "
                         "(nothing was written)")
    verify = _verify_wanted(args)
    res = export_gguf(args.model, args.gguf, args.type, overwrite=args.overwrite)
    print(f"wrote {res.path} ({res.arch}, {res.tensors} tensors, {res.qtype}, pre-tokenizer {res.pre_tokenizer})")
    if res.note:
        print(f"llama.cpp: {res.note} (rows not a multiple of the type's block; see `--verify`)")
    if res.tokenizer == "gpt2" and res.pre_tokenizer == "default":
        print("note: the pre-tokenizer was not recognised; llama.cpp will use its default regex")
    if verify and not _verified(args, res):
        return 1
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


def _verify_wanted(args) -> bool:
    import importlib.util

    from hwcompat.errors import InputError

    if args.verify is None:
        args.verify = importlib.util.find_spec("llama_cpp") is not None
    if args.verify_rows < 1:
        raise InputError(f"--verify-rows {args.verify_rows}: give 1 or more")
    if args.verify and args.data and not Path(args.data).is_file():
        raise InputError(f"--data {args.data}: no such file (nothing was written)")
    if args.verify and importlib.util.find_spec("llama_cpp") is None:
        from hwcompat.export.quantize import missing

        raise missing(None)  # before the GGUF is written, not after
    if args.verify and args.data:
        from hwcompat.export.verify import prompts_from

        prompts_from(args.data, args.verify_rows)  # its rows are checked now, not after the GGUF is written
    return args.verify


def _verified(args, res) -> bool:
    """Verify the written GGUF; its figures go beside it. False (and the first failure shown) when it fails."""
    import sys

    from hwcompat.export.verify import report_path, verify
    from hwcompat.fsutil import atomic_write_json

    verdict = verify(args.model, res.path, res.qtype, args.data, args.verify_rows,
                     progress=lambda m: print(m, file=sys.stderr))
    atomic_write_json(report_path(res.path), verdict.as_json())
    d, g = verdict.distributions, verdict.generations
    for note in verdict.notes:
        print(f"note: {note}")
    if d:
        t = verdict.tokenization
        shifted = f" (but for a leading space in {t['space_prefix']})" if t.get("space_prefix") else ""
        print(f"verified in llama.cpp: tokenization identical on {t['strings']} strings{shifted}; "
              f"mean KL {d['mean_kl']:.4f}, top-1 {d['top1_agreement']:.1%} over {d['positions']} positions; "
              f"{g['identical']}/{g['prompts']} greedy answers identical")
    for key in g.get("metrics_hf", {}):
        print(f"  {key:14} HF {g['metrics_hf'][key]:.3f}   GGUF {g['metrics_gguf'][key]:.3f}")
    if not verdict.passed:
        print(f"error: --verify failed: {verdict.failures[0]}"
              + (f" (and {len(verdict.failures) - 1} more)" if len(verdict.failures) > 1 else "")
              + f"\nthe GGUF is kept for inspection; figures in {report_path(res.path)}. Not writing a Modelfile.",
              file=sys.stderr)
        return False
    print(f"wrote {report_path(res.path)}")
    return True
