"""HF <-> MindSpore name tables: the machinery each model family's table is written in, used in both directions.

A family's `KeyTable` (in `ms_xcomposer/models/<family>/keys.py`) is a tuple of `Rule`s. Each pairs an HF name
pattern with a MindSpore name pattern. Patterns are literal names with placeholders: `{n}` (a layer index)
and `{a|b|c}` (one of the listed words). Both patterns of a rule hold the same placeholders in the same order,
so a name maps forward and back by swapping them. A rule's `kind` says what happens to a matching tensor:

- "param": a model parameter, renamed and passed through the rule's named `transform` ("none": the bytes
  unchanged). Where the Cells mirror the HF module tree the rule maps a name to itself;
- "task_adapter": an optional group of parameters (IXC-2.5's `lora_{web,sft,dpo}_{A,B}`), kept unless
  conversion drops them;
- "drop": a buffer that is not a weight (`rotary_emb.inv_freq`, CLIP `position_ids`), dropped with its reason;
- "tied": a parameter only when the model has it; a model whose Cells share it with another parameter (an output
  head tied to the token embedding) has none, and the tensor is dropped with the rule's reason, as transformers
  ignores it when tying.

A name no rule matches is unknown. Which parameters a model has, with their shapes, comes from the family's
Cells (`Family.parameter_shapes`), never from a second table, so the converter and the model cannot disagree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PARAM, TASK_ADAPTER, DROP, TIED = "param", "task_adapter", "drop", "tied"


def _same_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(shape)


@dataclass(frozen=True)
class Transform:
    """A named, invertible change of a tensor between the layouts (`inverse(forward(x))` is `x` bit for bit).

    `forward` maps the HF array to the MindSpore one, `forward_shape` its shape (the converter needs output
    shapes before any data); `inverse` / `inverse_shape` go back.
    """

    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    forward_shape: Callable[[Tuple[int, ...]], Tuple[int, ...]] = _same_shape
    inverse_shape: Callable[[Tuple[int, ...]], Tuple[int, ...]] = _same_shape


# "none" leaves the bytes untouched, so the converter can copy them without decoding. A rule naming another
# transform gets its tensors decoded, transformed and re-encoded by the converter (both directions).
TRANSFORMS: Dict[str, Transform] = {"none": Transform(forward=lambda x: x, inverse=lambda x: x)}


@dataclass(frozen=True)
class Rule:
    """HF pattern <-> MindSpore pattern, what the rule means, and the transform applied on the way."""

    hf: str
    ms: str
    kind: str = PARAM
    reason: str = ""
    transform: str = "none"
    _hf_re: "re.Pattern[str]" = field(init=False, repr=False, compare=False)
    _ms_re: "re.Pattern[str]" = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"rule {self.hf!r}: unknown transform {self.transform!r}")
        if _placeholders(self.hf) != _placeholders(self.ms):
            raise ValueError(f"rule {self.hf!r} -> {self.ms!r}: the two patterns hold different placeholders")
        object.__setattr__(self, "_hf_re", _compile(self.hf))
        object.__setattr__(self, "_ms_re", _compile(self.ms))

    def to_ms(self, hf_name: str) -> Optional[str]:
        """The MindSpore name for `hf_name`, or None when the rule does not match it."""
        return _rename(self._hf_re, self.ms, hf_name)

    def to_hf(self, ms_name: str) -> Optional[str]:
        """The HF name for `ms_name`, or None when the rule does not match it."""
        return _rename(self._ms_re, self.hf, ms_name)


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _placeholders(pattern: str) -> List[str]:
    return _PLACEHOLDER.findall(pattern)


def _compile(pattern: str) -> "re.Pattern[str]":
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        body = m.group(1)
        out.append(r"(\d+)" if body == "n" else "(" + "|".join(re.escape(w) for w in body.split("|")) + ")")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def _rename(regex: "re.Pattern[str]", template: str, name: str) -> Optional[str]:
    m = regex.match(name)
    if m is None:
        return None
    values = iter(m.groups())
    return _PLACEHOLDER.sub(lambda _: next(values), template)


def same(pattern: str, kind: str = PARAM, reason: str = "") -> Rule:
    """A rule that keeps the name (the Cells mirror the HF module tree there)."""
    return Rule(pattern, pattern, kind, reason)


# Stands in for a table rule when an unknown name is kept (--keep-unknown): same name, bytes unchanged.
KEPT_UNKNOWN = Rule("", "", PARAM, "unknown key kept under its own name (--keep-unknown)")


@dataclass(frozen=True)
class Match:
    """What the table says about one name."""

    source: str
    target: Optional[str]  # None for drops
    rule: Rule


class KeyTable:
    """A family's rules. A name matches at most one rule (checked by `check_unambiguous` in the tests)."""

    def __init__(self, rules: Sequence[Rule]):
        self.rules = tuple(rules)

    def match_hf(self, hf_name: str) -> Optional[Match]:
        """The rule and MindSpore name for an HF name, or None if the name is unknown."""
        for rule in self.rules:
            target = rule.to_ms(hf_name)
            if target is not None:
                return Match(hf_name, None if rule.kind == DROP else target, rule)
        return None

    def match_ms(self, ms_name: str) -> Optional[Match]:
        """The rule and HF name for a MindSpore parameter name, or None if the name is unknown."""
        for rule in self.rules:
            if rule.kind == DROP:
                continue
            target = rule.to_hf(ms_name)
            if target is not None:
                return Match(ms_name, target, rule)
        return None

    def is_dropped(self, name: str) -> bool:
        """Whether `name` is a buffer the table drops (not a weight), e.g. `rotary_emb.inv_freq`."""
        m = self.match_hf(name)
        return m is not None and m.rule.kind == DROP


