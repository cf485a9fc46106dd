"""#36.3-4: unified-memory GPUs (DGX Spark's GB10, Jetson, Strix Halo, APUs). NVML answers NOT_SUPPORTED for a
GB10's memory; the card uses the host's RAM, so detect reads MemTotal and marks the reading unified, and the
planner counts the host process and the load's second copy in the same pool, never streaming between them."""

import json


from hwcompat.probe import nvidia
from tests.fakes import fake_nvml


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__("Not Supported" if value == 3 else "GPU is lost")
        self.value = value


def _gb10_nvml(error=3):
    nvml = fake_nvml([{"name": "NVIDIA GB10", "cc": (12, 1), "mem": 0}])

    def memory(_h):
        raise NVMLError(error)

    nvml.nvmlDeviceGetMemoryInfo = memory
    return nvml


def test_gb10_is_read_as_unified_memory_from_meminfo(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       128452412 kB\nMemFree:  1 kB\n")
    readings, problems = nvidia.probe(nvml=_gb10_nvml(), sys_root=tmp_path)
    assert problems == []  # old: "NVML could not read it …; a GPU that fell off the bus needs a reboot"
    (gb10,) = readings
    assert gb10.unified_memory and gb10.memory_bytes == 128452412 * 1024 and gb10.compute_capability == "12.1"


def test_another_nvml_failure_is_still_a_card_in_trouble(tmp_path):
    readings, problems = nvidia.probe(nvml=_gb10_nvml(error=15), sys_root=tmp_path)
    assert readings == [] and "fell off the bus" in problems[0]


GB10 = ("- {vendor: nvidia, name: NVIDIA GB10, memory_bytes: 137438953472, compute_capability: '12.1', "
        "unified_memory: true}\n")


def test_detect_shows_a_unified_reading(tmp_path, run_cli):
    f = tmp_path / "gb10.yaml"
    f.write_text(GB10)
    res = run_cli("detect", "--json", "--emulate-file", str(f))
    assert res.returncode == 0, res.stderr
    dev = json.loads(res.stdout)["devices"][0]
    assert dev["reading"]["unified_memory"] is True if "reading" in dev else dev.get("unified_memory") is True
    table = run_cli("detect", "--emulate-file", str(f))
    assert "128.0 GiB unified" in table.stdout


def test_the_plan_counts_one_pool_on_a_unified_device(tmp_path):
    from hwcompat import plan as P
    from tests.shapes import QWEN7B

    (tmp_path / "config.json").write_text(json.dumps(QWEN7B))
    shape = P.load_shape(str(tmp_path))
    inp = P.PlanInput(seq_len=1024)
    card = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 128 << 30, host=P.Host(ram_bytes=128 << 30))
    unified = P.estimate(shape, inp, "bfloat16", "sdpa", "nvidia", 128 << 30,
                         host=P.Host(ram_bytes=128 << 30, unified=True))
    assert "host_process" not in card.breakdown
    assert unified.breakdown["host_process"] == P.HOST_RUNTIME  # the trainer's host side, in the same pool
    base = unified.breakdown["base_weights"]
    train_side = sum(v for k, v in unified.breakdown.items() if k not in ("host_process", "load_copy")) - base
    # the load's moment: two copies of the base (host read + device copy) in one pool, when it is the larger
    assert unified.breakdown.get("load_copy", 0) == max(0, base - train_side)
    assert unified.peak_bytes == sum(unified.breakdown.values()) > card.peak_bytes
    assert any("unified memory" in n for n in unified.notes)


def test_offload_layers_is_refused_on_a_unified_device_and_auto_never_streams(tmp_path, run_cli):
    import yaml

    from tests.shapes import QWEN7B

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(QWEN7B))
    (tmp_path / "gb10.yaml").write_text(GB10)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tmp_path / "m"), "train_data": ["t.jsonl"], "offload": "layers"}))
    res = run_cli("train", str(cfg), "--emulate-file", str(tmp_path / "gb10.yaml"), "--print-config")
    assert "streaming layers from one to the other saves nothing" in res.stdout + res.stderr, res.stderr
    res = run_cli("plan", "--model", str(tmp_path / "m"), "--emulate-file", str(tmp_path / "gb10.yaml"),
                  "--seq-len", "32768", "--batch-size", "8", "--json")
    out = json.loads(res.stdout)
    assert out["inputs"]["offload"] != "layers" and "host_process" in out["breakdown"], res.stderr
