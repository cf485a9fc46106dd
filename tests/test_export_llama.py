"""GGUF exports checked in llama.cpp itself (llama-cpp-python, the optional extra hwcompat[gguf]): k-quants from
its quantizer, `export --verify`, a broken export caught, the pre-tokenizer on a fuzz set.

.ci/run installs the extra and sets HWCOMPAT_REQUIRE_LLAMA=1, so there a missing binding fails instead of skipping.
"""

import json
import random
import sys

import pytest

from hwcompat.errors import InputError

def _types(path):
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("qtype,ggml", [("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")])
def test_k_quants_come_from_llama_cpp_and_pass_verify(llama_cpp, trained, tmp_path, qtype, ggml):
    from hwcompat.export.gguf import export_gguf
    from hwcompat.export.verify import verify

    model, data = trained
    out = tmp_path / f"m-{qtype}.gguf"
    res = export_gguf(model, out, qtype)
    assert res.qtype == qtype and ggml in _types(out)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the lossless intermediate is gone
    verdict = verify(model, out, qtype, str(data), rows=12, max_new_tokens=8, progress=lambda m: None)
    assert verdict.passed, verdict.failures
    assert verdict.tokenization["mismatches"] == 0 and verdict.distributions["positions"] >= 12
    hf, gg = verdict.generations["metrics_hf"], verdict.generations["metrics_gguf"]
    assert hf["exact_match"] >= 0.75 and gg["exact_match"] >= hf["exact_match"] - 0.1, (hf, gg)


@pytest.mark.slow
def test_export_cli_verifies_and_writes_its_figures(llama_cpp, trained, tmp_path, run_cli):
    model, data = trained
    out = tmp_path / "model.gguf"
    r = run_cli("export", str(model), "--gguf", str(out), "--type", "q8_0", "--data", str(data), "--ollama",
                timeout=600)
    assert r.returncode == 0, r.stderr
    assert "verified in llama.cpp: tokenization identical" in r.stdout
    report = json.loads((tmp_path / "model.export.json").read_text())
    assert report["passed"] and report["qtype"] == "q8_0"
    g, d = report["generations"], report["distributions"]
    assert g["identical"] == g["prompts"] >= 8  # --verify-rows: the least; more until the positions bound top-1
    assert d["positions"] >= d["positions_needed"] or g["prompts"] == len(data.read_text().splitlines())
    assert (tmp_path / "model.Modelfile").exists()


def test_verify_catches_a_wrong_rope_permutation(llama_cpp, trained, tmp_path, monkeypatch):
    """The GGUF loads and runs, but q/k are left in HF's half-split layout: --verify must fail it, exit 1, keep
    the file for inspection, write the figures and no Modelfile."""
    import hwcompat.export.gguf as g
    from hwcompat.export.verify import verify

    model, data = trained
    out = tmp_path / "broken.gguf"
    monkeypatch.setattr(g, "_permute", lambda w, n_head: w)
    g.export_gguf(model, out, "f16")
    verdict = verify(model, out, "f16", str(data), rows=12, max_new_tokens=8, progress=lambda m: None)
    assert not verdict.passed
    assert verdict.failures[0].startswith("next-token distributions differ: mean KL"), verdict.failures
    assert verdict.tokenization["mismatches"] == 0  # the tokenizer was fine: the weights are wrong


