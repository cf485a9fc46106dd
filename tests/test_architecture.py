"""The shape of the house, checked: imports run one way, no package cycles, no private names across modules,
no function longer than a screen. Each failure names the file, the line and the rule (../shared/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hwcompat"

#: Each room (a top-level module or package of hwcompat) and its floor: a room imports only from lower floors,
#: or from itself. Floor 0 is the shared base (errors, vocabularies, readings, safe file access).
FLOORS = {
    0: ("hwcompat", "errors", "envvars", "choices", "readings", "datafiles", "userfile", "yamlfile", "fsutil",
        "textcheck", "sampling", "progress", "summary", "schema"),
    1: ("probe", "compat", "software", "container"),  # facts: what the machine has, what the wheel table says,
    # where an image reads and writes
    2: ("profiles",),
    3: ("resolve",),
    4: ("plan", "data", "weights", "hfload", "fingerprint", "doctor", "demo", "entrypoint"),
    5: ("train", "merge", "export", "images"),
    6: ("pipeline", "selftest"),
    7: ("cli",),
    8: ("__main__",),
}
#: The few imports between rooms of one floor, each with its reason.
PEERS = {
    ("software", "compat"): "the installed torch's facts are read against the wheel table",
    ("images", "export"): "an image compiles llama.cpp with the flags export's quantizer is tested with",
    # the base floor's modules use each other (fsutil reads through userfile, yamlfile through userfile)
}
BASE_ROOMS = set(FLOORS[0])
FLOOR = {room: floor for floor, rooms in FLOORS.items() for room in rooms}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _targets(module: str, is_pkg: bool, node: ast.AST) -> list[tuple[str, str | None]]:
    """(imported hwcompat module, the name taken from it or None) for one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == "hwcompat"]
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "hwcompat":
        return []
    return [(f"{source}.{a.name}", None) if f"{source}.{a.name}" in MODULES else (source, a.name) for a in node.names]


def _imports() -> list[tuple[str, int, str, str | None]]:
    """Every import in hwcompat/, at module level or inside a function: (module, line, target, name)."""
    found = []
    for module, (path, is_pkg) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(module, node.lineno, target, name) for target, name in _targets(module, is_pkg, node)]
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hwcompat"


def _where(module: str, line: int) -> str:
    return f"{MODULES[module][0].relative_to(PACKAGE.parent)}:{line}"


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in MODULES}
    assert not rooms - set(FLOOR), f"rooms without a floor in FLOORS: {sorted(rooms - set(FLOOR))}"


def test_imports_run_one_way():
    wrong = []
    for module, line, target, _ in _imports():
        src, dst = _room(module), _room(target)
        if src == dst or FLOOR[dst] < FLOOR[src] or (src in BASE_ROOMS and dst in BASE_ROOMS):
            continue
        if (src, dst) not in PEERS:
            wrong.append(f"{_where(module, line)}: {src} (floor {FLOOR[src]}) imports {target} "
                         f"({dst}, floor {FLOOR[dst]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for module, _, target, _ in _imports():
        src, dst = _room(module), _room(target)
        if src != dst and not (src in BASE_ROOMS and dst in BASE_ROOMS):
            graph.setdefault(src, set()).add(dst)
    assert _cycle(graph) is None, f"package cycle: {' -> '.join(_cycle(graph))}"


def _private_attributes(module: str) -> list[str]:
    """``other_module._name`` on a module this one imported."""
    path, _ = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hwcompat"):
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    return [f"{_where(module, n.lineno)}: {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__") and aliases[n.value.id] != module]


def test_no_private_name_is_imported_from_another_module():
    wrong = [f"{_where(module, line)}: {name} from {target}" for module, line, target, name in _imports()
             if name and name.startswith("_") and not name.startswith("__") and target != module]
    for module in MODULES:
        wrong += _private_attributes(module)
    assert not wrong, "private names used across modules (make them public where they are shared):\n" + \
        "\n".join(wrong)


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for module, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_where(module, node.lineno)}: {node.name} is {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them along their steps):\n" + "\n".join(long)


def test_the_checker_sees_what_it_guards():
    """The walk finds function-level imports too (most of hwcompat's are), or the rules above check nothing."""
    found = {(module, target) for module, _, target, _ in _imports()}
    assert ("hwcompat.pipeline.export_chain", "hwcompat.merge") in found  # inside export_run
    assert ("hwcompat.pipeline.worker", "hwcompat.train.loop") in found  # inside main
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_environment_variables_are_read_through_the_registry():
    """#39 §2: every variable hwcompat reads (its own HWCOMPAT_*, torchrun's, the trackers', the HF cache's) goes
    through envvars.get, which refuses a name without its comment; never straight from os.environ. Passing the
    whole environment on (a child's env, a mapping to probe) is not a read of a name."""
    import re

    raw = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[")
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "envvars.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if raw.search(line)]
    assert not found, f"read environment variables through hwcompat.envvars.get: {found}"


def test_packaged_data_is_read_through_one_loader():
    """#39 §2: hwcompat's own YAML (catalogs, profiles) goes through yamlfile.load_packaged_yaml (one reader, errors
    naming the file, memoised by content); a raw yaml.safe_load is left only in the loader itself and where the
    config parses a value typed on the command line."""
    allowed = {"yamlfile.py", "train/config_values.py"}
    found = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
             if "yaml.safe_load(" in path.read_text(encoding="utf-8")
             and str(path.relative_to(PACKAGE)) not in allowed]
    assert not found, f"read packaged YAML with hwcompat.yamlfile.load_packaged_yaml: {found}"


def test_model_families_are_told_apart_by_their_row_only():
    """#39 §2: what sets a family apart (tied head, qkv bias, qk-norm, fused projections, soft-cap, fp32 norms) is
    one choices.ModelFamily row read by the planner and the exporter; no module tests a model_type string itself."""
    import re

    raw = re.compile(r"""(model_type|\bmt)\s*(==|!=|in\s*\(|\.startswith\()""")
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if raw.search(line)]
    assert not found, f"read the family's facts from choices.MODEL_FAMILIES: {found}"


def test_the_planner_and_the_exporter_read_the_same_row(monkeypatch):
    """Changing a family's row changes both readers (a mutant the check above cannot see)."""
    from dataclasses import replace

    from hwcompat import choices, plan
    from hwcompat.export import archs

    cfg = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 256, "tie_word_embeddings": False}
    assert plan.shape_from_config(cfg, "t").norms_per_layer == 4
    import pytest

    with pytest.raises(Exception, match="own output head"):
        archs.check("m", "gemma2", cfg)
    monkeypatch.setitem(choices.MODEL_FAMILIES, "gemma2", replace(choices.MODEL_FAMILIES["gemma2"],
                                                                  sandwich_norms=False, ties_head=False))
    assert plan.shape_from_config(cfg, "t").norms_per_layer == 2
    archs.check("m", "gemma2", {**cfg, "query_pre_attn_scalar": 16})


def test_the_layout_page_names_exactly_each_floors_rooms():
    """#39 §3: docs/layout.md's table and FLOORS above are one description of the layers, not two that drift."""
    import re

    page = (PACKAGE.parent / "docs" / "layout.md").read_text(encoding="utf-8")
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d) \| ([^|]+) \|", page, re.M)}
    for floor, rooms in FLOORS.items():
        named = {re.sub(r"(\.py|/)$", "", x) for x in re.findall(r"`([\w/.]+)`", rows.get(floor, ""))}
        assert named == set(rooms) - {"hwcompat", "__main__"}, (floor, named ^ (set(rooms) - {"hwcompat", "__main__"}))
