"""The base of every spec section: unknown keys, NaN / infinity and booleans where numbers belong are refused.

pydantic's lax mode reads ``true`` as 1 for an int or float field (``seeds: [true]`` became seed 1); YAML writes
booleans for yes/no/on/off too, so a slip turns silently into a number. Fields that take a boolean keep it.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or any(_takes_bool(arg) for arg in get_args(annotation))


def _holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value)


class StrictModel(BaseModel):
    # NaN and infinity pass every ge/le bound (comparisons with NaN are false), so they are refused outright.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # A model validator, not a field validator on "*": pydantic forbids before-validators on the methods'
    # discriminator field. The CLI's message names the field from the error's context ('field').
    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key, value in raw.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is not None and _holds_bool(value) and not _takes_bool(field.annotation):
                    raise PydanticCustomError(BOOL_FOR_NUMBER, "'{field}' got a boolean (true/false, yes/no, on/off) "
                                              "but takes none; write the value itself", {"field": key})
        return raw


BOOL_FOR_NUMBER = "bool_for_number"