@pytest.mark.slow
def test_verify_failure_is_exit_1_with_the_first_mismatch(llama_cpp, trained, tmp_path):
    """Through the CLI, with the permutation broken in the exporting process: exit 1, the first mismatch shown,
    the GGUF kept for inspection, the figures written, no Modelfile."""
    import subprocess

    model, data = trained
    out = tmp_path / "model.gguf"
    code = ("import sys; import hwcompat.export.gguf as g; g._permute = lambda w, n_head: w; "
            "from hwcompat.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "export", str(model), "--gguf", str(out), "--type", "f16",
                        "--data", str(data), "--ollama"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "error: --verify failed: next-token distributions differ: mean KL" in r.stderr
    assert "Traceback" not in r.stderr
    # what next, in order (#40 §2): f16 steps up to f32, then more rows, then --no-verify
    assert "next, in order:\n  1. a larger type: --type f32" in r.stderr and "3. keep this file" in r.stderr
    assert out.exists() and not (tmp_path / "model.Modelfile").exists()
    assert json.loads((tmp_path / "model.export.json").read_text())["passed"] is False


def test_k_quant_without_the_extra_says_how_to_get_it(trained, tmp_path, monkeypatch):
    from packaging.requirements import Requirement

    from hwcompat.export import quantize
    from hwcompat.export.gguf import export_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(InputError) as e:
        export_gguf(trained[0], tmp_path / "m.gguf", "q4_k_m")
    assert quantize.INSTALL in str(e.value) and "--type q8_0" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written
    assert str(Requirement(quantize.REQUIREMENT)) == quantize.REQUIREMENT
    assert quantize.INSTALL.endswith(f"python3 -m pip install '{quantize.REQUIREMENT}'")
    # #40 §5: the refusal's line is the docs' (docs/export.md), verbatim, and a shell parses it (bash -n)
    import subprocess
    from pathlib import Path

    assert quantize.INSTALL in (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    assert subprocess.run(["bash", "-n", "-c", quantize.INSTALL]).returncode == 0


def test_the_extra_and_the_advice_name_the_same_binding():
    import tomllib
    from pathlib import Path

    from hwcompat.export.quantize import REQUIREMENT

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["optional-dependencies"]["gguf"] == [REQUIREMENT]


def test_train_refuses_a_k_quant_export_it_could_not_make_before_training(tmp_path, monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from hwcompat.pipeline.preflight import check_export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    with pytest.raises(InputError, match="llama-cpp-python"):
        check_export(SimpleNamespace(export="gguf", export_type="q6_k", export_imatrix=False, method="sft"))
    # the gguf package writes it: fine
    check_export(SimpleNamespace(export="gguf", export_type="q8_0", export_imatrix=False, method="sft"))
    check_export(SimpleNamespace(export="none", export_type="q6_k", export_imatrix=False, method="sft"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["as rebuilt from the GGUF", "as published"])
def test_llama_cpp_tokenizes_like_hf_on_a_fuzz_set(llama_cpp, tmp_path, variant):
    """The pre-tokenizer hwcompat names is the one under which llama.cpp splits text as HF does: the demo's tokenizer
    (plain byte-level: "gpt-2") and SmolLM2's published one (digits first: "smollm"), 2,000 fuzzed strings each
    (digit runs after several spaces are where the two differ)."""
    import shutil

    from transformers import AutoTokenizer

    from hwcompat.demo.model import ensure_model
    from hwcompat.export.gguf import export_gguf
    from tests.conftest import SMOLLM_ORIGINAL

    src = tmp_path / "model"
    shutil.copytree(ensure_model(), src)
    expected = "gpt-2"
    if variant == "as published":
        tok = json.loads((src / "tokenizer.json").read_text())
        tok["pre_tokenizer"] = SMOLLM_ORIGINAL
        (src / "tokenizer.json").write_text(json.dumps(tok))
        expected = "smollm"
    out = tmp_path / "demo.gguf"
    assert export_gguf(src, out, "q8_0").pre_tokenizer == expected
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(src))
    rng = random.Random(0)
    pieces = ["1234567", "42", " ", "  ", "\n", "\t", "\n\n", "the", " The", "é", "日本", "🙂", "'s", "'re", "x=",
              "3.14", "{\"a\": [1, 2]}", "def f():", "    ", "Ελλάδα", "HTTP/1.1", "--", "!!", "ß", "0"]
    strings = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(2000)]
    bad = [s for s in strings if list(llm.tokenize(s.encode(), add_bos=False, special=True))
           != hf.encode(s, add_special_tokens=False)]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"


def test_verify_without_the_extra_or_with_missing_data_is_refused_before_writing(trained, tmp_path, monkeypatch,
                                                                                  capsys):
    import importlib.util

    from hwcompat.cli import main
    from hwcompat.export import quantize

    out = tmp_path / "o" / "m.gguf"
    missing = str(tmp_path / "nope.jsonl")
    assert main(["export", str(trained[0]), "--gguf", str(out), "--verify", "--data", missing]) == 2
    assert "--data" in capsys.readouterr().err and not out.exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    assert main(["export", str(trained[0]), "--gguf", str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "--verify runs the GGUF in llama.cpp" in err and quantize.INSTALL in err and "--no-verify" in err
    assert not out.exists()
    assert main(["export", str(trained[0]), "--gguf", str(out), "--type", "f16"]) == 0  # default: off without it
    report = json.loads((out.parent / "m.export.json").read_text())  # what was checked, and that it was not run
    assert report["verified"] is False and report["passed"] is None and "hwcompat[gguf]" in report["why_not"]
