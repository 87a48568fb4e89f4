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


def dumps(data: dict) -> str:
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            continue
        out.append(f"{key} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            scalars = {k: v for k, v in value.items() if not isinstance(v, dict)}
            out.append(f"\n[{key}]")
            out.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in scalars.items())
            for sub, table in value.items():
                if isinstance(table, dict):
                    out.append(f"\n[{key}.{sub}]")
                    out.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in table.items())
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"\n[[{key}]]")
                out.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in item.items())
    return "\n".join(out) + "\n"