@dataclass
class Plan:
    """How each source tensor is treated: `mapped` [(source, target, rule)], dropped/unknown with reasons."""

    mapped: List[Match] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (source name, reason)
    unknown: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # required target names absent from the source
    duplicates: List[Tuple[str, str, str]] = field(default_factory=list)  # (target, first source, second source)
    shape_errors: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)


def plan_hf_to_ms(shapes: Mapping[str, Sequence[int]], required: Mapping[str, Tuple[int, ...]], table: KeyTable,
                  keep_task_adapters: bool = True, keep_unknown: bool = False) -> Plan:
    """Classify every HF tensor (by name -> shape) against `table` and the parameters the model requires
    (`required`: MindSpore name -> shape, from the family's Cells, task adapters included).

    Unknown names are those no rule matches and those that match a rule but are no parameter of this model
    (e.g. a layer index past num_hidden_layers). With `keep_unknown` they are kept under their own names.
    Two source names mapping to one parameter (a table with two layouts, a checkpoint mixing them) are listed
    in `duplicates`.
    """
    plan = Plan()
    seen: Dict[str, str] = {}
    for name in shapes:
        m = table.match_hf(name)
        if m is not None and (m.rule.kind == DROP or (m.rule.kind == TIED and m.target not in required)):
            plan.dropped.append((name, m.rule.reason))
            continue
        if m is None or m.target not in required:
            if keep_unknown:
                plan.mapped.append(Match(name, name, KEPT_UNKNOWN))
            else:
                plan.unknown.append(name)
            continue
        if m.target in seen:
            plan.duplicates.append((m.target, seen[m.target], name))
            continue
        seen[m.target] = name
        if m.rule.kind == TASK_ADAPTER and not keep_task_adapters:
            plan.dropped.append((name, "task adapter dropped (--task-lora drop)"))
            continue
        expected = required[m.target]
        found = tuple(int(s) for s in shapes[name])
        if TRANSFORMS[m.rule.transform].forward_shape(found) != expected:
            plan.shape_errors.append((name, expected, found))
        plan.mapped.append(m)
    plan.missing = sorted(set(required) - set(seen))
    return plan
