"""#40 §2: an importance matrix from the user's rows, in llama.cpp's format, reaching llama.cpp's quantizer.

The tiny Llama of tests/conftest.py's `trained` (a color task, rows of 256 so k-quant blocks apply); the
measured figures on the demo model are bench/imatrix.py's.
"""

import json

import numpy as np
import pytest



def _tensor(path, name):
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(path)).tensors if t.name == name)
    return t


def _field(path, key):
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def measured(trained):
    from hwcompat.export import imatrix as imx

    model, data = trained
    rows, name = imx.calibration(model, str(data))
    return imx.collect(model, rows, name, progress=lambda m: None)


@pytest.mark.slow
def test_the_statistics_are_each_linear_inputs_mean_square(trained, measured):
    """Every decoder linear layer, named as in the GGUF (not output.weight: llama-imatrix's default), summed over
    every token of every row; checked against a forward hook-free recomputation for one layer."""
    import torch

    from hwcompat import hfload
    from hwcompat.export import imatrix as imx

    model, data = trained
    names = set(measured.sums)
    assert {"blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names and all(n.startswith("blk.") for n in names)
    rows, _ = imx.calibration(model, str(data))
    assert measured.counts["blk.0.attn_q.weight"] == sum(len(r) for r in rows) == measured.tokens
    lm = hfload.causal_lm(model, dtype="auto")
    seen = []
    norm = lm.model.layers[0].input_layernorm
    h = norm.register_forward_hook(lambda m, a, out: seen.append(out.detach().float().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for ids in rows:
            lm(input_ids=torch.tensor([ids]))
    h.remove()
    expect = torch.cat(seen).square().sum(0).numpy()  # attn_q's input is the first norm's output
    assert np.allclose(measured.sums["blk.0.attn_q.weight"], expect, rtol=1e-4, atol=1e-6)


def test_the_file_is_llama_cpps_imatrix_format(measured, tmp_path):
    """What llama-imatrix writes: general.type imatrix, imatrix.datasets / chunk_count / chunk_size, and per weight
    <name>.in_sum2 (ne = [columns, 1]) and <name>.counts (ne = [1, 1]), all F32; read back unchanged."""
    from hwcompat.export import imatrix as imx

    path = tmp_path / "m.imatrix.gguf"
    imx.write(path, measured)
    assert _field(path, "general.type") == "imatrix"
    assert _field(path, "imatrix.datasets") == ["eval.jsonl"]
    assert _field(path, "imatrix.chunk_size") == 512 and _field(path, "imatrix.chunk_count") == measured.chunks
    s, c = _tensor(path, "blk.0.ffn_up.weight.in_sum2"), _tensor(path, "blk.0.ffn_up.weight.counts")
    assert list(s.shape) == [256, 1] and list(c.shape) == [1, 1] and s.tensor_type.name == c.tensor_type.name == "F32"
    back = imx.read(path)
    assert back.counts == measured.counts and back.datasets == ("eval.jsonl",)
    assert all(np.array_equal(back.sums[n], measured.sums[n]) for n in measured.sums)


def test_llama_cpp_quantizes_with_it_and_the_weighted_error_falls(llama_cpp, trained, measured, tmp_path):
    """The matrix reaches llama_model_quantize (its quantize.imatrix.* metadata in the GGUF, as llama-quantize
    writes) and does what it is for: the activation-weighted rounding error of a Q4_K weight is lower than without
    it, while the unweighted one may rise (the precision moved to the columns that matter)."""
    import torch
    from gguf.quants import dequantize

    from hwcompat.export.gguf import export_gguf
    from hwcompat.weights import read_tensors, shard_files

    model, _ = trained
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    export_gguf(model, plain, "q4_k_m")
    export_gguf(model, weighted, "q4_k_m", imatrix=measured)
    assert _field(weighted, "quantize.imatrix.entries_count") == len(measured.sums)
    assert _field(weighted, "quantize.imatrix.dataset") == "eval.jsonl"
    assert _field(plain, "quantize.imatrix.entries_count") is None
    key = "model.layers.0.mlp.up_proj.weight"
    w = dict(read_tensors(model / shard_files(model)[0], [key]))[key].to(torch.float32).numpy()
    imp = measured.values()["blk.0.ffn_up.weight"]
    errors = {}
    for name, path in (("plain", plain), ("weighted", weighted)):
        t = _tensor(path, "blk.0.ffn_up.weight")
        assert t.tensor_type.name == "Q4_K"
        q = dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        errors[name] = float(((q - w) ** 2 * imp).sum())
    assert errors["weighted"] < errors["plain"], errors  # 24.7 vs 25.9 here; the demo model: bench/imatrix.py


@pytest.mark.slow
def test_export_cli_measures_writes_and_reuses_it(llama_cpp, trained, tmp_path, run_cli):
    """`--imatrix --imatrix-data ROWS`: measured, written as OUT.imatrix.gguf, said, recorded in the report;
    `--imatrix FILE` reuses it and gives the same GGUF bytes."""
    model, data = trained
    out = tmp_path / "q4.gguf"
    r = run_cli("export", str(model), "--gguf", str(out), "--type", "q4_k_m", "--imatrix", "--imatrix-data",
                str(data), "--no-verify", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "importance matrix: 14 weights from" in r.stdout and "q4.imatrix.gguf" in r.stdout
    report = json.loads((tmp_path / "q4.export.json").read_text())
    assert report["imatrix"]["entries"] == 14 and report["imatrix"]["datasets"] == ["eval.jsonl"]
    again = tmp_path / "again.gguf"
    r = run_cli("export", str(model), "--gguf", str(again), "--type", "q4_k_m", "--imatrix",
                str(tmp_path / "q4.imatrix.gguf"), "--no-verify", timeout=600)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()
    assert not (tmp_path / "again.imatrix.gguf").exists()


@pytest.mark.parametrize("case", ["f16", "foreign", "exists", "data-alone", "missing"])
def test_imatrix_mistakes_are_refused_before_anything_is_written(llama_cpp, trained, measured, tmp_path,
                                                                   run_cli, case):
    from hwcompat.export import imatrix as imx

    model, data = trained
    out = tmp_path / "o.gguf"
    args = ["export", str(model), "--gguf", str(out), "--type", "q4_k_m", "--no-verify"]
    if case == "f16":
        args[5], expect = "f16", "--type f16 rounds every weight alike"
        args += ["--imatrix"]
    elif case == "foreign":  # another model's: its columns differ
        other = imx.ImportanceMatrix({n: np.ones(len(v) * 2, np.float32) for n, v in measured.sums.items()},
                                     dict(measured.counts), ("other.txt",))
        imx.write(tmp_path / "other.imatrix.gguf", other)
        args += ["--imatrix", str(tmp_path / "other.imatrix.gguf")]
        expect = "this importance matrix is another model's"
    elif case == "exists":
        (tmp_path / "o.imatrix.gguf").write_text("mine")
        args += ["--imatrix"]
        expect = "o.imatrix.gguf already exists; pass --overwrite"
    elif case == "data-alone":
        args += ["--imatrix-data", str(data)]
        expect = "--imatrix-data names the rows --imatrix measures on: add --imatrix"
    else:
        args += ["--imatrix", str(tmp_path / "nope.gguf")]
        expect = "nope.gguf: no such file"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli(*args, timeout=600)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert (tmp_path / "o.imatrix.gguf").read_text() == "mine"


def test_the_advice_after_a_failed_verification_parses_as_export_flags():
    """The next step a failed k-quant prints (`--imatrix --imatrix-data YOUR_TRAIN.jsonl`) is what `hwcompat
    export` accepts, as written."""
    import shlex

    from hwcompat.cli import build_parser
    from hwcompat.export.verify import next_steps

    step = next_steps("q4_k_m", 1, 8, None, "f")[0]
    flags = step.split(": ", 1)[1].split(" (")[0]
    args = build_parser().parse_args(["export", "m", "--gguf", "o.gguf", "--type", "q4_k_m", *shlex.split(flags)])
    assert args.imatrix == "" and args.imatrix_data == "YOUR_TRAIN.jsonl"


def test_a_runs_export_measures_on_its_training_rows(tmp_path):
    """`export_imatrix: true` in a run: the export chain measures on the first training file, writes
    model.imatrix.gguf among the run's exports; refused before training with a type it cannot weight or a method
    without SFT rows."""
    from types import SimpleNamespace

    from hwcompat.errors import InputError
    from hwcompat.pipeline.export_chain import outputs, run_export_options
    from hwcompat.pipeline.preflight import check_export
    from hwcompat.train.config import TrainConfig
    from hwcompat.train.rundir import EXPORTS

    cfg = TrainConfig(model="m", train_data=["t.jsonl"], eval_data=["e.jsonl"], export="gguf", export_type="q4_k_m",
                      export_imatrix=True)
    opts = run_export_options(tmp_path, cfg)
    assert opts.imatrix == "" and opts.imatrix_data == "t.jsonl" and opts.data == "e.jsonl"
    assert outputs(opts)["the importance matrix"].name == "model.imatrix.gguf" and "model.imatrix.gguf" in EXPORTS
    assert run_export_options(tmp_path, TrainConfig(model="m", train_data=["t.jsonl"])).imatrix is None
    for bad, expect in (({"export_type": "q8_0"}, "export_type q8_0 rounds every weight alike"),
                        ({"method": "dpo"}, "this run is dpo")):
        args = {"export": "gguf", "export_type": "q4_k_m", "export_imatrix": True, "method": "sft", **bad}
        with pytest.raises(InputError, match=expect):
            check_export(SimpleNamespace(**args))
