"""#41 (a sweep's find): the training order is the seed's shuffle; the run's costliest micro-batch is tried before
the first step instead of being moved to the front.

Moving the costliest micro-batches to the front of the first epoch (so a run that will run out of memory does so in
its first step) changed what DPO learned: on the demo's pairs, 4 seeds, held-out eval loss 0.433 with the longest
pairs first vs 0.338 in the seed's order (reward accuracy 0.788 vs 0.863; TRL 0.343 / 0.856 on 3 of them;
bench/results/dpo-order.json). The probe keeps the first-step promise without touching the order: on a GPU the
costliest micro-batch goes forward and backward once, gradients dropped, no step. The accelerator is faked here (the
probe asks it for its peak only); the model, the objective and the loss are the real ones on the CPU.
"""

import pytest

from tests.train.conftest import make_config, prepare_run


class FakeCuda:
    """What the probe asks of torch.cuda: the allocator's peak."""

    def __init__(self):
        self.asked = 0

    def max_memory_allocated(self):
        self.asked += 1
        return 3 * 2**30


def _recipe(tmp_path, tiny_model, task_files, **extra):
    from hwcompat.train import distributed, recipe
    from hwcompat.train.spec import load_spec

    run_dir = prepare_run(make_config(tmp_path, tiny_model, *task_files, max_steps=4, micro_batch_size=8, **extra))
    return recipe.setup(load_spec(run_dir / "run.json"), run_dir, distributed.init("cpu"), resume=False)


def test_the_order_is_the_seeds_shuffle_not_the_costliest_first(tmp_path, tiny_model, task_files):
    """The regression: the stream's first epoch is plan_batches' own order (it led with the costliest)."""
    from hwcompat.train import batching, loop

    r = _recipe(tmp_path, tiny_model, task_files)
    lengths = r.objective.lengths()
    plan = batching.plan_batches(lengths, r.cfg.micro_batch_size, r.mode, r.cfg.seed)[:r.per_rank]
    seen = []
    real = r.objective.collate
    r.objective.collate = lambda idx, *a: seen.append(list(idx)) or real(idx, *a)
    stream = loop.micro_batches(r, 0)
    for _ in plan:
        next(stream)
    assert seen == plan
    costs = [batching.batch_cost(b, lengths, r.mode) for b in plan]
    assert costs[0] != max(costs)  # this seed's first micro-batch is not its costliest: the order was not moved


def test_the_probe_runs_the_costliest_micro_batch_and_keeps_nothing(tmp_path, tiny_model, task_files, monkeypatch):
    import torch

    from hwcompat.train import batching, loop

    r = _recipe(tmp_path, tiny_model, task_files)
    cuda = FakeCuda()
    monkeypatch.setattr(loop, "accelerator", lambda kind: cuda)
    lengths = r.objective.lengths()
    probed, losses = [], []
    real_collate, real_loss = r.objective.collate, r.objective.loss
    r.objective.collate = lambda idx, *a: probed.append(list(idx)) or real_collate(idx, *a)
    r.objective.loss = lambda *a: losses.append(real_loss(*a)) or losses[-1]
    before = {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}
    rng = torch.get_rng_state()
    loop.probe_memory(r)
    plan = batching.plan_batches(lengths, r.cfg.micro_batch_size, r.mode, r.cfg.seed)[:r.per_rank]
    assert len(probed) == 1 and batching.batch_cost(probed[0], lengths, r.mode) == max(
        batching.batch_cost(b, lengths, r.mode) for b in plan)
    assert len(losses) == 1 and losses[0].requires_grad  # it ran the real loss, with gradients
    assert all(p.grad is None for p in r.model.parameters())  # gradients dropped
    assert not r.optimizer.state  # no step taken
    assert all(torch.equal(p, before[n]) for n, p in r.model.named_parameters() if p.requires_grad)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is where it was
    assert r.history["first_step_peak_bytes"] == 3 * 2**30 and cuda.asked == 1


@pytest.mark.parametrize("why", ["cpu", "resumed"])
def test_no_probe_without_an_accelerator_or_on_a_resume(tmp_path, tiny_model, task_files, monkeypatch, why):
    from hwcompat.train import loop

    r = _recipe(tmp_path, tiny_model, task_files)
    if why == "resumed":
        monkeypatch.setattr(loop, "accelerator", lambda kind: FakeCuda())
        r.start_step = 2
    r.objective.collate = lambda *a: pytest.fail("probed")
    loop.probe_memory(r)
    assert "first_step_peak_bytes" not in r.history
