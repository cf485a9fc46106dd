"""GGUF export + quantize: `hwcompat export` vs llama.cpp's own path, wall time and peak RSS, one run.

    python bench/export.py [--type q4_k_m] [--llama-cpp-src DIR] [--out bench/results/export.json]

The model is a ~1.1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32/4 heads, ffn 5632) in bf16 with
random weights and the demo's SmolLM2 tokenizer, written locally (no hub); weights' values do not change either
path's work. llama.cpp's path is what its README says: ``convert_hf_to_gguf.py --outtype f16`` then
``llama-quantize`` (here its function, ``llama_model_quantize``, through llama-cpp-python: the same C code).
``--llama-cpp-src`` is a llama.cpp source tree (the llama-cpp-python sdist's vendor/llama.cpp has one); without it
only hwcompat is measured (llama.cpp's converter also needs `sentencepiece` importable). Each side runs in its
own process; peak RSS is that process's (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
         "intermediate_size": 5632}

MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
took = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": r.returncode, "seconds": took, "peak_rss_bytes": peak, "stderr": r.stderr[-2000:]}))
"""

QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, sys.argv[3]); p.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hwcompat.demo.model import ensure_model

    tok = AutoTokenizer.from_pretrained(str(ensure_model()))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{res['stderr']}")
    return res


def main() -> int:
    from hwcompat.choices import LLAMA_TYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="q4_k_m", choices=sorted(LLAMA_TYPES))
    ap.add_argument("--llama-cpp-src", help="a llama.cpp source tree (convert_hf_to_gguf.py and gguf-py/)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.json"))
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        r = measure([sys.executable, "-m", "hwcompat", "export", str(model), "--gguf", str(tmp / "hw.gguf"),
                     "--type", args.type, "--no-verify"])
        results["hwcompat export"] = {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                                      "gguf_bytes": (tmp / "hw.gguf").stat().st_size}
        (tmp / "hw.gguf").unlink()
        if args.llama_cpp_src:
            src = Path(args.llama_cpp_src)
            env_py = f"PYTHONPATH={src / 'gguf-py'}"
            conv = measure(["env", env_py, sys.executable, str(src / "convert_hf_to_gguf.py"), str(model),
                            "--outtype", "f16", "--outfile", str(tmp / "f16.gguf")])
            quant = measure([sys.executable, "-c", QUANTIZE, str(tmp / "f16.gguf"), str(tmp / "q.gguf"),
                             LLAMA_TYPES[args.type]])
            results["llama.cpp convert + quantize"] = {
                "seconds": conv["seconds"] + quant["seconds"], "convert_seconds": conv["seconds"],
                "quantize_seconds": quant["seconds"], "peak_rss_bytes": max(conv["peak_rss_bytes"],
                                                                             quant["peak_rss_bytes"]),
                "gguf_bytes": (tmp / "q.gguf").stat().st_size}
    report = {"benchmark": "export", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "model": {"shape": SHAPE, "dtype": "bfloat16"},
              "type": args.type, "results": results}
    if len(results) == 2:
        hw, ll = results["hwcompat export"], results["llama.cpp convert + quantize"]
        report["time_ratio_llama_cpp_vs_hwcompat"] = ll["seconds"] / hw["seconds"]
        report["peak_rss_ratio_hwcompat_vs_llama_cpp"] = hw["peak_rss_bytes"] / ll["peak_rss_bytes"]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':30} {'seconds':>8} {'peak RSS':>9} {'GGUF':>8}")
    for name, r in results.items():
        print(f"{name:30} {r['seconds']:8.1f} {r['peak_rss_bytes'] / 2**30:8.2f}G {r['gguf_bytes'] / 2**30:7.2f}G")
    if len(results) == 2:
        print(f"llama.cpp time / hwcompat time: {report['time_ratio_llama_cpp_vs_hwcompat']:.2f}x; "
              f"hwcompat peak RSS / llama.cpp's: {report['peak_rss_ratio_hwcompat_vs_llama_cpp']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
