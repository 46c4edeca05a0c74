"""Validate a ``--json`` document against the JSON Schema bnfreeze ships for its command
(``bnfreeze/schemas/<command>.schema.json``), with the ``jsonschema`` package (a test
dependency only: bnfreeze itself never imports it)."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema
from paths import ROOT

SCHEMAS = ROOT / "bnfreeze" / "schemas"
#: The schema file of each command: unfreeze shares freeze's.
SCHEMA_OF = {
    "inspect": "inspect",
    "freeze": "freeze",
    "unfreeze": "freeze",
    "apply": "apply",
    "check": "check",
    "diff": "diff",
    "verify": "verify",
    "explain": "explain",
    "recalibrate": "recalibrate",
}


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(command: str, document: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``document`` is a valid ``command``
    document (and names that command)."""
    validator(SCHEMA_OF[command]).validate(document)
    assert document["command"] == command
