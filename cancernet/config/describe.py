"""Every config key with its value and meaning, as YAML a run can start from (`cancernet config`).
The meaning is each field's comment in its section's source: one text, where the key is defined."""

from __future__ import annotations

import dataclasses
import inspect
import re

import yaml

from cancernet.config.kinds import ONE_KIND
from cancernet.config.sections import Config

FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _comments(cls: type) -> dict[str, str]:
    """field name -> its trailing comment in the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source shipped: values without their meaning
        return {}
    comments, above = {}, ""
    for line in source.splitlines():
        if line.strip().startswith("#"):  # a comment line says what the next field means
            above = line.strip().lstrip("#").strip()
            continue
        m = FIELD.match(line) or re.match(r"^\s+(\w+)\s*:", line)
        if m:
            comments[m.group(1)] = m.group(2).strip() if m.re is FIELD else above
        above = ""
    return comments


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...")


def describe(cfg: Config) -> str:
    """cfg as commented YAML: each key's value, what it means, and the kind of run it acts on when one only."""
    lines = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        comments = _comments(type(values))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(values):
            notes = [comments.get(f.name, "")]
            kind = ONE_KIND.get(f"{section.name}.{f.name}")
            if kind:
                notes.append(f"({kind[0]} runs only)")
            note = " ".join(n for n in notes if n)
            lines.append(f"  {f.name}: {_scalar(getattr(values, f.name))}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


def section_of(key: str) -> list[str]:
    """The sections that hold a bare key (`epochs` -> ['train']): for the hint on `epochs=3`."""
    cfg = Config()
    sections = [(s.name, getattr(cfg, s.name)) for s in dataclasses.fields(cfg)]
    return [name for name, values in sections if key in {f.name for f in dataclasses.fields(values)}]
