"""What a data reader found: the ``Report`` (errors block training, warnings are summarised) and the text checks
every row format shares (a NUL, a lone surrogate, a control character, an empty field). No torch import here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hwcompat.errors import DataError
from hwcompat.textcheck import text_problem

MAX_ERRORS_SHOWN = 20



@dataclass
class Report:
    """Errors block training; warnings are summarised with counts and examples."""

    errors: list[str] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # kind -> example locations/messages
    counts: dict[str, int] = field(default_factory=dict)  # file -> rows read
    sources: dict[str, str] = field(default_factory=dict)  # file -> its container (JSONL, gzip JSONL, CSV, Parquet …)
    formats: dict[str, str] = field(default_factory=dict)  # file -> the row format detected (or given)

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def warn(self, kind: str, msg: str) -> None:
        self.warnings.setdefault(kind, []).append(msg)

    @property
    def ok(self) -> bool:
        return not self.errors

    def failure(self) -> DataError:
        """The error a run stops with when these checks failed: before any step, so nothing was trained. It
        carries the report, so a caller that was not training (``hwcompat eval``) can say what it was doing."""
        exc = DataError("data checks failed; nothing was trained\n" + self.render())
        exc.report = self  # type: ignore[attr-defined]
        return exc

    def render(self) -> str:
        lines = []
        errors = list(dict.fromkeys(self.errors))  # one file read as train and eval: each problem once
        shown = errors[:MAX_ERRORS_SHOWN]
        lines += [f"error: {e}" for e in shown]
        if len(errors) > len(shown):
            lines.append(f"error: … and {len(errors) - len(shown)} more errors")
        for kind, items in self.warnings.items():
            examples = "; ".join(items[:3])
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            lines.append(f"warning: {kind}: {len(items)} row(s): {examples}{more}")
        for f, n in self.counts.items():
            container = self.sources.get(f)
            if container and container.endswith("TSV"):  # the one quoting rule, said where it applies
                container += ' read quote-aware as pandas reads it: a cell may be quoted with "'
            kind = ", ".join(x for x in (container, self.formats.get(f)) if x)
            lines.append(f"read {n} row(s) from {f}" + (f" ({kind})" if kind else ""))
        if errors:
            lines.append(f"{len(errors)} error(s): fix them and run `hwcompat data check` again")
        return "\n".join(lines)



def shown(value: Any, width: int = 60) -> str:
    """A user's value in a message: its repr cut to ``width`` characters; a value nested past what repr can
    walk (a row read from deep JSON) is named by its type."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= width else text[:width - 1] + "…"



def bad_text(value: str, where: str, report: Report) -> bool:
    """Decoded text that would corrupt training: escaped NUL (an error, like a raw NUL byte), lone surrogates
    (not Unicode: the tokenizer crashes on them), other control characters (a warning)."""
    problem = text_problem(value, in_row=True)
    if problem:
        report.error(f"{where}: {problem}")
        return True
    controls = [ch for ch in value if ord(ch) < 32 and ch not in "\t\n\r"]
    if controls:
        report.warn("control characters", f"{where}: {len(controls)} control character(s), e.g. "
                                          f"\\u{ord(controls[0]):04x}")
    return False



def clean_text(value: Any, where: str, report: Report, expected: str = "a string") -> str | None:
    """A non-empty string of clean text, or None with the error reported at ``where``."""
    if not isinstance(value, str):
        report.error(f"{where}: expected {expected}, got {type(value).__name__}")
        return None
    if not value.strip():
        report.error(f"{where}: empty")
        return None
    return None if bad_text(value, where, report) else value
