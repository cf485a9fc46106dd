"""Look at a finished run without training: ``generate`` (what does it answer?) and ``eval`` (how well, on any data?).

    python -m hwcompat.train.inspect_run '{"what": "generate", "run_dir": "RUN", "prompt": "…", …}'

Started by ``hwcompat generate`` / ``hwcompat eval`` (cli/inspect.py checks the flags and sends one typed
``Request`` as JSON) with the run's profile environment set (so torch first loads here, after it), like the trainer.
The base model is loaded in the run's dtype and attention kernel with the run's adapter on top, and prompts are
rendered with the same chat-template decision as training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from hwcompat.errors import DataError, HwcompatError, InputError
from hwcompat.choices import Finetune


@dataclass(frozen=True)
class Request:
    """What ``hwcompat generate`` / ``hwcompat eval`` asked for, already checked by the CLI (cli/inspect.py): the
    one value that crosses the exec into this process, as JSON (argparse stays in cli/)."""

    what: str  # generate | eval
    run_dir: str
    prompt: str | None = None  # generate: one prompt, or
    file: str | None = None  # generate: a JSONL of prompts
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # generate's sampling seed; eval --pairs' too
    data: str | None = None  # eval: the rows to score
    general: bool = False  # eval: forgetting on the bundled general prompts
    predictions: str | None = None  # eval: where to write each row's answer (resolved path)
    pairs: str | None = None  # eval: where to write preference pairs from the mistakes (resolved path)
    samples: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Request":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known or raw.get("what") not in ("generate", "eval"):
            raise InputError(f"inspect_run: not a request from `hwcompat generate` / `hwcompat eval`: {text[:200]}")
        return cls(**raw)


def _load(run_dir: Path):
    """(spec, model with the adapter, tokenizer, device) for a finished run."""
    import torch
    from peft import PeftModel
    from hwcompat import hfload

    from hwcompat.train.model import load_model
    from hwcompat.train.spec import load_spec

    spec = load_spec(run_dir / "run.json")
    if spec.config.finetune == Finetune.full:
        return _load_full(run_dir, spec)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        raise InputError(f"{run_dir}: no adapter/ yet (the run has not finished); train it to the end first")
    from hwcompat.weights import read_header

    base = Path(spec.config.model)
    if not (base / "config.json").is_file() and not spec.config.allow_network:
        raise InputError(f"{run_dir}: the run's base model {base} is gone (no config.json there); the adapter needs "
                         "it: put the model back at that path, or merge the adapter into a copy of it with "
                         f"`hwcompat merge {run_dir} --base NEW_PATH --out DIR`")
    read_header(adapter / "adapter_model.safetensors")  # a half-written adapter is an error naming the file
    from hwcompat.train.model import accelerator

    backend = accelerator(spec.device.kind)
    device = torch.device(spec.device.kind if backend is not None and backend.is_available() else "cpu")
    cfg = replace(spec.config, init_adapter=str(adapter), qlora=False)
    model = load_model(cfg, spec.profile, device).eval()
    if not isinstance(model, PeftModel):
        raise HwcompatError(f"{adapter}: did not load as a PEFT adapter")
    tokenizer = hfload.tokenizer(adapter, "adapter", trust_remote_code=spec.config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return spec, model, tokenizer, device


def _device(spec):
    import torch

    from hwcompat.train.model import accelerator

    backend = accelerator(spec.device.kind)
    return torch.device(spec.device.kind if backend is not None and backend.is_available() else "cpu")


def _load_full(run_dir: Path, spec):
    """A full fine-tune's model/ in the run's dtype; its ``disable_adapter()`` swaps the run's base weights in (the
    comparisons eval makes, base against trained, are the LoRA run's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hwcompat import hfload
    from hwcompat.hfload import check_folder
    from hwcompat.train import cpu_attention

    folder = run_dir / "model"
    if not (folder / "config.json").is_file():
        raise InputError(f"{run_dir}: no model/ yet (the run has not finished); train it to the end first")
    check_folder(str(folder), "model", spec.config.trust_remote_code)
    dtype = getattr(torch, spec.profile.dtype)
    device = _device(spec)
    attention = cpu_attention.implementation(spec.profile.attention)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attention,
                                                 trust_remote_code=spec.config.trust_remote_code,
                                                 use_safetensors=True).to(device).eval()
    model.disable_adapter = lambda: _base_weights(model, spec.config.model, dtype)
    tokenizer = hfload.tokenizer(folder, "model", trust_remote_code=spec.config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return spec, model, tokenizer, device


_BASE: dict[str, dict] = {}


def _base_weights(model, base: str, dtype):
    """The run's starting weights swapped into ``model`` (read once, kept for later swaps)."""
    from hwcompat.train.objectives import swapped_in

    if base not in _BASE:
        if not (Path(base) / "config.json").is_file():
            raise InputError(f"the run's base model {base} is gone (no config.json there); comparing with the "
                             "base needs it: put the model back at that path")
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(Path(base).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        if "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:  # a tied head
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        _BASE[base] = weights
    return swapped_in(model, _BASE[base], dtype)


def _prompts(args: Request, columns) -> list[list[tuple[str, str]]]:
    """--prompt text, or --file JSONL rows with "prompt" (a string) or "messages" (ending with a user turn)."""
    from hwcompat.textcheck import text_problem
    from hwcompat.data.problems import Report
    from hwcompat.data.rows import read_prompts

    if args.prompt is not None:
        if text_problem(args.prompt):
            raise InputError(f"--prompt: {text_problem(args.prompt)}")
        return [[("user", args.prompt)]]
    report = Report()
    rows = read_prompts(args.file, report, columns=columns)
    if report.errors:
        raise InputError(f"--file {args.file}: " + "; ".join(report.errors[:5]))
    return [list(msgs) for msgs, _, _ in rows]


def generate(args: Request) -> int:
    import torch

    from hwcompat.train import batching
    from hwcompat.train.model import autocast

    spec, model, tokenizer, device = _load(Path(args.run_dir))
    chat = batching.uses_chat_template(tokenizer, spec.config.chat_template)
    torch.manual_seed(args.seed)
    from hwcompat.progress import Progress

    sample = args.temperature > 0
    prompts = _prompts(args, spec.config.columns)  # a --file in the run's own columns reads as its training data did
    bar = Progress(len(prompts), desc="generate", unit="prompt", transient=True, enabled=len(prompts) > 1)
    for msgs in prompts:
        ids = batching.render_prompt_ids(tokenizer, msgs + [("assistant", "")], chat)
        with torch.no_grad(), autocast(device, spec.profile.dtype):
            out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens,
                                 do_sample=sample, temperature=args.temperature if sample else None,
                                 top_p=args.top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        print(text if args.prompt is not None else json.dumps({"prompt": msgs[-1][1], "output": text}), flush=True)
        bar.update(1)
    bar.close()
    return 0


def evaluate(args: Request) -> int:
    """The objective's metrics on a data file, adapted model and base side by side; --general: forgetting."""
    if args.general:
        _summary(Path(args.run_dir))  # a damaged summary.json is said before the compute, not after it
    spec, model, tokenizer, device = _load(Path(args.run_dir))
    out: dict = {}
    if args.data and (args.predictions or args.pairs):
        out.update(_mistakes(args, spec, model, tokenizer, device))
    if args.data:
        out.update(_task_eval(args, spec, model, tokenizer, device))
    if args.general:
        from hwcompat.train import batching

        from hwcompat.train.forgetting import forgetting, kl_scale

        chat = batching.uses_chat_template(tokenizer, spec.config.chat_template)
        out["general"] = forgetting(model, tokenizer, chat, device, spec.profile.dtype)
        g = out["general"]
        print(f"general prompts ({g['prompts']}, {g['tokens']} tokens of the base's own answers): KL(adapted||base) "
              f"{g['kl_per_token']:.4f} nats per token; their log-likelihood per token: base "
              f"{g['base_answers_logp_per_token']['base']:.3f}, adapted {g['base_answers_logp_per_token']['adapted']:.3f}",
              file=sys.stderr)
        print(kl_scale(g["kl_per_token"]), file=sys.stderr)
        _record(Path(args.run_dir), g)
    print(json.dumps(out, indent=2))
    return 0


def _record(run_dir: Path, general: dict) -> None:
    """summary.json carries the forgetting figures (replaced atomically)."""
    import dataclasses

    from hwcompat import summary as summary_file

    summary = _summary(run_dir)
    if summary is not None:
        summary_file.write(run_dir, dataclasses.replace(summary, forgetting=general))


def _summary(run_dir: Path):
    """The run's summary (None when it has none), or an error naming it when it is damaged."""
    from hwcompat import summary as summary_file

    try:
        return summary_file.read(run_dir)
    except InputError as exc:
        raise InputError(f"{exc}. (It is the run's record of its results: rerun `hwcompat train` with --overwrite "
                         "to rebuild it, or move it away to evaluate without recording.)") from None


def _mistakes(args, spec, model, tokenizer, device) -> dict:
    """--predictions: each row's answer and metrics; --pairs: preference pairs from the model's mistakes and, for
    rows it gets right, its most likely wrong sample (train/mistakes.py). Both written atomically."""

    from hwcompat.data.chat import render_prompt_ids, uses_chat_template
    from hwcompat.data.problems import Report
    from hwcompat.data.rows import read_prompts
    from hwcompat.fsutil import atomic_write_text
    from hwcompat.train import mistakes
    from hwcompat.train.model import autocast
    from hwcompat.train.objectives.sft import generate as greedy

    cfg, report = spec.config, Report()
    rows = [mistakes.Row(tuple(m), ref, where) for m, ref, where in read_prompts(args.data, report,
                                                                               columns=cfg.columns)]
    if report.errors:
        raise DataError(f"--data {args.data}: data checks failed; nothing was evaluated\n{report.render()}")
    chat = uses_chat_template(tokenizer, cfg.chat_template)
    ids = [render_prompt_ids(tokenizer, (*r.messages, ("assistant", "")), chat) for r in rows]
    refs = [r.reference for r in rows if r.reference is not None]
    kind = cfg.eval_metrics if cfg.eval_metrics in mistakes.ROW_KEYS else metrics_kind(refs)
    max_new = cfg.eval_max_new_tokens or max((len(tokenizer.encode(x, add_special_tokens=False)) for x in refs),
                                             default=112) + 16
    answers = greedy(model, tokenizer, ids, max_new, device, spec.profile.dtype)
    out = {"predictions": mistakes.predictions(rows, answers, kind)}
    if args.pairs:
        good = [i for i, p in enumerate(out["predictions"]) if p["correct"]]
        with autocast(device, spec.profile.dtype):
            sampled = mistakes.sample_answers(model, tokenizer, [ids[i] for i in good], args.samples, max_new, device,
                                              args.seed)
        found = mistakes.confusable(rows, answers, kind, dict(zip(good, sampled)))
        out["pairs"] = mistakes.pairs(rows, answers, kind, found)
    right = sum(1 for p in out["predictions"] if p["correct"])
    said = {"predictions": len(out["predictions"]), "right": right}
    for flag, key in ((args.predictions, "predictions"), (args.pairs, "pairs")):
        if flag:
            atomic_write_text(Path(flag), "".join(json.dumps(r) + "\n" for r in out[key]))
            said[f"{key}_file"] = flag
    if args.pairs:
        said["pairs"] = len(out["pairs"])
        said["pairs_from_mistakes"] = sum(p["source"] == "mistake" for p in out["pairs"])
    print(f"{len(rows)} rows, {right} right ({kind} task)" + (
        f"; {said['pairs']} pairs ({said['pairs_from_mistakes']} from mistakes, the rest from right rows' likeliest "
        f"wrong sample of {args.samples}) -> {args.pairs}" if args.pairs else "") + (
        f"; predictions -> {args.predictions}" if args.predictions else ""), file=sys.stderr)
    return {"mistakes": said}


def metrics_kind(references: list[str]) -> str:
    from hwcompat.data.metrics import detect_kind

    return detect_kind(references) if references else "exact"


def _task_eval(args, spec, model, tokenizer, device) -> dict:
    from hwcompat.train.objectives import create

    cfg = replace(spec.config, train_data=[args.data], eval_data=[args.data], init_adapter=None)
    objective = create(cfg.method, cfg, spec.profile, device)
    try:
        objective.load(tokenizer, lambda m: print(m, file=sys.stderr))
    except DataError as exc:
        report = getattr(exc, "report", None)
        if report is None:
            raise
        text = report.render().replace("raise max_seq_len or shorten the prompt", "the run was trained with "
                                       f"max_seq_len={cfg.max_seq_len}: shorten the prompt or drop the row")
        raise DataError(f"--data {args.data}: data checks failed; nothing was evaluated\n{text}") from None
    with model.disable_adapter():
        objective.bind(model, "eager")  # a DPO reference is the base
        base = _numbers(objective.evaluate(model, with_tasks=True))
    adapted = _numbers(objective.evaluate(model, with_tasks=True))
    print(f"{'metric':16} {'base':>8} {'adapted':>8}", file=sys.stderr)
    for k in (k for k in adapted if k != "n"):
        print(f"{k:16} {base.get(k, float('nan')):8.3f} {adapted[k]:8.3f}", file=sys.stderr)
    return {"data": args.data, "base": base, "adapted": adapted}


def _numbers(metrics: dict) -> dict:
    """The metrics of an eval (GRPO's also carry sampled completions, which belong to the run's report)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def main(argv: list[str] | None = None) -> int:
    """One argument: a ``Request`` as JSON (cli/inspect.py)."""
    from hwcompat.train.library_logs import quiet_library_loggers

    quiet_library_loggers()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise InputError("inspect_run: give one request (JSON); run it as `hwcompat generate` / `hwcompat eval`")
        request = Request.from_json(argv[0])
        return generate(request) if request.what == "generate" else evaluate(request)
    except (HwcompatError, json.JSONDecodeError, TypeError) as exc:
        code = exc.exit_code if isinstance(exc, HwcompatError) else 2
        print(f"hwcompat: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
