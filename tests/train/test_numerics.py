"""#36 §2: the numerics check before the first step. It passes on this CPU in every dtype, and catches each
injected fault (a kernel that writes zeros, a wrong gradient, a NaN) with what failed, by how much and the
setting to change; `hwcompat doctor --numerics` runs it alone."""

import math

import pytest
import torch
import torch.nn.functional as F

from hwcompat.train import numerics as N

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "cpu_bf16"])
def test_a_correct_cpu_passes_every_check(dtype, attention):
    results = N.run(CPU, dtype, attention)
    assert [r.check for r in results] == ["matmul", f"attention ({attention})", "norm", "layer forward",
                                          "layer backward"]
    assert all(r.ok for r in results), [r.line() for r in results]


def test_the_real_models_shape_is_checked(tiny_model):
    import json

    results = N.check(CPU, "float32", "sdpa", tiny_model, "the CPU", log=lambda m: None)
    assert all(r.ok for r in results)
    assert json.loads((tiny_model / "config.json").read_text())["hidden_size"] == 64


def test_a_kernel_that_writes_zeros_is_caught(monkeypatch):
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    with pytest.raises(N.NumericsError) as e:
        N.check(CPU, "bfloat16", "sdpa", None, "the CPU", log=lambda m: None)
    msg = str(e.value)
    assert "attention (sdpa): relative error 1.00e+00 (tolerance 8e-02) FAILED" in msg
    assert "layer forward" in msg and "Change: attention=eager" in msg


def test_hwcompats_cpu_attention_is_the_kernel_checked(monkeypatch):
    """attention=cpu_bf16: the check runs hwcompat's own kernel (train/cpu_attention.py), on its training path."""
    from hwcompat.train import cpu_attention

    real = cpu_attention._apply
    monkeypatch.setattr(cpu_attention, "_apply", lambda *a: torch.zeros_like(real(*a)))
    with pytest.raises(N.NumericsError) as e:
        N.check(CPU, "bfloat16", "cpu_bf16", None, "the CPU", log=lambda m: None)
    msg = str(e.value)
    assert "attention (cpu_bf16): relative error 1.00e+00" in msg and "layer forward" in msg


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])) * 2  # twice the true gradient
        return g @ w, gw, None


def test_a_wrong_gradient_is_caught(monkeypatch):
    # the card's kernels only (float32 here): the float64 reference on the CPU computes with other kernels
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: _WrongGrad.apply(x, self.weight, self.bias)
                        if x.dtype != torch.float64 else F.linear(x, self.weight, self.bias))
    results = N.run(CPU, "float32", "sdpa")
    bad = {r.check: r for r in results if not r.ok}
    assert set(bad) == {"layer backward"}, [r.line() for r in results]
    assert bad["layer backward"].error == pytest.approx(1.0, rel=0.05)


def test_a_nan_is_caught(monkeypatch):
    real = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: real(*a, **k) * float("nan"))
    results = N.run(CPU, "float16", "eager")
    norm = next(r for r in results if r.check == "norm")
    assert not norm.ok and math.isinf(norm.error)
    assert "non-finite values (NaN or inf)" in norm.line()


@pytest.mark.slow
def test_doctor_numerics_runs_it_alone(run_cli):
    res = run_cli("doctor", "--numerics", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "numerics: device 0" in res.stdout and "match the float64 reference" in res.stdout
    assert res.stdout.count(" ok") >= 5


def test_doctor_numerics_on_an_emulated_card_is_refused(run_cli):
    res = run_cli("doctor", "--numerics", "--emulate", "rtx4090")
    assert res.returncode == 2 and "is emulated: there is no card to compute on" in res.stderr
