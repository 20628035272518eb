"""The one table mapping HF checkpoint names to MindSpore parameter names, used in both directions.

Each `Rule` pairs an HF name pattern with a MindSpore name pattern. Patterns are literal names with
placeholders: `{n}` (a layer index) and `{a|b|c}` (one of the listed words). Both patterns of a rule hold the
same placeholders in the same order, so a name maps forward and back by swapping them. A rule's `kind` says
what happens to a matching tensor:

- "param": a model parameter, renamed (today: identically; the Cells mirror the HF module tree) and passed
  through the rule's named `transform` (today: "none", i.e. the bytes unchanged);
- "task_adapter": a 2.5 task adapter (`lora_{web,sft,dpo}_{A,B}`), kept unless conversion drops them;
- "drop": a buffer that is not a weight (`rotary_emb.inv_freq`, CLIP `position_ids`), dropped with its reason.

A name no rule matches is unknown. `model_parameter_shapes(config)` lists every parameter the model has, with
its shape, so missing keys and shapes that contradict the config are found before any tensor is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ms_xcomposer.config import PLORA_LINEARS, TASK_ADAPTERS, VIT_PREFIX, XComposerConfig

PARAM, TASK_ADAPTER, DROP = "param", "task_adapter", "drop"


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


def _same(pattern: str, kind: str = PARAM, reason: str = "") -> Rule:
    return Rule(pattern, pattern, kind, reason)


_ATT, _FFN = "{wqkv|wo}", "{w1|w2|w3}"
_TASKS = "{" + "|".join(TASK_ADAPTERS) + "}"
_V = VIT_PREFIX

# The table. Order matters only for readability: a name matches at most one rule (checked in the tests).
RULES: Tuple[Rule, ...] = (
    # InternLM2 language model
    _same("model.tok_embeddings.weight"),
    _same("model.norm.weight"),
    _same("output.weight"),
    _same("model.layers.{n}.{attention_norm|ffn_norm}.weight"),
    _same(f"model.layers.{{n}}.attention.{_ATT}.weight"),
    _same(f"model.layers.{{n}}.feed_forward.{_FFN}.weight"),
    _same(f"model.layers.{{n}}.attention.{_ATT}.Plora_{{A|B}}.weight"),
    _same(f"model.layers.{{n}}.feed_forward.{_FFN}.Plora_{{A|B}}.weight"),
    _same(f"model.layers.{{n}}.attention.{_ATT}.lora_{_TASKS}_{{A|B}}.weight", TASK_ADAPTER,
          "IXC-2.5 task adapter (web / write modes)"),
    _same(f"model.layers.{{n}}.feed_forward.{_FFN}.lora_{_TASKS}_{{A|B}}.weight", TASK_ADAPTER,
          "IXC-2.5 task adapter (web / write modes)"),
    _same("model.layers.{n}.attention.rotary_emb.inv_freq", DROP,
          "RoPE buffer, recomputed from rope_theta; not a weight"),
    # CLIP vision tower
    _same(_V + "embeddings.class_embedding"),
    _same(_V + "embeddings.{patch_embedding|position_embedding}.weight"),
    _same(_V + "embeddings.position_ids", DROP, "CLIP position index buffer; not a weight"),
    _same(_V + "{pre_layrnorm|post_layernorm}.{weight|bias}"),
    _same(_V + "encoder.layers.{n}.self_attn.{q_proj|k_proj|v_proj|out_proj}.{weight|bias}"),
    _same(_V + "encoder.layers.{n}.{layer_norm1|layer_norm2}.{weight|bias}"),
    _same(_V + "encoder.layers.{n}.mlp.{fc1|fc2}.{weight|bias}"),
    # projector and HD separators
    _same("vision_proj.{0|2}.{weight|bias}"),
    _same("{plora_glb_GN|plora_sub_GN}"),
)


# Stands in for a table rule when an unknown name is kept (--keep-unknown): same name, bytes unchanged.
KEPT_UNKNOWN = Rule("", "", PARAM, "unknown key kept under its own name (--keep-unknown)")


@dataclass(frozen=True)
class Match:
    """What the table says about one name."""

    source: str
    target: Optional[str]  # None for drops
    rule: Rule


def match_hf(hf_name: str) -> Optional[Match]:
    """The rule and MindSpore name for an HF name, or None if the name is unknown."""
    for rule in RULES:
        target = rule.to_ms(hf_name)
        if target is not None:
            return Match(hf_name, None if rule.kind == DROP else target, rule)
    return None


def match_ms(ms_name: str) -> Optional[Match]:
    """The rule and HF name for a MindSpore parameter name, or None if the name is unknown."""
    for rule in RULES:
        if rule.kind == DROP:
            continue
        target = rule.to_hf(ms_name)
        if target is not None:
            return Match(ms_name, target, rule)
    return None


def model_parameter_shapes(config: XComposerConfig, task_adapters: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the model `config` describes, by MindSpore name, with its shape.

    Task adapters are included when the config has them and `task_adapters` is true.
    """
    llm, vit = config.llm, config.vision
    h, ffn = llm.hidden_size, llm.intermediate_size
    linears = {"wqkv": ("attention", h, llm.qkv_out), "wo": ("attention", h, h),
               "w1": ("feed_forward", h, ffn), "w3": ("feed_forward", h, ffn), "w2": ("feed_forward", ffn, h)}
    shapes: Dict[str, Tuple[int, ...]] = {
        "model.tok_embeddings.weight": (llm.vocab_size, h),
        "model.norm.weight": (h,),
        "output.weight": (llm.vocab_size, h),
    }
    for i in range(llm.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "ffn_norm.weight"] = (h,)
        for name in PLORA_LINEARS:
            group, d_in, d_out = linears[name]
            base = f"{p}{group}.{name}."
            r = config.plora[name].rank
            shapes[base + "weight"] = (d_out, d_in)
            shapes[base + "Plora_A.weight"] = (r, d_in)
            shapes[base + "Plora_B.weight"] = (d_out, r)
            for task in config.task_adapters if task_adapters else ():
                shapes[base + f"lora_{task}_A.weight"] = (config.task_adapter_rank, d_in)
                shapes[base + f"lora_{task}_B.weight"] = (d_out, config.task_adapter_rank)
    w, v = vit.hidden_size, VIT_PREFIX
    shapes[v + "embeddings.class_embedding"] = (w,)
    shapes[v + "embeddings.patch_embedding.weight"] = (w, 3, vit.patch_size, vit.patch_size)
    shapes[v + "embeddings.position_embedding.weight"] = (vit.num_positions, w)
    norms = ["pre_layrnorm"] + (["post_layernorm"] if config.has_post_layernorm else [])
    for norm in norms:
        shapes[v + norm + ".weight"] = (w,)
        shapes[v + norm + ".bias"] = (w,)
    for i in range(vit.num_hidden_layers):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (w, w)
            shapes[f"{p}self_attn.{proj}.bias"] = (w,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (w,)
            shapes[f"{p}{norm}.bias"] = (w,)
        shapes[p + "mlp.fc1.weight"] = (vit.intermediate_size, w)
        shapes[p + "mlp.fc1.bias"] = (vit.intermediate_size,)
        shapes[p + "mlp.fc2.weight"] = (w, vit.intermediate_size)
        shapes[p + "mlp.fc2.bias"] = (w,)
    shapes["vision_proj.0.weight"] = (config.proj_hidden, config.proj_in)
    shapes["vision_proj.0.bias"] = (config.proj_hidden,)
    shapes["vision_proj.2.weight"] = (h, config.proj_hidden)
    shapes["vision_proj.2.bias"] = (h,)
    if config.spec.hd_tiles:
        shapes["plora_glb_GN"] = (1, 1, config.proj_in)
        shapes["plora_sub_GN"] = (1, 1, 1, config.proj_in)
    return shapes


@dataclass
class Plan:
    """How each source tensor is treated: `mapped` [(source, target, rule)], dropped/unknown with reasons."""

    mapped: List[Match] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (source name, reason)
    unknown: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # required target names absent from the source
    shape_errors: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)


