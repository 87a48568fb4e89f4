"""Write the small TOML subset our configs use (tables, arrays of tables, scalars, lists)."""
from __future__ import annotations

import json


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _tables(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def dumps(data: dict, prefix: str = "") -> str:
    """Scalars first, then [tables] and [[arrays of tables]], nested as deep as needed."""
    out: list[str] = []
    for key, value in data.items():
        if not isinstance(value, dict) and not _tables(value):
            out.append(f"{json.dumps(key) if prefix else key} = {_value(value)}")
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.append(f"\n[{name}]")
            out.append(dumps(value, f"{name}.").rstrip("\n"))
        elif _tables(value):
            for item in value:
                out.append(f"\n[[{name}]]")
                out.append(dumps(item, f"{name}.").rstrip("\n"))
    return "\n".join(line for line in out if line) + "\n"
