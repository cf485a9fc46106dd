"""``hwcompat data check FILE…``: the trainer's data checks, alone."""

from __future__ import annotations

import argparse
import sys

from hwcompat.choices import CHAT_TEMPLATE, DATA_FORMATS, OBJECTIVES, OVERLONG, Method


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="check training data (JSONL, gzip, CSV/TSV, Parquet, Arrow, save_to_disk folders)")
    dsub = p.add_subparsers(dest="data_command", metavar="check")
    dsub.required = True
    c = dsub.add_parser("check", help="check data files: encoding, NUL bytes, JSON, fields, roles, duplicates",
                        description="Exit 0 when the files can be trained on, 1 when any row has an error.")
    c.add_argument("files", nargs="+", metavar="FILE",
                   help="training data: prompt/completion, messages (chat), ShareGPT or alpaca rows (with --method "
                        "dpo preference pairs) in JSONL, gzip (.jsonl.gz, .csv.gz, .tsv.gz), CSV/TSV, Parquet, Arrow or "
                        "a datasets save_to_disk folder. Without --tokenizer only the text checks run")
    c.add_argument("--eval", nargs="*", default=[], metavar="FILE", help="eval files (checked for leakage)")
    c.add_argument("--format", choices=DATA_FORMATS, default="auto")
    c.add_argument("--columns", metavar="MAPPING", default="",
                   help="the file's columns as the format's fields, as the config's columns: key, e.g. "
                        "'{prompt: question, completion: answer}'")
    c.add_argument("--method", choices=OBJECTIVES, default="sft",
                   help="dpo: the files hold preference pairs (prompt, chosen, rejected), checked as `train` does; "
                        "grpo: prompt rows, their answer optional (the rewards' reference)")
    c.add_argument("--tokenizer", metavar="DIR", help="also run the token-level checks (over-long rows, rows left "
                                                       "with no response tokens, length outliers) with this tokenizer")
    c.add_argument("--max-seq-len", type=int, default=1024,
                   help="the run's max_seq_len (default 1024): rows far beyond it are errors even without --tokenizer")
    c.add_argument("--overlong", choices=OVERLONG, default="truncate")
    c.add_argument("--chat-template", choices=CHAT_TEMPLATE, default="auto")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwcompat.errors import InputError
    from hwcompat.train.config_values import RANGES, inside

    from hwcompat.data.problems import Report
    from hwcompat.data.rows import check_rows, read_jsonl

    if not inside(args.max_seq_len, RANGES["max_seq_len"]):  # the flag's mistake, not every row's
        raise InputError(f"--max-seq-len {args.max_seq_len}: must be in {RANGES['max_seq_len']} (tokens per example, "
                         "as the run's max_seq_len)")
    from hwcompat.train.config_values import columns_mapping

    args.columns = columns_mapping("columns", args.columns, "--columns", from_text=True)
    report = Report()
    if args.method == Method.dpo:
        _pair_checks(args, report)
    elif args.method == Method.grpo:  # prompt rows; an answer, where a row has one, is the rewards' reference
        from hwcompat.data.rows import read_prompts

        for f in [*args.files, *args.eval]:
            report.counts.setdefault(str(f), len(read_prompts(f, report, columns=args.columns)))
    else:
        train = [e for f in args.files for e in read_jsonl(f, args.format, report, max_seq_len=args.max_seq_len,
                                                           columns=args.columns)]
        evals = [e for f in args.eval for e in read_jsonl(f, args.format, report, max_seq_len=args.max_seq_len,
                                                          columns=args.columns)]
        if not report.errors:
            check_rows(train, evals, report)
        if not report.errors and args.tokenizer:
            _token_checks(args, train, evals, report)
    if args.json:
        from hwcompat.cli.common import print_json

        print_json({"ok": report.ok, "errors": report.errors, "warnings": report.warnings, "rows": report.counts,
                    "containers": report.sources, "formats": report.formats})
    else:
        print(report.render(), file=sys.stdout if report.ok else sys.stderr)
        if report.ok:
            print("ok: no errors")
    return 0 if report.ok else 1


def _token_checks(args: argparse.Namespace, train, evals, report) -> None:
    """The checks the trainer runs after tokenising, with the same code."""
    from hwcompat import hfload
    from hwcompat.train import batching

    tok = hfload.tokenizer(args.tokenizer, "--tokenizer")
    chat = batching.uses_chat_template(tok, args.chat_template)
    batching.tokenize_all(tok, train, chat, args.max_seq_len, args.overlong, report, "train")
    batching.tokenize_all(tok, evals, chat, args.max_seq_len, args.overlong, report, "eval")


def _pair_checks(args: argparse.Namespace, report) -> None:
    """Preference pairs: the reader's checks, then (with --tokenizer) the trainer's own tokenisation of both sides."""
    from hwcompat.data.rows import check_rows
    from hwcompat.data.pairs import read_pairs

    train = [x for f in args.files for x in read_pairs(f, report, max_seq_len=args.max_seq_len, columns=args.columns)]
    evals = [x for f in args.eval for x in read_pairs(f, report, max_seq_len=args.max_seq_len, columns=args.columns)]
    if not report.errors:
        check_rows(train, evals, report, "duplicate pairs in train", "eval prompts also in train")
    if not report.errors and args.tokenizer:
        from hwcompat import hfload
        from hwcompat.train import batching
        from hwcompat.train.config import TrainConfig
        from hwcompat.train.objectives.dpo import DPO

        tok = hfload.tokenizer(args.tokenizer, "--tokenizer")
        dpo = DPO(TrainConfig(max_seq_len=args.max_seq_len), None, None)
        dpo.tokenizer, dpo.chat = tok, batching.uses_chat_template(tok, args.chat_template)
        dpo._tokenize(train, report, "train")
        dpo._tokenize(evals, report, "eval")
