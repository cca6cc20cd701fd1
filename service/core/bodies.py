"""``RequestBody``: the base of every JSON request shape. Unknown fields are refused, and pydantic's strict mode
converts no JSON value into another type: ``"epochs": true`` or ``"epochs": "1"`` is a 422 naming ``epochs``, not
one epoch.

One exception keeps the requests the published OpenAPI schema allows valid: JSON Schema counts ``2.0`` as an
integer, so an integer field takes a number with no fraction (as ``2``), which strict mode alone would refuse.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_SCALARS = (bool, int, float, str)


def json_kinds(annotation: Any) -> frozenset[type] | None:
    """The JSON scalar kinds (bool, int, float, str) a field annotation takes; None when it takes anything else
    (an object, a list) too. ``None`` of an optional field is not a kind."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return json_kinds(get_args(annotation)[0])
    if origin is Literal:
        return frozenset(type(arg) for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        kinds: set[type] = set()
        for arg in get_args(annotation):
            if arg is type(None):
                continue
            arg_kinds = json_kinds(arg)
            if arg_kinds is None:
                return None
            kinds |= arg_kinds
        return frozenset(kinds)
    return frozenset({annotation}) if annotation in _SCALARS else None


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integral_number(cls, value: Any, info: ValidationInfo) -> Any:
        """``2.0`` for an integer field is ``2`` (JSON Schema's integer); ``2.5`` stays, and is refused."""
        if isinstance(value, float) and value.is_integer() and info.field_name is not None:
            kinds = json_kinds(cls.model_fields[info.field_name].annotation)
            if kinds is not None and int in kinds and float not in kinds:
                return int(value)
        return value
