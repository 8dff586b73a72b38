"""Validate response bodies against OpenAI's own published response schemas.

The schemas are vendored, unedited, in tests/data/openai_schemas.json (extracted from
openai/openai-openapi's openapi.yaml, with the transitive closure of their `$ref`s). That
document is OpenAPI 3.1, so its schemas are JSON Schema 2020-12, but a few of them (the streamed
chunk's `finish_reason`, `logprobs` and `usage`) still carry OpenAPI 3.0's `nullable: true`,
which 2020-12 ignores; left alone, OpenAI's own example chunk (`"finish_reason": null`) would
fail. So a deep copy of the schemas, never the vendored file, has every `nullable: true` rewritten
as `{"anyOf": [<schema without nullable>, {"type": "null"}]}` (`nullable: false` is dropped).

    validate(name, instance)  # raises SchemaMismatch (an AssertionError) listing every error
"""
import copy
import json
import os

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "openai_schemas.json")
URI = "urn:hearth:openai-schemas"


class SchemaMismatch(AssertionError):
    def __init__(self, name, errors):
        self.name = name
        self.errors = errors
        lines = [f"{len(errors)} mismatch(es) against OpenAI's {name}:"]
        for e in errors:
            where = "/".join(str(p) for p in e.absolute_path) or "<root>"
            rule = "/".join(str(p) for p in e.absolute_schema_path)
            lines.append(f"  at {where}: {e.message}  [schema: {rule}]")
            # anyOf/oneOf: also say why the non-null branches failed, deepest errors first
            for sub in sorted(_leaves(e), key=lambda c: -len(c.absolute_path))[:3]:
                sub_where = "/".join(str(p) for p in sub.absolute_path) or "<root>"
                lines.append(f"    because, at {sub_where}: {sub.message}")
        super().__init__("\n".join(lines))


def _leaves(error):
    """The innermost errors under an anyOf/oneOf error, skipping its `{"type": "null"}` branches."""
    subs = [c for c in error.context if c.schema != {"type": "null"}] or list(error.context)
    for sub in subs:
        if sub.context:
            yield from _leaves(sub)
        elif sub is not error:
            yield sub


def _translate_nullable(node):
    """OpenAPI 3.0 `nullable` -> JSON Schema 2020-12, recursively, on a copy."""
    if isinstance(node, list):
        return [_translate_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _translate_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _load():
    with open(PATH, encoding="utf-8") as f:
        doc = json.load(f)
    version = str(doc.get("openapi", ""))
    if not (version.startswith("3.0") or version.startswith("3.1")):
        raise RuntimeError(f"{PATH}: unsupported OpenAPI version {version!r}")
    translated = copy.deepcopy(doc)
    translated["components"]["schemas"] = _translate_nullable(doc["components"]["schemas"])
    resource = Resource.from_contents(translated, default_specification=DRAFT202012)
    return translated["components"]["schemas"], Registry().with_resource(URI, resource)


_SCHEMAS, _REGISTRY = _load()
_VALIDATORS = {}


def _validator(name):
    if name not in _SCHEMAS:
        raise KeyError(f"no vendored OpenAI schema {name!r}; have {sorted(_SCHEMAS)}")
    if name not in _VALIDATORS:
        _VALIDATORS[name] = Draft202012Validator(
            {"$ref": f"{URI}#/components/schemas/{name}"}, registry=_REGISTRY
        )
    return _VALIDATORS[name]


def validate(name: str, instance: dict) -> None:
    """Raise SchemaMismatch unless `instance` matches OpenAI's schema `name`."""
    errors = sorted(
        _validator(name).iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        raise SchemaMismatch(name, errors)
