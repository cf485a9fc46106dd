"""What the trainer, eval and export's verification all read: rows (formats, checks), preference pairs, chat
rendering and task metrics. Below train/, merge and export/, so each of them reads data the same way and none
of them imports another to do so. Never imports torch."""

from pathlib import Path

#: The fixed general prompts behind ``eval --general`` and export's KL check (bundled with the demo's data).
GENERAL_PROMPTS = Path(__file__).resolve().parent.parent / "demo" / "data" / "general_prompts.jsonl"
