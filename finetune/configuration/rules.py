"""The vocabulary of config checks: a `Rule` says what one value must be, and words it for the error.

Rules are built from small parts (`integer(1)`, `optional(one_of("min", "max"))`) so that
each config table in `finetune.configuration.checks` reads as a spec, and every failure reads
the same: `<key> must be <what>, got <value>`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one value must be: `accepts` tests it, `expect` says it in words for the error."""

    accepts: Callable[[Any], bool]
    expect: str
    hint: str = ""

    def check(self, key: str, value: Any) -> None:
        if not self.accepts(value):
            raise ConfigError(self.message(key, value))

    def message(self, key: str, value: Any) -> str:
        return f"{key} must be {self.expect}, got {value!r}" + (f"; {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class Name(Rule):
    """A name from a fixed list, reported the way the rest of the project words it ("unknown model 'b9'")."""

    noun: str = ""
    label: str = "valid"

    def message(self, key: str, value: Any) -> str:
        return f"{key}: unknown {self.noun} {value!r}; {self.label}: {self.expect}"


def is_integer(value: Any) -> bool:
    """An integer (numpy's too) that is not a bool: YAML's `true` must not pass for 1."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (numpy's too) that is not a bool: inf would pass any lower bound unnoticed."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _show(choice: Any) -> str:
    """A choice as YAML spells it: true, false, null, bf16-mixed."""
    if choice is None or isinstance(choice, bool):
        return {True: "true", False: "false", None: "null"}[choice]
    return str(choice)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    bounds = f" in {lo}..{hi}" if hi is not None else f" >= {lo}" if lo is not None else ""
    return Rule(lambda v: is_integer(v) and (lo is None or v >= lo) and (hi is None or v <= hi), f"an integer{bounds}")


def number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def accepts(v: Any) -> bool:
        return (is_number(v) and (v > lo if lo_open else v >= lo)
                and (hi is None or (v < hi if hi_open else v <= hi)))

    if hi is None:
        return Rule(accepts, f"a number {'>' if lo_open else '>='} {lo}")
    return Rule(accepts, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def one_of(*choices: Any) -> Rule:
    # Type-strict: YAML's 1 is not `true`, nor 0 `false`.
    expect = repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(dict.fromkeys(map(_show, choices)))
    return Rule(lambda v: any(type(v) is type(c) and v == c for c in choices), expect)


def name(noun: str, valid: Collection[str], label: str = "valid") -> Name:
    return Name(lambda v: isinstance(v, str) and v in valid, ", ".join(valid), noun=noun, label=label)


def optional(rule: Rule) -> Rule:
    expect = f"null, {rule.expect}" if " or " in rule.expect else f"null or {rule.expect}"
    return dataclasses.replace(rule, accepts=lambda v: v is None or rule.accepts(v), expect=expect)


def hinted(rule: Rule, hint: str) -> Rule:
    """`rule` whose error ends with how to fix it."""
    return dataclasses.replace(rule, hint=hint)


def either(*rules: Rule) -> Rule:
    expect = ", ".join(r.expect for r in rules[:-1]) + f" or {rules[-1].expect}"
    return Rule(lambda v: any(r.accepts(v) for r in rules), expect)


def numbers(count: int, each: Rule, example: str) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == count and all(map(each.accepts, v)),
                f"{count} numbers ({each.expect.removeprefix('a number ')} each), e.g. {example}")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
STRING = Rule(lambda v: isinstance(v, str), "a string")
WORD = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
PATH = Rule(lambda v: isinstance(v, os.PathLike) or WORD.accepts(v), "a path")
POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a positive number")


def checked_section(values: dict[str, Any] | None, section: str, rules: dict[str, Rule], missing: str) -> dict[str, Any]:
    """A settings section (`probe`, `audit`) checked key by key: its values, or a one-line error naming the key."""
    if values is None:
        raise ConfigError(missing)
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is unknown; valid {section} settings: {', '.join(rules)}")
    for key, rule in rules.items():
        rule.check(f"{section}.{key}", values.get(key))
    return values
FRACTION = Rule(lambda v: isinstance(v, float) and 0 <= v <= 1, "a fraction in [0.0, 1.0]")
SEED = integer(0, 2**32 - 1)  # what numpy (and so Lightning's seed_everything) accepts
