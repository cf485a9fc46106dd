"""Two machines on loopback (two `hwcompat train --nnodes 2` commands, gloo, c10d rendezvous at 127.0.0.1).

Each "machine" has its own run folder, as two boxes of a home lab have their own disks."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from hwcompat.errors import InputError
from hwcompat.pipeline.elastic import exit_code
from hwcompat.pipeline.processes import Nodes
from tests import cli
from tests.train.conftest import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(configs, port, *extra, node_args=()):
    procs = []
    for rank, cfg in enumerate(configs):
        procs.append(cli.popen("train", cfg, "--nnodes", len(configs), "--node-rank", rank, "--rdzv-endpoint",
                               f"127.0.0.1:{port}", *extra, *(node_args[rank] if node_args else ()),
                               start_new_session=True))
    return procs


def _wait(procs, timeout=300):
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
        out.append((p.returncode, err))
    return out


def _node_configs(tmp_path, tiny_model, task_files, **kw):
    configs = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        configs.append(make_config(folder, tiny_model, *task_files, eval_at_start=False, eval_metrics="none",
                                   lora_dropout=0.0, **kw))
    return configs


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_nodes_equal_one_process_with_twice_the_accumulation(tmp_path, tiny_model, task_files):
    configs = _node_configs(tmp_path, tiny_model, task_files, max_steps=4, gradient_accumulation=1)
    results = _wait(_start_nodes(configs, _free_port()))
    for code, err in results:
        assert code == 0, err[-3000:]
    single = tmp_path / "single"
    single.mkdir()
    cfg = make_config(single, tiny_model, *task_files, max_steps=4, gradient_accumulation=2, eval_at_start=False,
                      eval_metrics="none", lora_dropout=0.0)
    res = cli.run("train", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = _adapter(single / "run")
    for rank in (0, 1):
        run = tmp_path / f"node{rank}" / "run"
        summary = json.loads((run / "summary.json").read_text())  # every machine keeps a complete run folder
        assert (summary["world_size"], summary["nnodes"], summary["steps"]) == (2, 2, 4)
        got = _adapter(run)
        assert got.keys() == ref.keys()
        for k in ref:
            assert (got[k] - ref[k]).abs().max().item() < 1e-5, k


@pytest.mark.slow
def test_sigterm_to_one_machine_checkpoints_all_and_the_group_resumes(tmp_path, tiny_model, task_files):
    configs = _node_configs(tmp_path, tiny_model, task_files, max_steps=100_000, learning_rate=1e-4)
    port = _free_port()
    procs = _start_nodes(configs, port)
    metrics = tmp_path / "node0" / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # `docker stop` on machine 1 only
    results = _wait(procs, timeout=180)
    assert [code for code, _ in results] == [143, 143], [err[-1500:] for _, err in results]
    steps = set()
    for rank in (0, 1):
        (ck,) = (tmp_path / f"node{rank}" / "run" / "checkpoints").iterdir()  # checkpointed once, on each machine
        steps.add(int(ck.name.split("-")[1]))
    assert len(steps) == 1
    step = steps.pop()
    runs = [tmp_path / f"node{rank}" / "run" / "config.yaml" for rank in (0, 1)]
    results = _wait(_start_nodes(runs, _free_port(), "--resume", f"max_steps={step + 2}"))
    for code, err in results:
        assert code == 0, err[-3000:]
    assert f"at step {step}/{step + 2}" in results[0][1]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"node{rank}" / "run" / "summary.json").read_text())["steps"] == step + 2


@pytest.mark.slow
def test_machines_of_different_families_are_refused(tmp_path, tiny_model, task_files):
    configs = _node_configs(tmp_path, tiny_model, task_files, max_steps=2)
    emulate_volta = ("--emulate", "v100", "--cpu-emulation")
    results = _wait(_start_nodes(configs, _free_port(), node_args=[(), emulate_volta]), timeout=240)
    for code, err in results:
        assert code != 0 and "Devices of different families cannot share one training run" in err, err[-2000:]
        assert "profile: cpu here, volta on rank" in err or "profile: volta here, cpu on rank" in err
    assert not (tmp_path / "node0" / "run" / "adapter").exists()


@pytest.mark.parametrize("args,message", [
    ((2, None, "127.0.0.1:29400"), "--node-rank: give each of the 2 machines its number"),
    ((2, 2, "127.0.0.1:29400"), "--node-rank: give each of the 2 machines its number, 0 to 1"),
    ((2, 0, "127.0.0.1"), "--rdzv-endpoint '127.0.0.1': expected HOST:PORT"),
    ((2, 0, "host:99999"), "expected HOST:PORT"),
    ((None, 1, None), "--node-rank / --rdzv-endpoint need --nnodes N"),
    ((0, None, None), "--nnodes 0: must be a positive number"),
])
def test_node_flags_are_checked(args, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Nodes.parse(*args)


def test_torchrun_arguments_are_torchruns():
    from torch.distributed.run import get_args_parser

    nodes = Nodes.parse(2, 1, "10.0.0.5:29400")
    args = get_args_parser().parse_args([*nodes.torchrun_args(), "--nproc-per-node=2", "-m", "x"])
    assert (args.nnodes, args.node_rank, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_conf) == (
        "2", 1, "c10d", "10.0.0.5:29400", "is_host=false")
    assert get_args_parser().parse_args([*Nodes().torchrun_args(), "-m", "x"]).standalone


def test_launcher_exit_code_passes_hwcompats_codes_only():
    assert exit_code({143}) == 143 and exit_code({130}) == 130 and exit_code({2}) == 2
    assert exit_code({143, 1}) == 1 and exit_code({-9}) == 1 and exit_code({1}) == 1


def test_launcher_exit_code_ignores_the_workers_torchrun_closed():
    """One worker exits 2 (bad input) before its peer: torchrun then closes the peer with SIGTERM and books it as a
    failure too (-15, or 143 where hwcompat's handler caught it, -9 after the grace period). The cause is the
    first worker's code (CI caught `exit 1` for a refused optimizer_offload=host under --devices 2)."""
    assert exit_code([2, -15]) == 2 and exit_code([2, 143]) == 2 and exit_code([2, -9]) == 2
    assert exit_code([1, -15]) == 1 and exit_code([2, 1, -15]) == 1 and exit_code([-11, -15]) == 1
    assert exit_code([143, 143]) == 143 and exit_code([-15]) == 1
