"""Answer shapes as clients send them: Pydantic models (with `$defs` for every nested model),
draft-7 `definitions`, recursion, references into `properties`, enums, arrays, optional fields.
Most give no bounds: the rules of `grammar.held_schema` must make every answer finish."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str | None = None


class Person(BaseModel):
    name: str
    age: int
    home: Address


class Item(BaseModel):
    color: Color
    quantity: int = Field(ge=1, le=9)


class Order(BaseModel):
    items: list[Item] = Field(max_length=3)
    express: bool


class Node(BaseModel):  # recursive: its `$ref` points at itself
    value: int
    next: Node | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")


class Weather(BaseModel):
    city: str
    celsius: float
    unit: Literal["C", "F"] = "C"


class Span(BaseModel):
    start: int
    end: int


class Document(BaseModel):
    title: str
    spans: list[Span] = Field(max_length=2)
    tags: list[Color] = Field(max_length=3)


class Pair(BaseModel):
    pair: tuple[int, str]


class Team(BaseModel):
    lead: Person
    members: list[Address] = Field(max_length=2)


class Flags(BaseModel):
    a: bool
    b: bool | None = None
    c: Literal[1, 2, 3]


class Reading(BaseModel):
    sensor: str
    values: list[float] = Field(max_length=3)


class Choice(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confidence: float


MODELS = [Person, Order, Node, Pet, Weather, Document, Pair, Team, Flags, Reading, Choice, Item]

SCHEMAS = [
    *(m.model_json_schema() for m in MODELS),
    {  # draft 7's `definitions`
        "definitions": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "type": "object",
        "properties": {"a": {"$ref": "#/definitions/point"}, "b": {"$ref": "#/definitions/point"}},
        "required": ["a"],
    },
    {  # a reference into the root's own properties
        "type": "object",
        "properties": {"first": {"type": "string"}, "second": {"$ref": "#/properties/first"}},
        "required": ["first", "second"],
    },
    {  # the root itself, recursively
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        },
        "required": ["name", "child"],
    },
    {  # a reference into a definition's own definitions
        "$defs": {
            "outer": {
                "$defs": {"inner": {"enum": ["x", "y"]}},
                "type": "object",
                "properties": {"v": {"$ref": "#/$defs/outer/$defs/inner"}},
                "required": ["v"],
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/outer"},
        "maxItems": 2,
    },
    {"type": "object", "properties": {"n": {"type": "number"}, "i": {"type": "integer"}}},
    {"type": "string"},
    {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    {"enum": ["north", "south", "east", "west"]},
    {
        "type": "object",
        "properties": {
            "outer": {
                "type": "object",
                "properties": {"inner": {"type": "object", "properties": {}}},
            }
        },
        "required": ["outer"],
    },
]
