"""The check types a [[check]] table can name, and turning tables into engines.

A built-in type is a class path here; `type = "python"` names the operator's own class in
`module = "package.module:Class"`. Every class is called as Class(options, context); a class
may declare `Options` (a pydantic model) to have its options validated, and
`records_auth = True` when it records a method for Authentication-Results.
"""
from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ValidationError

from geosmtp.checks.engine import CheckSpec, Engine
from geosmtp.checks.interface import CheckContext, phases_of

TYPES = {
    "spf": "geosmtp.checks.spf:SPFCheck",
    "dkim": "geosmtp.checks.dkimverify:DKIMCheck",
    "dmarc": "geosmtp.checks.dmarc:DMARCCheck",
    "dnsbl": "geosmtp.checks.dnsbl:DNSBLCheck",
    "fcrdns": "geosmtp.checks.fcrdns:FCrDNSCheck",
    "greylist": "geosmtp.checks.greylist:GreylistCheck",
    "policy": "geosmtp.checks.policyd:PolicyCheck",
    "rspamd": "geosmtp.checks.rspamd:RSpamdCheck",
    "milter": "geosmtp.checks.milter:MilterCheck",
}


class CheckError(Exception):
    """A [[check]] table that cannot become a check: the message says which key and why."""


def load_class(path: str) -> type:
    module_name, colon, attr = path.partition(":")
    if not colon or not module_name or not attr:
        raise CheckError(f"module: {path!r} is not \"package.module:Class\"")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing as it loads
        raise CheckError(f"module: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    try:
        cls = getattr(module, attr)
    except AttributeError:
        raise CheckError(f"module: {module_name} has no {attr}") from None
    if not callable(cls):
        raise CheckError(f"module: {path} is not a class")
    return cls


def class_of(kind: str, module: str | None) -> type:
    if kind == "python":
        if not module:
            raise CheckError("module: a python check names its class (\"package.module:Class\")")
        return load_class(module)
    if kind not in TYPES:
        raise CheckError(f"type: unknown check type {kind!r} (one of {', '.join(sorted(TYPES))}, python)")
    return load_class(TYPES[kind])


def validate_options(cls: type, options: dict) -> dict:
    """The options as the class's Options model reads them (defaults filled in)."""
    model = getattr(cls, "Options", None)
    if model is None or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return options
    try:
        return model.model_validate(options).model_dump()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors())
        raise CheckError(problems) from None


def make(kind: str, module: str | None, options: dict, context: CheckContext) -> Any:
    cls = class_of(kind, module)
    check = cls(validate_options(cls, options), context)
    if not phases_of(check) and not getattr(check, "records_auth", False):
        raise CheckError(f"{getattr(cls, '__name__', cls)} has none of connect/helo/mail/rcpt/data")
    return check


def engines(specs_by_listener: dict[str, list[CheckSpec]], hostname: str) -> dict[str, Engine]:
    """An Engine for each listener that has checks. Authentication-Results in our name are
    removed on every listener (an engine even without checks) as soon as one check anywhere
    writes ours: a user's submitted message must not carry a forged one to a local mailbox."""
    records = any(getattr(s.check, "records_auth", False) for specs in specs_by_listener.values() for s in specs)
    return {name: Engine(specs, hostname, records_auth=records)
            for name, specs in specs_by_listener.items() if specs or records}
