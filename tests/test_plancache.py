"""`detect --json` answered from its memo must equal the plan built from scratch, for any input change."""

import json
import shutil
from dataclasses import replace

import pytest

from hwcompat.cli import plancache
from hwcompat.cli import main
from hwcompat.datafiles import data_dir
from hwcompat.probe import probe_host
from hwcompat.software import Software, installed

NO_OVERRIDES = {"profile": None, "set": [], "allow_env": []}


def _detect(capsys, *args) -> dict:
    assert main(["detect", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _cached_files(folder):
    return sorted(p.name for p in (folder / "data").glob("plan-*.json"))


@pytest.mark.parametrize("cards", ["m40,rx6600", "p40,p40,k80", "h100", "rx7900xtx", "rx5700xt", ""])
def test_memo_answer_equals_a_fresh_plan(cards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HWCOMPAT_CACHE_DIR", str(tmp_path))
    args = ["--emulate", cards] if cards else []
    first = _detect(capsys, *args)
    assert len(_cached_files(tmp_path)) == 1
    second = _detect(capsys, *args)  # from the memo
    monkeypatch.setenv("HWCOMPAT_CACHE_DIR", str(tmp_path / "empty"))
    fresh = _detect(capsys, *args)
    assert first == second == fresh


def test_every_input_is_part_of_the_key(tmp_path, monkeypatch):
    host = probe_host(emulate=["p40"])
    soft = Software.with_torch("2.13.0", cuda="13.0")
    base = plancache.key(host, soft, NO_OVERRIDES)
    assert plancache.key(host, soft, NO_OVERRIDES) == base
    p40 = host.devices[0]
    changed_host = replace(host, devices=(replace(p40, driver_version="999.1"),) + host.devices[1:])
    changes = {
        "a device field": plancache.key(changed_host, soft, NO_OVERRIDES),
        "host problems": plancache.key(replace(host, problems=("x",)), soft, NO_OVERRIDES),
        "torch build": plancache.key(host, Software.with_torch("2.13.0", cuda="12.6"), NO_OVERRIDES),
        "bitsandbytes": plancache.key(host, replace(soft, bitsandbytes=True), NO_OVERRIDES),
        "--set": plancache.key(host, soft, {**NO_OVERRIDES, "set": ["dtype=float32"]}),
        "--profile": plancache.key(host, soft, {**NO_OVERRIDES, "profile": "pascal"}),
    }
    profiles = tmp_path / "profiles"
    shutil.copytree(data_dir("profiles"), profiles)
    monkeypatch.setenv("HWCOMPAT_PROFILES_DIR", str(profiles))
    same_data = plancache.key(host, soft, NO_OVERRIDES)
    (profiles / "pascal.yaml").write_text((profiles / "pascal.yaml").read_text() + "\n# edited\n")
    changes["a profile file"] = plancache.key(host, soft, NO_OVERRIDES)
    assert same_data == base  # the same bytes elsewhere are the same data
    for what, k in changes.items():
        assert k != base, f"changing {what} must change the memo key"


def test_code_stamp_sees_an_edited_module(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 1\n")
    before = plancache._code_stamp(str(pkg))
    assert [p for p, _, _ in before] == ["a.py", "sub/b.py"]
    (pkg / "sub" / "b.py").write_text("y = 22\n")
    assert plancache._code_stamp(str(pkg)) != before


def test_bad_override_is_never_memoised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HWCOMPAT_CACHE_DIR", str(tmp_path))
    for _ in range(2):
        assert main(["detect", "--json", "--emulate", "p40", "--set", "dtype=float8"]) == 2
        assert "dtype" in capsys.readouterr().err
    assert _cached_files(tmp_path) == []


def test_unwritable_cache_still_answers(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("HWCOMPAT_CACHE_DIR", str(blocker))
    assert _detect(capsys, "--emulate", "m40")["devices"][0]["profile"]["name"] == "maxwell"


def test_corrupt_memo_is_rebuilt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HWCOMPAT_CACHE_DIR", str(tmp_path))
    first = _detect(capsys, "--emulate", "v100")
    (memo,) = (tmp_path / "data").glob("plan-*.json")
    memo.write_text('{"truncated": ')
    assert _detect(capsys, "--emulate", "v100") == first


def test_real_software_facts_are_json_keyable():
    assert plancache.key(probe_host(), installed(), NO_OVERRIDES).startswith("plan-")
