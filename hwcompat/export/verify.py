"""Does the GGUF answer like the merged model? Checked in llama.cpp itself (llama-cpp-python), against HF.

A broken export (a wrong rotary permutation, a pre-tokenizer llama.cpp reads differently, a bad quant) loads
and runs; users find out when Ollama answers gibberish. So, cheapest first, each stopping at its first mismatch:

1. tokenization: llama.cpp's ids equal HF's on varied strings (code, whitespace runs, digits, unicode, the chat
   special tokens; catalog/gguf_verify.yaml) and on every prompt below, rendered with the chat template;
2. next-token distributions, teacher-forced on HF's greedy answers: the mean KL divergence of llama.cpp's
   distribution from HF's and top-1 agreement over the answer positions (what llama.cpp's own
   ``llama-perplexity --kl-divergence`` reports to judge a quant);
3. greedy answers through the chat template: how many are identical, and the task metrics of both side by side
   when the prompts come with reference answers (``--data``).

The limits per type are measured, not guessed (catalog/gguf_verify.yaml says on what).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwcompat.errors import HwcompatError, InputError


@dataclass(frozen=True)
class Limits:
    max_kl: float  # mean KL(HF || GGUF) per answer position, nats
    min_top1: float  # share of answer positions where both put the same token first
    min_identical: float  # share of greedy answers identical token for token
    max_metric_drop: float  # task metric points (0-100) the GGUF may lose against HF


@dataclass
class Verdict:
    """What ``--verify`` measured; written to ``<gguf stem>.export.json``."""

    gguf: str
    qtype: str
    limits: dict[str, float]
    tokenization: dict[str, Any] = field(default_factory=dict)
    distributions: dict[str, Any] = field(default_factory=dict)
    generations: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


class VerifyFailed(HwcompatError):
    """The GGUF does not behave like the merged model (exit 1)."""


def limits_for(qtype: str) -> tuple[Limits, list[str]]:
    """The type's limits and the tokenization strings, from catalog/gguf_verify.yaml."""
    from hwcompat.yamlfile import load_packaged_yaml

    from hwcompat.datafiles import data_dir

    table = load_packaged_yaml(data_dir("catalog") / "gguf_verify.yaml", "verification limits")
    return Limits(**table["types"][qtype]), list(table["strings"])


def prompts_from(data: str | None, rows: int, more: int = 0) -> tuple[list[tuple], list[str] | None]:
    """(conversations up to the answer, reference answers or None): ``--data`` (SFT rows), else the bundled
    general prompts (no references: identical-answer rate only). ``rows`` first (the general prompts spread over
    their kinds), then up to ``more`` in all for a verdict that needs more positions."""
    from hwcompat.data.problems import Report
    from hwcompat.data.rows import read_prompts

    if data:
        report = Report()
        picked = read_prompts(data, report, max(rows, more))
        if report.errors:
            raise InputError(f"--data {data}: not usable for --verify (nothing was written)\n" + report.render())
        refs = [ref for _, ref, _ in picked]
        # task metrics need every row's answer; prompt-only rows still give tokenization, KL and greedy answers
        return ([(*msgs, ("assistant", ref or "")) for msgs, ref, _ in picked],
                refs if all(r is not None for r in refs) else None)
    from hwcompat.data import GENERAL_PROMPTS as GENERAL

    lines = GENERAL.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // rows)  # spread over the kinds (facts, arithmetic, code, instructions)
    first = lines[::step][:rows]
    rest = [x for x in lines if x not in first][:max(0, more - len(first))]
    picked = [json.loads(x)["prompt"] for x in first + rest]
    return [(("user", p), ("assistant", "")) for p in picked], None


