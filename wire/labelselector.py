"""Kubernetes label selectors: the grammar of k8s.io/apimachinery/pkg/labels, parsed and matched.

The broadcaster hands its ``--label-selector`` to the API server and the syncer matches Fleets
against ``--fleet-selector`` itself; both must read the same text the same way, and both must
refuse a bad one at start with the position of the mistake, not after a failed request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NoReturn

__all__ = ["LabelSelector", "Operator", "Requirement", "SelectorError"]

# Label keys: an optional DNS-subdomain prefix and a name; values: the name grammar, or empty.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_NAME_RE = re.compile(rf"^{_NAME}$")
_PREFIX_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SelectorError(ValueError):
    """The selector text is not a label selector; the message quotes it and says where."""


class Operator(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        match self.operator:
            case Operator.EXISTS:
                return present
            case Operator.DOES_NOT_EXIST:
                return not present
            case Operator.EQUALS | Operator.IN:
                return present and labels[self.key] in self.values
            case Operator.NOT_EQUALS | Operator.NOT_IN:
                return not present or labels[self.key] not in self.values

    def __str__(self) -> str:
        match self.operator:
            case Operator.EXISTS:
                return self.key
            case Operator.DOES_NOT_EXIST:
                return f"!{self.key}"
            case Operator.EQUALS | Operator.NOT_EQUALS:
                return f"{self.key}{self.operator}{next(iter(self.values))}"
            case _:
                return f"{self.key} {self.operator} ({','.join(sorted(self.values))})"


@dataclass(frozen=True)
class LabelSelector:
    """ANDed requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        return cls(tuple(_Parser(text).requirements()))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


# --- Parsing ----------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(?:(==|!=|=|!|\(|\)|,)|([^\s,()=!]+))")


class _Parser:
    """Recursive descent over the label-selector grammar of k8s.io/apimachinery/pkg/labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, int]] = []
        position = 0
        while text[position:].strip():
            match = _TOKEN_RE.match(text, position)
            assert match is not None  # the pattern accepts every non-space character
            token = match.group(1) or match.group(2)
            self.tokens.append((token, match.start(1) if match.group(1) else match.start(2)))
            position = match.end()
        self.index = 0

    def _fail(self, position: int, problem: str) -> NoReturn:
        raise SelectorError(
            f"invalid label selector {self.text!r} at character {position + 1}: {problem}"
        )

    def _peek(self) -> str | None:
        return self.tokens[self.index][0] if self.index < len(self.tokens) else None

    def _position(self) -> int:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else len(self.text)

    def _next(self, what: str) -> str:
        token = self._peek()
        if token is None:
            self._fail(len(self.text), f"expected {what}, found the end")
        self.index += 1
        return token

    def requirements(self) -> list[Requirement]:
        found: list[Requirement] = []
        if self._peek() is None:
            return found
        while True:
            found.append(self._requirement())
            token = self._peek()
            if token is None:
                return found
            if token != ",":
                self._fail(self._position(), f"expected ',' or the end, found {token!r}")
            self.index += 1

    def _requirement(self) -> Requirement:
        if self._peek() == "!":
            self.index += 1
            return Requirement(self._key(), Operator.DOES_NOT_EXIST)
        key = self._key()
        token = self._peek()
        if token is None or token == ",":
            return Requirement(key, Operator.EXISTS)
        self.index += 1
        if token in ("=", "=="):
            return Requirement(key, Operator.EQUALS, frozenset({self._value()}))
        if token == "!=":
            return Requirement(key, Operator.NOT_EQUALS, frozenset({self._value()}))
        if token in ("in", "notin"):
            return Requirement(key, Operator(token), self._set())
        self.index -= 1
        self._fail(
            self._position(), f"expected =, ==, !=, in or notin after {key!r}, found {token!r}"
        )

    def _key(self) -> str:
        position = self._position()
        key = self._next("a label key")
        if key in _OPERATOR_TOKENS:
            self._fail(position, f"expected a label key, found {key!r}")
        prefix, slash, name = key.rpartition("/")
        valid = len(name) <= 63 and _NAME_RE.match(name) is not None
        if slash:
            valid = valid and len(prefix) <= 253 and _PREFIX_RE.match(prefix) is not None
        if not valid:
            self._fail(position, f"{key!r} is not a valid label key")
        return key

    def _value(self) -> str:
        token = self._peek()
        # ``a=`` (and ``a=,b``) selects the empty value, as the API server allows.
        if token is None or token in (",", ")"):
            return ""
        position = self._position()
        self.index += 1
        if token in _OPERATOR_TOKENS or len(token) > 63 or not _NAME_RE.match(token):
            self._fail(position, f"{token!r} is not a valid label value")
        return token

    def _set(self) -> frozenset[str]:
        if self._peek() != "(":
            self._fail(self._position(), "expected '(' to open the value set")
        self.index += 1
        values = {self._value()}
        while self._peek() == ",":
            self.index += 1
            values.add(self._value())
        if self._peek() != ")":
            self._fail(self._position(), "expected ',' or ')' in the value set")
        self.index += 1
        return frozenset(values)


_OPERATOR_TOKENS = frozenset({"==", "!=", "=", "!", "(", ")", ","})
