"""The small JSON Schema validator the API validates bodies (and tests responses) with."""

from __future__ import annotations

import json
import re

from twisted.trial.unittest import SynchronousTestCase

from epio.api.jsonschema import SchemaError, validate
from epio.api.spec import SCHEMAS, openapi_document
from epio.api.web import OPERATIONS

ROOT = {"components": {"schemas": SCHEMAS}}


class ValidateTests(SynchronousTestCase):
    def bad(self, value: object, schema: dict, where: str) -> None:
        with self.assertRaises(SchemaError) as e:
            validate(value, schema, ROOT)
        self.assertEqual(e.exception.path, where)

    def test_types_and_nullable(self) -> None:
        """Types are exact (a bool is not an integer); a type list allows null."""
        validate(3, {"type": "integer"})
        self.bad(True, {"type": "integer"}, "body")
        self.bad(1.5, {"type": "integer"}, "body")
        validate(None, {"type": ["string", "null"]})
        self.bad(3, {"type": ["string", "null"]}, "body")

    def test_x_errors_give_a_sentence_and_a_code(self) -> None:
        """A keyword's ``x-errors`` entry replaces the generic text with a sentence
        naming the value (or the field) and a stable code; other keywords stay generic."""
        schema = {"type": "object", "additionalProperties": False,
                  "properties": {"n": {"type": "string", "pattern": "^a+$",
                                       "x-errors": {"pattern": {
                                           "code": "bad_n", "message": "{value!r} is no n"}}}},
                  "x-errors": {"additionalProperties": {
                      "code": "bad_field", "message": "{value} is not a field"}}}
        with self.assertRaises(SchemaError) as e:
            validate({"n": "b"}, schema)
        self.assertEqual((e.exception.code, e.exception.sentence()), ("bad_n", "'b' is no n"))
        with self.assertRaises(SchemaError) as e:
            validate({"zz": 1}, schema)
        self.assertEqual((e.exception.code, e.exception.sentence()),
                         ("bad_field", "zz is not a field"))
        with self.assertRaises(SchemaError) as e:
            validate({"n": 3}, schema)
        self.assertEqual((e.exception.code, e.exception.sentence()),
                         (None, "body.n must be of type string"))

    def test_objects(self) -> None:
        """Required fields, no extra fields, pattern properties, nested paths."""
        schema = {"$ref": "#/components/schemas/NewApp"}
        validate({"name": "ok-app"}, schema, ROOT)
        self.bad({}, schema, "body.name")
        self.bad({"name": "ok", "x": 1}, schema, "body.x")
        self.bad({"name": "BAD"}, schema, "body.name")
        change = {"$ref": "#/components/schemas/ConfigChange"}
        validate({"A_B": "x", "C": None}, change, ROOT)
        self.bad({"1A": "x"}, change, "body.1A")
        self.bad({}, change, "body")
        formation = {"$ref": "#/components/schemas/FormationChange"}
        self.bad({"processes": {"web": {"quantity": -1}}}, formation,
                 "body.processes.web.quantity")

    def test_arrays_enum_anyof(self) -> None:
        """Items are checked with their index; enum and anyOf work."""
        self.bad([1, "x"], {"type": "array", "items": {"type": "integer"}}, "body[1]")
        self.bad("z", {"enum": ["a", "b"]}, "body")
        validate(2, {"anyOf": [{"type": "string"}, {"type": "integer"}]})
        self.bad(2.5, {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "body")


class DocumentTests(SynchronousTestCase):
    def test_operations_are_well_formed(self) -> None:
        """Operation ids are unique, every path parameter is declared, every
        operation documents its errors, and every $ref resolves."""
        doc = openapi_document(OPERATIONS)
        ids = [e["operationId"] for p in doc["paths"].values() for e in p.values()]
        self.assertEqual(len(ids), len(set(ids)))
        for path, methods in doc["paths"].items():
            for entry in methods.values():
                declared = {p["name"] for p in entry["parameters"] if p["in"] == "path"}
                self.assertEqual(declared, set(re.findall(r"\{(\w+)\}", path)))
                self.assertIn("500", entry["responses"])
        refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"',
                                        json.dumps(doc))
        for name in refs:
            self.assertIn(name, doc["components"]["schemas"])


class ExtensionErrorTests(SynchronousTestCase):
    def test_x_error_replaces_every_message_of_its_schema(self) -> None:
        """A schema with x-error answers that text for any mismatch under it (type,
        length, pattern), at its own path; valid values pass."""
        schema = {"type": "object", "properties": {
            "h": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$", "x-error": "no"}}}
        for bad in (1, "abcdef", "A"):
            with self.assertRaises(SchemaError) as e:
                validate({"h": bad}, schema)
            self.assertEqual((e.exception.path, e.exception.message), ("body.h", "no"))
        validate({"h": "abc"}, schema)

    def test_dollar_is_the_end_and_contains(self) -> None:
        """``$`` in a pattern matches only at the very end (JSON Schema's ECMA-262 regex:
        "ab\\n" does not match ^ab$, "$" inside a class is a literal); ``contains``
        requires one matching item."""
        with self.assertRaises(SchemaError):
            validate("ab\n", {"pattern": "^ab$"})
        validate("ab", {"pattern": "^ab$"})
        validate("$", {"pattern": "^[$]$"})
        with self.assertRaises(SchemaError):
            validate(["", " "], {"contains": {"pattern": "\\S"}})
        validate(["", "x"], {"contains": {"pattern": "\\S"}})
