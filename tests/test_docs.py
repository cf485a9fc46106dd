"""#39 §4: the README is short and the reference lives in docs/*.md; every link there resolves and every hwcompat
command printed in a code block parses as the CLI parses it (a renamed flag or subcommand fails here)."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_read_in_ten_minutes():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 12_500, f"README.md is {size} bytes: move reference into docs/*.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for link in _links(page):
        if re.match(r"[a-z]+://", link):
            continue  # the outside world is not checked offline
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link} names a missing file"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: link {link}: no such heading in {target.name}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"docs/{page.name} is not linked from the README"


def _commands(page: Path) -> list[str]:
    """hwcompat command lines in code blocks: ```bash lines, and `$ hwcompat …` lines in output blocks."""
    found = []
    for lang, body in re.findall(r"```([a-z]*)\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
        for line in body.replace("\\\n", " ").splitlines():  # a continued line is one command
            line = line.strip()
            if line.startswith("$ hwcompat "):
                found.append(line[2:])
            elif lang == "bash" and line.startswith("hwcompat "):
                found.append(line)
    return found


def _argv(line: str) -> list[str]:
    words = shlex.split(line, comments=True)
    return words[1:]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_printed_command_parses(page):
    from hwcompat.cli import build_parser

    for line in _commands(page):
        argv = _argv(line)
        parser = build_parser(argv[0])
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: `{line}` does not parse")
        takes_extra = hasattr(args, "overrides") or getattr(args, "passthrough", False)
        assert not extra or (takes_extra and all("=" in e or e == "--" for e in extra)), \
            f"{page.name}: `{line}`: unrecognized {extra}"


def test_the_commands_are_found():
    """The scan above sees the pages' commands (a changed fence style would make it check nothing)."""
    assert len(_commands(ROOT / "README.md")) >= 6
    assert sum(len(_commands(p)) for p in PAGES) >= 30


def test_the_readmes_detect_block_is_what_detect_prints(run_cli):
    """The emulated rows are this version's output, not an old copy (the host's own row is its machine's)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ hwcompat detect --emulate m40,v100,rx6600\n", 1)[1].split("```", 1)[0]
    res = run_cli("detect", "--emulate", "m40,v100,rx6600", timeout=60)
    assert res.returncode == 0, res.stderr
    emulated = lambda text: [ln for ln in text.splitlines() if "emulated" in ln]  # noqa: E731
    assert emulated(block) == emulated(res.stdout) and len(emulated(block)) == 3


@pytest.mark.parametrize("script, result", [("train.py", "train-cpu-bf16.json"), ("dpo.py", "dpo-cpu-bf16.json"),
                                            ("cpu_attention.py", "cpu-attention.json")])
def test_the_cpu_pages_tables_are_the_result_files(script, result):
    """docs/cpu.md's SFT and DPO tables are what the benchmark prints from its committed result file."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", ROOT / "bench" / script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.markdown_table(json.loads((ROOT / "bench" / "results" / result).read_text()))
    assert table in (ROOT / "docs" / "cpu.md").read_text(encoding="utf-8")


def quality_table() -> str:
    """docs/cpu.md's bf16-vs-fp32 table, from the result files it cites (the demo's two runs, the bench's)."""
    import json

    demo = json.loads((ROOT / "docs" / "report-demo.json").read_text())
    bench = json.loads((ROOT / "bench" / "results" / "train-cpu-bf16.json").read_text())
    rows = ["| run | dtype | eval loss | field F1 | exact match | JSON valid | tokens/s | peak RSS |",
            "|---|---|---|---|---|---|---|---|"]
    for label, fig in (("the demo (SmolLM2-135M, entity extraction, 40 steps × 8)", demo), ("", demo["float32"])):
        a = fig["eval_after"]
        rows.append(f"| {label} | {fig['dtype']} | {a['eval_loss']:.4f} | {a['field_f1']:.3f} | "
                    f"{a['exact_match']:.3f} | {a['json_valid']:.3f} | {fig['tokens_per_s']} | "
                    f"{fig['peak_memory_gib']:.2f} GiB |")
    for label, r in (("bench/train.py's task (20 steps × 8, prompts 30–400 tokens)", bench["hwcompat"]),
                     ("", bench["hwcompat_fp32"])):
        rows.append(f"| {label} | {r['dtype']} | {r['eval_loss']:.4f} | | | | {r['tokens_per_s']:.0f} | "
                    f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(rows) + "\n"


def test_the_cpu_pages_quality_table_is_the_result_files():
    assert quality_table() in (ROOT / "docs" / "cpu.md").read_text(encoding="utf-8")