class _Llama:
    """The GGUF in llama.cpp: full next-token scores for a token sequence, and greedy decoding."""

    def __init__(self, path: Path, n_ctx: int):
        import os

        from hwcompat.export.quantize import binding, quiet

        llama_cpp = binding(None)
        quiet()
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), logits_all=True,
                                       verbose=False, n_threads=os.cpu_count() or 1, n_gpu_layers=0, seed=0)
        except ValueError as exc:
            raise VerifyFailed(f"{path}: llama.cpp cannot load it ({exc})") from None

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    @property
    def space_prefix(self) -> bool:
        """A SentencePiece GGUF that puts a space before every text segment (llama.cpp's add_space_prefix)."""
        meta = self.llm.metadata
        return meta.get("tokenizer.ggml.model") == "llama" and meta.get("tokenizer.ggml.add_space_prefix",
                                                                          "true") == "true"

    def scores(self, ids: list[int]):
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[:len(ids)].copy()

    def greedy(self, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        while len(out) < max_new:
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if tok in stop:
                break
            out.append(tok)
            self.llm.eval([tok])
        return out


def _hf_greedy(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=sorted(stop), pad_token_id=sorted(stop)[0])
    ids = out[0, len(prompt):].tolist()
    return ids[:next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def _kl_top1(hf_logits, gguf_scores) -> tuple[list[float], list[bool]]:
    """Per position: KL(HF || GGUF) in nats, and whether both rank the same token first."""
    import numpy as np

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(hf_logits), log_softmax(gguf_scores[:, :hf_logits.shape[-1]])
    kl = (np.exp(p) * (p - q)).sum(-1)
    return kl.tolist(), (hf_logits.argmax(-1) == gguf_scores[:, :hf_logits.shape[-1]].argmax(-1)).tolist()


#: One-sided 95 %: a share is "below the limit" only when its Wilson upper bound is, "at or above" only when its
#: lower bound is; between, the verdict is inconclusive and the task metric on the user's rows decides.
Z_95 = 1.645
#: Positions a top-1 share needs so that its 95 % bound is this close to the limit (binomial: z^2 p(1-p) / m^2).
TOP1_MARGIN = 0.03
#: Prompts verification generates for at most, to reach those positions (from --data, else the general prompts).
MAX_VERIFY_ROWS = 64


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a share (its bounds at ``z``), sound at small n and near 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def positions_needed(limit: float, margin: float = TOP1_MARGIN, z: float = Z_95) -> int:
    """Answer positions for a top-1 verdict whose bound is within ``margin`` of ``limit``."""
    return math.ceil(z * z * limit * (1 - limit) / (margin * margin))


def verify(model_dir: str | Path, gguf_path: str | Path, qtype: str, data: str | None = None, rows: int = 8,
           max_new_tokens: int = 48, progress=print) -> Verdict:
    """Run the three checks; the verdict lists every failure (the CLI shows the first and exits 1). ``rows`` prompts
    at least, more (up to MAX_VERIFY_ROWS) until the answers hold ``positions_needed`` positions."""
    import torch
    from hwcompat import hfload
    from hwcompat.data import chat as render, metrics

    limits, strings = limits_for(qtype)
    verdict = Verdict(str(gguf_path), qtype, asdict(limits))
    tok = hfload.tokenizer(model_dir, "model")
    chat = render.uses_chat_template(tok, "auto")
    convs, refs = prompts_from(data, rows, MAX_VERIFY_ROWS)
    needed = positions_needed(limits.min_top1)
    prompts = [render.render_prompt_ids(tok, c, chat) for c in convs]
    rendered = [render.render_prompt_text(tok, c, chat) for c in convs]
    llm = _Llama(Path(gguf_path), n_ctx=max(len(p) for p in prompts) + max_new_tokens + 8)

    # 1. tokenization: the fixed strings, the tokenizer's own special tokens, and the rendered prompts
    texts = strings + [" ".join(tok.all_special_tokens)] + rendered
    _check_tokenization(verdict, tok, llm, texts, prompts=len(rendered))
    if verdict.failures:
        return verdict

    # 2. distributions, teacher-forced on HF's greedy answers; 3. greedy answers
    model = hfload.causal_lm(model_dir, dtype="auto")
    model.eval()
    stop = {t for t in (tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)) if t is not None}
    kls, top1, hf_answers, gg_answers = [], [], [], []
    for i, prompt in enumerate(prompts):
        if i >= rows and len(kls) >= needed:  # enough positions for a bounded verdict
            break
        progress(f"verify: prompt {i + 1} ({len(kls)} of {needed} answer positions)")
        answer = _hf_greedy(model, prompt, max_new_tokens, stop)
        ids = prompt + answer
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        span = slice(len(prompt) - 1, len(ids))  # the positions that predict the answer and what follows it
        k, t = _kl_top1(logits[span], llm.scores(ids)[span])
        kls += k
        top1 += t
        hf_answers.append(answer)
        gg_answers.append(llm.greedy(llm.tokenize(rendered[i]), max_new_tokens, stop))  # as Ollama: its own ids
    verdict.distributions = {"positions": len(kls), "positions_needed": needed, "mean_kl": sum(kls) / len(kls),
                             "max_kl": max(kls), "top1_agreement": sum(top1) / len(top1),
                             "top1_bounds_95": list(wilson(sum(top1), len(top1)))}
    done = len(hf_answers)
    refs = refs[:done] if refs is not None else None
    same = sum(a == b for a, b in zip(hf_answers, gg_answers))
    decode = [tok.decode(a, skip_special_tokens=True).strip() for a in hf_answers]
    decode_gg = [tok.decode(a, skip_special_tokens=True).strip() for a in gg_answers]
    verdict.generations = {"prompts": done, "identical": same, "identical_share": same / done,
                           "identical_bounds_95": list(wilson(same, done)),
                           "first_difference": next(({"hf": a, "gguf": b} for a, b in zip(decode, decode_gg)
                                                     if a != b), None)}
    if refs is not None:
        verdict.generations["metrics_hf"] = metrics.score(decode, refs)
        verdict.generations["metrics_gguf"] = metrics.score(decode_gg, refs)
    _judge(verdict, limits)
    return verdict


def _check_tokenization(verdict: Verdict, tok, llm: _Llama, texts: list[str], prompts: int) -> None:
    """llama.cpp's ids must equal HF's. One difference is told apart, not failed: a SentencePiece GGUF puts a space
    before every text segment (at the start, after each special token), which transformers' Metaspace does not
    where the segment already starts with a space or (prepend_scheme=first, transformers 5's default for Llama-type
    tokenizers) follows a special token. No GGUF key expresses that, so it is reported, and the greedy answers
    below start from llama.cpp's own tokenization of the prompt to show what it costs."""
    mismatched, shifted, in_prompts = [], 0, 0
    for k, text in enumerate(texts):
        hf_ids, ll_ids = tok.encode(text, add_special_tokens=False), llm.tokenize(text)
        if hf_ids == ll_ids:
            continue
        if llm.space_prefix and ll_ids == _spaced_segments(tok, text):
            shifted += 1
            in_prompts += k >= len(texts) - prompts
        else:
            mismatched.append((text, hf_ids, ll_ids))
    verdict.tokenization = {"strings": len(texts), "mismatches": len(mismatched), "space_prefix": shifted,
                            "space_prefix_prompts": in_prompts}
    if shifted:
        verdict.notes.append(f"llama.cpp puts a space before a text segment where HF does not in {shifted} of "
                             f"{len(texts)} strings (SentencePiece add_space_prefix; otherwise identical)")
    if in_prompts:
        verdict.notes.append(f"{in_prompts} rendered prompts included: llama.cpp (and Ollama) will give the model a "
                             "space after the chat's special tokens that it was not trained with (transformers' "
                             "prepend_scheme=first); the answers below are measured that way. To train as llama.cpp "
                             "tokenizes, set \"legacy\": true in the base model's tokenizer_config.json")
    if mismatched:
        text, hf_ids, ll_ids = mismatched[0]
        verdict.failures.append(f"tokenization differs on {len(mismatched)} of {len(texts)} strings; first: "
                                f"{text[:60]!r}: HF {hf_ids[:12]} vs llama.cpp {ll_ids[:12]}")


def _spaced_segments(tok, text: str) -> list[int]:
    """HF's ids for ``text`` cut as llama.cpp's SentencePiece tokenizer cuts it: split at the added tokens (with
    the whitespace their lstrip/rstrip flags eat), and a space before every text segment."""
    import re

    added = {t.content: (i, t) for i, t in tok.added_tokens_decoder.items()}
    if not added:
        return tok.encode(" " + text, add_special_tokens=False) if text else []
    pattern = re.compile("|".join(re.escape(c) for c in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    pos, rstrip = 0, False
    for m in pattern.finditer(text):
        i, t = added[m.group()]
        segment = text[pos:m.start()]
        segment = segment.lstrip() if rstrip else segment
        segment = segment.rstrip() if t.lstrip else segment
        ids += tok.encode(" " + segment, add_special_tokens=False) if segment else []
        ids.append(i)
        pos, rstrip = m.end(), t.rstrip
    tail = text[pos:].lstrip() if rstrip else text[pos:]
    return ids + (tok.encode(" " + tail, add_special_tokens=False) if tail else [])


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _judge(verdict: Verdict, limits: Limits) -> None:
    d, g = verdict.distributions, verdict.generations
    if not math.isfinite(d["mean_kl"]) or d["mean_kl"] > limits.max_kl:
        verdict.failures.append(f"next-token distributions differ: mean KL {d['mean_kl']:.4f} nats over "
                                f"{d['positions']} answer positions (limit for {verdict.qtype}: {limits.max_kl})")
    metric_failures = _metric_failures(verdict, limits)
    verdict.failures += metric_failures
    held = "metrics_hf" in g and not metric_failures  # the task metric on the user's rows was measured and held
    low, high = d.get("top1_bounds_95") or wilson(round(d["top1_agreement"] * d["positions"]), d["positions"])
    share = (f"top-1 token agrees at {d['top1_agreement']:.1%} of {d['positions']} answer positions (95% bounds "
             f"{low:.1%}-{high:.1%}; limit for {verdict.qtype}: {limits.min_top1:.0%})")
    if high < limits.min_top1:
        verdict.failures.append(f"{share}: below the limit with 95% confidence")
    elif low < limits.min_top1 and d["top1_agreement"] < limits.min_top1:
        _inconclusive(verdict, share, held)
    ilow, ihigh = g.get("identical_bounds_95") or wilson(g["identical"], g["prompts"])
    if g["identical_share"] < limits.min_identical:
        first = g["first_difference"] or {}
        same = (f"{g['identical']} of {g['prompts']} greedy answers identical (95% bounds {ilow:.0%}-{ihigh:.0%}; "
                f"limit for {verdict.qtype}: {limits.min_identical:.0%}); first difference: HF "
                f"{first.get('hf', '')[:60]!r} vs GGUF {first.get('gguf', '')[:60]!r}")
        # a few answers against many positions: where the distributions held at every position measured, one
        # answer that took another branch at a near-tie is not evidence against the file
        positions_held = d["mean_kl"] <= limits.max_kl and d["top1_agreement"] >= limits.min_top1
        if ihigh < limits.min_identical:
            verdict.failures.append(same)
        else:
            _inconclusive(verdict, same, held or positions_held)


def _inconclusive(verdict: Verdict, what: str, held: bool) -> None:
    """A share under its limit whose 95% interval still holds the limit: the task metric on the user's own rows
    decides where it was measured (and held); without one the verdict asks for more rows."""
    if held:
        verdict.notes.append(f"{what}: inconclusive at 95%, and the task metrics on your rows (or, for the answers, "
                             "the next-token distributions at every position) held: passed on them")
    else:
        verdict.failures.append(f"{what}: inconclusive at 95% (too few positions to tell); verify on more rows, "
                                "or on your own rows with answers (--data), whose task metric then decides")


def _metric_failures(verdict: Verdict, limits: Limits) -> list[str]:
    g, out = verdict.generations, []
    for key in g.get("metrics_hf", {}):
        drop = 100 * (g["metrics_hf"][key] - g["metrics_gguf"].get(key, 0.0))
        if key in _guarded() and drop > limits.max_metric_drop:
            out.append(f"task metric {key}: {g['metrics_hf'][key]:.3f} (HF) -> {g['metrics_gguf'][key]:.3f} (GGUF), "
                       f"{drop:.1f} points lost (limit for {verdict.qtype}: {limits.max_metric_drop})")
    return out


def _guarded() -> tuple[str, ...]:
    from hwcompat.data.metrics import GUARDED

    return GUARDED


def report_path(gguf_path: str | Path) -> Path:
    p = Path(gguf_path)
    return p.with_name(f"{p.stem}.export.json")


#: The next types a failed verification may step up to (each keeps more of the weights; k-quants stay k-quants).
STEP_UP = {"q4_0": ("q5_0", "q8_0"), "q5_0": ("q8_0", "f16"), "q4_k_m": ("q5_k_m", "q6_k"),
           "q5_k_m": ("q6_k", "q8_0"), "q6_k": ("q8_0", "f16"), "q8_0": ("f16",), "bf16": ("f32",), "f16": ("f32",)}


def next_steps(qtype: str, size_bytes: int, rows: int, data: str | None, figures: str, weighted: bool = False
               ) -> list[str]:
    """What to try after a failed verification, in order: for llama.cpp's quantizer without an importance matrix,
    one measured on the user's rows (same size; bench/imatrix.py measured it turning a failing q4_k_m into a pass),
    the next larger types with their sizes (scaled from this file by bits per weight), a verification on more rows
    (a few positions make one token decide the verdict) and on the user's own data, then keeping it unverified."""
    from hwcompat.choices import EXPORT_TYPE_TABLE, LLAMA_TYPES

    bits = EXPORT_TYPE_TABLE[qtype].bits
    larger = STEP_UP.get(qtype, ())
    sizes = ", ".join(f"--type {t} (about {size_bytes * EXPORT_TYPE_TABLE[t].bits / bits / 1e9:.2f} GB)"
                      for t in larger)
    out = []
    if qtype in LLAMA_TYPES and not weighted:
        out.append(f"the same {qtype} size, weighted by your rows' activations: --imatrix --imatrix-data "
                   "YOUR_TRAIN.jsonl (llama.cpp's importance matrix, measured on the merged model)")
    out += [f"a larger type: {sizes}; this {qtype} is {size_bytes / 1e9:.2f} GB"] if larger else []
    more = f"--verify-rows {max(rows * 4, 32)}" + ("" if data else " --data YOUR_EVAL.jsonl")
    out.append(f"a verdict on more positions: {more} (now {rows} rows: on a few positions one token decides it; "
               "your own rows make the task metrics count)")
    out.append(f"keep this file as it is: --no-verify (its figures: {figures})")
    return out
