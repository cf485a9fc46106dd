"""Text that would corrupt training or a file hwcompat writes: one rule for data rows, the config's
system_prompt, prompts given to ``generate`` and the Modelfile's SYSTEM (a module below train and export,
so both use it without importing each other)."""

from __future__ import annotations


def text_problem(value: str, in_row: bool = False) -> str | None:
    """Why decoded text would corrupt training (a NUL, a lone surrogate), or None: one rule for rows, the
    config's system_prompt and prompts given to generate (``in_row``: the fix says "or the row")."""
    if "\x00" in value:
        return (f"NUL character (\\u0000) at character {value.index(chr(0)) + 1}: the text is corrupted (often a "
                f"scraper or an encoding bug); remove it{' or the row' if in_row else ''}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        why = "usually half of an emoji" if in_row else "half of an emoji, or a byte that is not UTF-8"
        return (f"lone surrogate \\u{ord(value[exc.start]):04x} at character {exc.start + 1}: not valid Unicode (a "
                f"broken \\ud8xx escape, {why}); {'fix or drop the row' if in_row else 'fix it'}")
    return None


def closest(word: object, choices, cutoff: float = 0.6) -> str | None:
    """The nearest known spelling of a mistyped name, for "did you mean" in an error (one rule for config keys,
    profile keys, --set keys, profile and device names; difflib loads only when there is an error to explain)."""
    import difflib

    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return near[0] if near else None