def plan_hf_to_ms(shapes: Mapping[str, Sequence[int]], config: XComposerConfig, keep_task_adapters: bool = True,
                  keep_unknown: bool = False) -> Plan:
    """Classify every HF tensor (by name -> shape) against the table and the parameters `config` requires.

    Unknown names are those no rule matches and those that match a rule but are no parameter of this config
    (e.g. a layer index past num_hidden_layers). With `keep_unknown` they are kept under their own names.
    """
    required = model_parameter_shapes(config, task_adapters=True)
    plan = Plan()
    seen = set()
    for name in shapes:
        m = match_hf(name)
        if m is not None and m.rule.kind == DROP:
            plan.dropped.append((name, m.rule.reason))
            continue
        if m is None or m.target not in required:
            if keep_unknown:
                plan.mapped.append(Match(name, name, KEPT_UNKNOWN))
            else:
                plan.unknown.append(name)
            continue
        seen.add(m.target)
        if m.rule.kind == TASK_ADAPTER and not keep_task_adapters:
            plan.dropped.append((name, "task adapter dropped (--task-lora drop)"))
            continue
        expected = required[m.target]
        found = tuple(int(s) for s in shapes[name])
        if TRANSFORMS[m.rule.transform].forward_shape(found) != expected:
            plan.shape_errors.append((name, expected, found))
        plan.mapped.append(m)
    plan.missing = sorted(set(required) - seen)
    return plan
