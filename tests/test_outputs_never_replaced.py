"""Merge and export outputs: never replaced silently, locked while written, clean after a kill or SIGTERM."""

import importlib.util
import os
import sys

import pytest

from tests import cli

from hwcompat.fsutil import FolderLock

@pytest.fixture(scope="module")
def run_with_adapter(tmp_path_factory, model):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run")
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    m.save_pretrained(str(run / "adapter"))
    (run / "run.json").write_text(json.dumps({"config": {"model": str(model)}}))
    return run


def _cli(*args, code=None, env_extra=None, timeout=300):
    if code is None:
        return cli.run(*args, env=env_extra, timeout=timeout)
    return cli.run_patched(*args, code=code, env=env_extra, timeout=timeout)


@pytest.mark.slow
def test_existing_gguf_and_handwritten_modelfile_are_kept(model, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    res = _cli("export", model, "--gguf", out)
    assert res.returncode == 2 and "already exists; pass --overwrite" in res.stderr and out.read_bytes() == b"mine"
    out.unlink()
    (tmp_path / "m.Modelfile").write_text("FROM ./m.gguf\n# my own\n")
    res = _cli("export", model, "--gguf", out, "--ollama")
    assert res.returncode == 2 and "m.Modelfile already exists" in res.stderr and not out.exists()
    res = _cli("export", model, "--gguf", out, "--ollama", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 1000 and "# my own" not in (tmp_path / "m.Modelfile").read_text()
    assert (tmp_path / "m.Modelfile").stat().st_mode & 0o044 == 0o044  # readable by others (umask 022), not 0600
    # m.export.json: --verify's figures (hwcompat[gguf]), or what was checked without it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.export.json", "m.gguf"]  # no temp, no lock


def test_export_to_a_folder_or_a_locked_target(model, tmp_path):
    res = _cli("export", model, "--gguf", tmp_path)
    assert res.returncode == 2 and "is a folder; give a file path like OUT/model.gguf" in res.stderr
    lock = FolderLock(tmp_path, "hwcompat export", target="m.gguf")
    try:
        res = _cli("export", model, "--gguf", tmp_path / "m.gguf")
        assert res.returncode == 2 and f"in use by PID {os.getpid()} (hwcompat export)" in res.stderr
    finally:
        lock.release()


def test_sigterm_during_export_exits_143_and_leaves_nothing(model, tmp_path):
    res = _cli("export", model, "--gguf", tmp_path / "m.gguf", code="""
        import os, signal
        import hwcompat.export.gguf as G
        real = G._convert
        def convert(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        G._convert = convert
    """)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "terminated" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_merge_sigterm_exits_143_and_a_killed_merges_leftovers_are_removed(run_with_adapter, tmp_path):
    stale = tmp_path / ".merged.k1ll3d_x.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)  # what a SIGKILLed merge leaves
    (tmp_path / ".other.abcdefgh.tmp").mkdir()  # another target's: not ours to touch
    res = _cli("merge", run_with_adapter, "--out", tmp_path / "merged", code="""
        import os, signal
        import hwcompat.weights as W
        def boom(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
        W.write_streaming = boom
    """)
    assert res.returncode == 143, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abcdefgh.tmp"]
    res = _cli("merge", run_with_adapter, "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abcdefgh.tmp", "merged"]


def test_merge_out_that_is_a_file(run_with_adapter, tmp_path):
    (tmp_path / "m").write_text("x")
    res = _cli("merge", run_with_adapter, "--out", tmp_path / "m")
    assert res.returncode == 2 and "is a file; give a folder path" in res.stderr


def _without_llama_cpp(monkeypatch):
    """As on a machine without the extra hwcompat[gguf] (CI has it installed)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError


@pytest.mark.slow
def test_two_variants_exported_into_one_folder_each_get_their_own_modelfile(model, tmp_path):
    """#27 newcomer item: the fixed name `Modelfile` collided when a second variant went into the same folder."""
    for name in ("f16", "q8"):
        res = _cli("export", model, "--gguf", tmp_path / f"{name}.gguf", "--type", "q8_0" if name == "q8" else "f16",
                   "--ollama", "--no-verify")
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"run: ollama create {name} -f {tmp_path / (name + '.Modelfile')}" in res.stdout
    for name in ("f16", "q8"):
        assert f"FROM ./{name}.gguf\n" in (tmp_path / f"{name}.Modelfile").read_text()


def test_a_missing_extra_is_said_before_an_existing_modelfile(model, tmp_path, monkeypatch, capsys):
    """#27 newcomer item: fixing the first message must not lead to a second that was already known."""
    from hwcompat.cli import main

    _without_llama_cpp(monkeypatch)
    (tmp_path / "m.Modelfile").write_text("FROM ./m.gguf\n# my own\n")
    assert main(["export", str(model), "--gguf", str(tmp_path / "m.gguf"), "--type", "q4_k_m", "--ollama"]) == 2
    err = capsys.readouterr().err
    assert "--type q4_k_m is made by llama.cpp's quantizer, which needs the optional extra hwcompat[gguf]" in err
    assert "already exists" not in err and not (tmp_path / "m.gguf").exists()
    assert (tmp_path / "m.Modelfile").read_text() == "FROM ./m.gguf\n# my own\n"


def test_export_with_data_but_without_llama_cpp_says_not_verified_and_writes_what_was_checked(model, tmp_path,
                                                                                          monkeypatch, capsys):
    """#27 newcomer item: `export --data eval.jsonl` without the extra skipped --verify in silence, no export.json."""
    import json

    from hwcompat.cli import main
    from hwcompat.export.quantize import INSTALL

    _without_llama_cpp(monkeypatch)
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "the quick", "completion": "brown fox"}\n')
    out = tmp_path / "m.gguf"
    assert main(["export", str(model), "--gguf", str(out), "--data", str(data)]) == 0
    said = capsys.readouterr().out
    assert (f"not verified in llama.cpp (that needs the extra hwcompat[gguf]: {INSTALL}); --data {data} was not "
            "used: its tokenization, next-token distributions and greedy answers were not compared") in said
    assert f"what was checked: {tmp_path / 'm.export.json'}" in said
    report = json.loads((tmp_path / "m.export.json").read_text())
    assert report["verified"] is False and report["passed"] is None and report["data"] == str(data)
    assert report["gguf"] == str(out) and report["qtype"] == "f16" and report["tensors"] > 0
    assert "greedy answers" in report["not_checked"]
