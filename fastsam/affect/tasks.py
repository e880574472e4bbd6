"""The two Aff-Wild2 (ABAW) tasks the affect pipeline trains: their label names and output sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Task:
    """One task. ``multilabel``: AU (12 independent 0/1 labels per frame, BCE); else EXPR (one class, CE)."""

    name: str
    names: Tuple[str, ...]  # the annotation file's header fields, in column/class order
    multilabel: bool

    @property
    def outputs(self) -> int:
        """The MLP's output width: 8 classes (EXPR) or 12 AUs."""
        return len(self.names)


EXPR = Task("expr", ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"), False)
AU = Task("au", ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25", "AU26"), True)
TASKS: Dict[str, Task] = {t.name: t for t in (EXPR, AU)}


def get_task(name) -> Task:
    """The task called ``name`` ("expr" or "au"); a ValueError names the parameter otherwise."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
