"""Oversampling by metadata (`data.oversample`): training samples whose `json` member matches a rule are drawn more (or
less) often, like NeuralOS's curriculum that trains more on the frames where the app's state changes.

A rule is `"field=value": factor`, e.g. `{"kind=click": 3, "kind=move": 0.5}`: a matching sample enters the stream
`factor` times on average (the integer part always, the fraction with that probability); the factors of several
matching rules multiply. It acts before the shuffle buffer, which spreads the copies apart. An epoch keeps its exact
number of samples (the mix changes, not the length), and validation is never oversampled.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from gen_lightning.data.decode import sample_metadata
from gen_lightning.errors import UserInputError

OPTION = "data.oversample"
# Samples of the first training shard that setup reads to check the rules (a shard may be large, or remote).
CHECKED_SAMPLES = 1000


@dataclass(frozen=True)
class OversampleRule:
    field: str
    value: str
    factor: float

    def matches(self, meta: Mapping[str, Any]) -> bool:
        return self.field in meta and _as_text(meta[self.field]) == self.value

    def __str__(self) -> str:
        return f"{self.field}={self.value} ×{self.factor:g}"


def _as_text(value: Any) -> str:
    # JSON scalars as a config writes them: strings bare, the rest in JSON form (true, 3, null).
    return value if isinstance(value, str) else json.dumps(value)


def parse_rules(rules: Mapping[str, float] | None) -> tuple[OversampleRule, ...]:
    """`{"field=value": factor}` as rules; a malformed key or a negative or non-finite factor names the option."""
    parsed = []
    for key, factor in (rules or {}).items():
        field, sep, value = str(key).partition("=")
        if not sep or not field:
            raise UserInputError(f"{OPTION}: {key!r} is not of the form 'field=value' (e.g. 'kind=click')")
        if not isinstance(factor, int | float) or not math.isfinite(factor) or factor < 0:
            raise UserInputError(f"{OPTION}: {key!r} has factor {factor!r}; expected a number >= 0")
        parsed.append(OversampleRule(field, value, float(factor)))
    return tuple(parsed)


def _meta(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The raw sample's json member, or {} where it is unreadable (the decoder skips and counts those)."""
    try:
        return sample_metadata(raw)
    except ValueError:
        return {}


def copies_of(raw: Mapping[str, Any], rules: Iterable[OversampleRule], rng: random.Random) -> int:
    meta = _meta(raw)
    factor = math.prod(rule.factor for rule in rules if rule.matches(meta))
    whole = int(factor)
    return whole + (rng.random() < factor - whole)


def oversampled(
    samples: Iterable[dict[str, Any]], rules: tuple[OversampleRule, ...], rng: random.Random
) -> Iterator[dict[str, Any]]:
    """Each raw sample `copies_of` times, in stream order (the shuffle buffer after this spreads them)."""
    for raw in samples:
        for _ in range(copies_of(raw, rules, rng)):
            yield raw


def check_rules_match(
    rules: tuple[OversampleRule, ...], samples: Iterable[dict[str, Any]], where: str
) -> tuple[str, bool]:
    """Refuse a rule whose field none of the first CHECKED_SAMPLES of `samples` (e.g. the first training shard) has:
    a misspelt field would otherwise oversample nothing, silently. Returns a summary line (each rule with the share of
    samples it matches, and that share in the oversampled stream) and whether every rule matched some sample (a value
    may be rare)."""
    metas = [_meta(raw) for raw in islice(samples, CHECKED_SAMPLES)]
    where = f"the first {len(metas)} of {where}"
    for rule in rules:
        if not any(rule.field in meta for meta in metas):
            fields = sorted({field for meta in metas for field in meta})
            raise UserInputError(
                f"{OPTION}: no sample in {where} has the json field {rule.field!r} (fields there: {fields}); "
                "a misspelt field, or shards written before their recorder wrote it: record them again"
            )
    weights = [math.prod(rule.factor for rule in rules if rule.matches(meta)) for meta in metas]
    total = sum(weights) or 1.0
    parts, every_rule_matched = [], True
    for rule in rules:
        matching = [rule.matches(meta) for meta in metas]
        before = sum(matching) / len(metas)
        after = sum(w for w, m in zip(weights, matching, strict=True) if m) / total
        parts.append(f"{rule}: {before:.0%} of the samples, {after:.0%} of the stream")
        if not any(matching):
            every_rule_matched = False
            values = sorted({_as_text(meta[rule.field]) for meta in metas if rule.field in meta})
            parts[-1] += f" (no sample has this value; values there: {values})"
    return f"{OPTION} (measured on {where}): " + "; ".join(parts), every_rule_matched
