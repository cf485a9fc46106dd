"""#25: a CPU run's malloc. glibc's keeps what a step frees (9.6 GiB peak RSS for 4.4 GiB of activations on the
SmolLM2 bench); tcmalloc, preloaded in the worker as PyTorch's own CPU launcher does, halves it.
.ci/run installs libtcmalloc-minimal4 and sets HWCOMPAT_REQUIRE_TCMALLOC=1, so there the real library is used."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from hwcompat.errors import InputError
from hwcompat.pipeline.processes import cpu_allocator
from hwcompat.probe import malloc
from tests import cli
from tests.train.conftest import make_config

REQUIRE = os.environ.get("HWCOMPAT_REQUIRE_TCMALLOC") == "1"  # read at import: the autouse fixture clears HWCOMPAT_*
ROOT = Path(__file__).resolve().parents[2]


def _lib(tmp_path, name="libtcmalloc_minimal.so.4", loadable=True):
    """A folder with a shared library of that name: a real, empty one the loader can preload (built with the C
    compiler), or the first bytes of one only, which ld.so refuses."""
    import shutil

    d = tmp_path / "lib"
    d.mkdir(exist_ok=True)
    if not loadable:
        (d / name).write_bytes(b"\x7fELF")
        return d
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a loadable library")
    src = tmp_path / "empty.c"
    src.write_text("int hwcompat_test_symbol = 1;\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / name), str(src)], check=True)
    return d


def test_tcmalloc_is_preloaded_on_a_cpu_run_where_installed(tmp_path):
    d = _lib(tmp_path)
    env, note = cpu_allocator("auto", True, environ={}, dirs=[tmp_path / "none", d])
    assert env["LD_PRELOAD"] == str(d / "libtcmalloc_minimal.so.4")
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)
    assert note == f"allocator: tcmalloc ({d / 'libtcmalloc_minimal.so.4'})"
    assert malloc.find_tcmalloc([_lib(tmp_path, "libtcmalloc.so.4")]) == d / "libtcmalloc_minimal.so.4"  # minimal first


def test_a_preload_the_user_set_is_kept(tmp_path):
    d = _lib(tmp_path)
    assert cpu_allocator("auto", True, {"LD_PRELOAD": "/opt/libjemalloc.so.2"}, [d]) == (
        {}, "allocator: the user's LD_PRELOAD (/opt/libjemalloc.so.2)")
    env, _ = cpu_allocator("auto", True, {"LD_PRELOAD": "/opt/libfoo.so"}, [d])
    assert env["LD_PRELOAD"] == f"{d / 'libtcmalloc_minimal.so.4'}:/opt/libfoo.so"  # theirs stays, after ours


def test_no_tcmalloc_says_how_to_install_it_and_tcmalloc_required_is_an_input_error(tmp_path):
    env, note = cpu_allocator("auto", True, {}, [tmp_path])
    assert env == {} and "system malloc" in note and malloc.install_hint() in note
    with pytest.raises(InputError, match=r"cpu_allocator=tcmalloc: no tcmalloc library on this host; install it"):
        cpu_allocator("tcmalloc", True, {}, [tmp_path])
    assert cpu_allocator("system", True, {}, [_lib(tmp_path)]) == ({}, "")
    assert cpu_allocator("auto", False, {}, [_lib(tmp_path)]) == ({}, "")  # a GPU run: its host side is not measured


def test_a_tcmalloc_file_the_loader_refuses_is_not_called_found(tmp_path):
    """#35 family 12: a truncated or foreign-architecture library was logged as tcmalloc; ld.so skipped it and the
    run used the system malloc."""
    d = _lib(tmp_path, loadable=False)
    env, note = cpu_allocator("auto", True, {}, [d])
    assert env == {} and note.startswith("allocator: the system malloc;") and "cannot be preloaded" in note
    with pytest.raises(InputError, match="cpu_allocator=tcmalloc: .* cannot be preloaded"):
        cpu_allocator("tcmalloc", True, {}, [d])


def test_cpu_allocator_system_takes_the_users_tcmalloc_out_of_the_trainers_preload(tmp_path):
    env, note = cpu_allocator("system", True, {"LD_PRELOAD": "/opt/libtcmalloc.so.4:/opt/libfoo.so"}, [_lib(tmp_path)])
    assert env == {"LD_PRELOAD": "/opt/libfoo.so"}
    assert note == ("allocator: the system malloc, as cpu_allocator=system asks (the trainer runs without "
                    "/opt/libtcmalloc.so.4 from your LD_PRELOAD)")


def test_the_install_hints_are_commands_and_ci_runs_the_apt_one():
    for cmd in malloc.INSTALL.values():
        argv = shlex.split(cmd)
        assert argv[0] in ("sudo", "conda") and len(argv) >= 3, cmd
    package = shlex.split(malloc.INSTALL["apt-get"])[-1]
    assert f"apt-get install -y -qq {package}" in (ROOT / ".ci" / "run").read_text()


def test_in_use_reads_the_process_mappings(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert malloc.in_use(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert malloc.in_use(maps) == "system"
    assert malloc.in_use(tmp_path / "missing") == "unknown"


def _train(cfg, *args):
    env = cli.clean_env(drop=("LD_PRELOAD",))
    return subprocess.run(cli.argv("train", cfg, *args), capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_a_real_cpu_run_trains_on_tcmalloc_and_on_the_system_malloc_when_asked(tmp_path, tiny_model, task_files):
    lib = malloc.find_tcmalloc()
    if lib is None:
        if REQUIRE:
            pytest.fail("HWCOMPAT_REQUIRE_TCMALLOC=1 but no tcmalloc library found")
        pytest.skip(f"tcmalloc not installed ({malloc.install_hint()})")
    cfg = make_config(tmp_path, tiny_model, *task_files, max_steps=4, eval_at_start=False, eval_metrics="none")
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"allocator: tcmalloc ({lib})" in res.stderr and "large alloc" not in res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cpu_allocator"] == "tcmalloc"
    res = _train(cfg, "--overwrite", "cpu_allocator=system")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "allocator:" not in res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cpu_allocator"] == "system"
