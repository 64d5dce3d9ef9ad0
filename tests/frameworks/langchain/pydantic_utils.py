"""``_schema`` from langchain-core's test helpers, for the schema tests of ``test_history.py``.

Source: https://github.com/langchain-ai/langchain, ``libs/core/tests/unit_tests/
pydantic_utils.py`` (``_schema`` and the normalizers it calls; the pydantic v1 branch left
out). MIT License, Copyright (c) LangChain, Inc.
"""

from __future__ import annotations

from inspect import isclass
from typing import Any

from pydantic import BaseModel


def replace_all_of_with_ref(schema: Any) -> None:
    if isinstance(schema, dict):
        if "allOf" in schema and len(schema["allOf"]) == 1 and "$ref" in schema["allOf"][0]:
            schema["$ref"] = schema["allOf"][0]["$ref"]
            del schema["allOf"]
            if "default" in schema and schema["default"] is None:
                del schema["default"]
        else:
            for value in schema.values():
                if isinstance(value, (dict, list)):
                    replace_all_of_with_ref(value)
    elif isinstance(schema, list):
        for item in schema:
            replace_all_of_with_ref(item)


def remove_all_none_default(schema: Any) -> None:
    if isinstance(schema, dict):
        for value in schema.values():
            if isinstance(value, dict):
                if "default" in value and value["default"] is None:
                    any_of = value.get("anyOf", [])
                    for type_ in any_of:
                        if "type" in type_ and type_["type"] == "null":
                            break
                    else:
                        del value["default"]
                remove_all_none_default(value)
            elif isinstance(value, list):
                for item in value:
                    remove_all_none_default(item)
    elif isinstance(schema, list):
        for item in schema:
            remove_all_none_default(item)


def _remove_enum(obj: Any) -> None:
    if isinstance(obj, dict):
        if "enum" in obj:
            if "description" in obj and obj["description"] == "An enumeration.":
                del obj["description"]
            if "type" in obj and obj["type"] == "string":
                del obj["type"]
            del obj["enum"]
        for value in obj.values():
            _remove_enum(value)
    elif isinstance(obj, list):
        for item in obj:
            _remove_enum(item)


def _remove_additionalproperties(schema: Any) -> Any:
    if isinstance(schema, dict):
        if schema.get("type") == "object" and schema.get("additionalProperties") is True:
            schema.pop("additionalProperties", None)
        for value in schema.values():
            _remove_additionalproperties(value)
    elif isinstance(schema, list):
        for item in schema:
            _remove_additionalproperties(item)
    return schema


def _schema(obj: Any) -> dict[str, Any]:
    """Return the schema of the object (pydantic v2, remapped to the old style)."""
    if isclass(obj) and issubclass(obj, BaseModel):
        schema_ = obj.model_json_schema(ref_template="#/definitions/{model}")
        if "$defs" in schema_:
            schema_["definitions"] = schema_["$defs"]
            del schema_["$defs"]
        if "default" in schema_ and schema_["default"] is None:
            del schema_["default"]
        replace_all_of_with_ref(schema_)
        remove_all_none_default(schema_)
        _remove_additionalproperties(schema_)
        _remove_enum(schema_)
        return schema_
    msg = f"Object must be a Pydantic BaseModel subclass. Got {type(obj)}"
    raise TypeError(msg)
