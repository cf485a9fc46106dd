"""Peak RSS and wall time of `hwcompat merge` vs peft's merge_and_unload() + save_pretrained().

    python bench/merge.py [--hidden 1024 --layers 16 --vocab 32000] [--out bench/results/merge-cpu.json]

Both merge the same LoRA adapter (r=16, all linear layers) into the same bf16 base model (a random
Llama built from a config, ~270M parameters by default, saved as safetensors), each in a fresh
process that reports its own peak RSS. Goal: <= 0.5x the peak memory at no more than 1.2x the time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUP = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
hidden, layers, vocab, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, vocab_size=vocab,
                  tie_word_embeddings=False)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(out + "/base")
p = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
for n, t in p.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(t, std=0.01)
p.save_pretrained(out + "/adapter")
print(sum(t.numel() for t in m.parameters()))
"""

PEFT = r"""
import sys, time, resource, json
t = time.time()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
m = m.merge_and_unload()
m.save_pretrained(out)
print(json.dumps({"seconds": time.time() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

OURS = r"""
import sys, time, resource, json, io, contextlib
t = time.time()
from hwcompat.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(["merge", sys.argv[2], "--base", sys.argv[1], "--out", sys.argv[3]])
assert code == 0
print(json.dumps({"seconds": time.time() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge-cpu.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hwcompat-merge-bench-"))
    res = subprocess.run([sys.executable, "-c", SETUP, str(args.hidden), str(args.layers), str(args.vocab), str(tmp)],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    params = int(res.stdout.strip().splitlines()[-1])
    ours = run(OURS, str(tmp / "base"), str(tmp / "adapter"), str(tmp / "ours"))
    peft = run(PEFT, str(tmp / "base"), str(tmp / "adapter"), str(tmp / "peft"))
    report = {"benchmark": "merge", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "params": params, "base_dtype": "bfloat16",
              "base_bytes": sum(f.stat().st_size for f in (tmp / "base").glob("*.safetensors")),
              "hwcompat": ours, "peft_merge_and_unload": peft,
              "peak_rss_ratio": ours["peak_rss"] / peft["peak_rss"], "time_ratio": ours["seconds"] / peft["seconds"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    gib = 2**30
    print(f"base: {params / 1e6:.0f}M parameters, {report['base_bytes'] / gib:.2f} GiB bf16")
    print(f"{'':26} {'peak RSS':>10} {'seconds':>9}")
    print(f"{'hwcompat merge':26} {ours['peak_rss'] / gib:9.2f}G {ours['seconds']:9.1f}")
    print(f"{'peft merge_and_unload':26} {peft['peak_rss'] / gib:9.2f}G {peft['seconds']:9.1f}")
    print(f"ratio: memory {report['peak_rss_ratio']:.2f}x, time {report['time_ratio']:.2f}x   wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
