"""`hwcompat eval RUN --general`, batched (#27) against the one-prompt-at-a-time loop it replaced, on one run.

    python bench/eval_general.py RUN [--rounds 2] [--out bench/results/eval-general.json]

RUN: a finished run (the demo's: `hwcompat demo`). Both measures run in this process on the same loaded model,
alternating, each round; the figures (KL per token, the answers' log-likelihoods) must agree, the time is the
point. Also records the KL scale the command prints: the demo adapter's value beside the quantisations' KL the
export verification measured on the same model (catalog/gguf_verify.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_at_a_time(model, tokenizer, chat, prompts, new_tokens=32):
    """The implementation before #27, verbatim in substance: generate, then two forwards, per prompt."""
    import torch

    from hwcompat.train import batching

    kl = ll_base = ll_adapted = 0.0
    n = 0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([batching.render_prompt_ids(tokenizer, [("user", prompt), ("assistant", "")], chat)])
            with model.disable_adapter():
                seq = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                base = model(input_ids=seq).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
            adapted = model(input_ids=seq).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
            answer = seq[0, ids.shape[1]:].unsqueeze(-1)
            kl += float((adapted.exp() * (adapted - base)).sum())
            ll_base += float(base.gather(-1, answer).sum())
            ll_adapted += float(adapted.gather(-1, answer).sum())
            n += answer.shape[0]
    return {"prompts": len(prompts), "tokens": n, "kl_per_token": kl / n,
            "base_answers_logp_per_token": {"base": ll_base / n, "adapted": ll_adapted / n}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval-general.json"))
    args = ap.parse_args()
    import torch

    from hwcompat.data import GENERAL_PROMPTS
    from hwcompat.train import batching
    from hwcompat.train.forgetting import forgetting
    from hwcompat.train.inspect_run import _load

    spec, model, tokenizer, device = _load(Path(args.run))
    chat = batching.uses_chat_template(tokenizer, spec.config.chat_template)
    prompts = [json.loads(x)["prompt"] for x in GENERAL_PROMPTS.read_text().splitlines()]
    times = {"batched": [], "one_at_a_time": []}
    figures = {}
    for _ in range(args.rounds):
        for name in ("batched", "one_at_a_time"):
            t0 = time.perf_counter()
            figures[name] = (forgetting(model, tokenizer, chat, device, spec.profile.dtype) if name == "batched"
                             else one_at_a_time(model, tokenizer, chat, prompts))
            times[name].append(time.perf_counter() - t0)
            print(name, f"{times[name][-1]:.1f}s", figures[name]["kl_per_token"], flush=True)
    best = {k: min(v) for k, v in times.items()}
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(args.run),
              "model": spec.config.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "prompts": len(prompts), "seconds": times, "best_seconds": best,
              "speedup": best["one_at_a_time"] / best["batched"], "figures": figures}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"batched {best['batched']:.1f}s vs one at a time {best['one_at_a_time']:.1f}s: "
          f"{result['speedup']:.1f}x; KL {figures['batched']['kl_per_token']:.5f} vs "
          f"{figures['one_at_a_time']['kl_per_token']:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
