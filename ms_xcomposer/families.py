"""The registry of model families: which code builds, converts, loads and chats with a checkpoint.

A family is one folder `ms_xcomposer/models/<family>/` whose `__init__.py` defines `FAMILY`, a `Family`, and
one line in `BUILTIN_FAMILIES` below. Families outside the package are plug-ins: a module defining `FAMILY`,
named in the environment variable `MS_XCOMPOSER_FAMILIES` (comma-separated module names) or in a package's
`ms_xcomposer.families` entry points; or registered from Python with `register_family(...)`. Every command and
`ms_xcomposer.load` finds the family here:
- an HF directory by the `architectures` of its config.json;
- a converted directory by the family name the converter records in its config.json (`ms_xcomposer.family`).

Model and processor classes are named as "module:attribute" strings and imported on first use, so that
header-only work (`info`, the converter's planning) does not import MindSpore.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ms_xcomposer.config import ConfigError

# The built-in families: the modules that define FAMILY. A new family adds its line here.
BUILTIN_FAMILIES = (
    "ms_xcomposer.models.xcomposer2",
    "ms_xcomposer.models.llava",
    "ms_xcomposer.models.internvl",
)
PLUGIN_ENV = "MS_XCOMPOSER_FAMILIES"  # comma-separated plug-in modules defining FAMILY
ENTRY_POINT_GROUP = "ms_xcomposer.families"  # entry points naming such modules

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Family:
    """Everything the generic code needs to know about one model family.

    name: recorded in converted directories ("xcomposer2"); architectures: the HF config.json `architectures`
    it serves; config_from_hf(hf_config, shapes): its config from HF config.json fields and the checkpoint's
    {name: shape}; config_from_section(section, path): its config from the converter's stored section;
    model / processor: the model class (a `ms_xcomposer.engine.CausalLM`, built as cls(config, dtype=...,
    compute_dtype=...)) and the processor class (`from_pretrained(path, config)`), as classes or
    "module:attribute" strings; keys: the `KeyTable` of HF names; without_optional(config): the config once
    the optional parameters (task adapters) are dropped by conversion; components / component_of / describe:
    what `ms-xcomposer info` prints; request_check: `chat`'s checks before loading; parity: the
    `ms-xcomposer parity` hook; vision_memory: the memory estimate's vision side.
    """

    name: str
    architectures: Tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any], Shapes], Any]
    config_from_section: Callable[[Mapping[str, Any], str], Any]
    model: Union[str, type]
    processor: Union[str, type]
    keys: Any
    without_optional: Callable[[Any], Any] = lambda config: config
    description: str = ""
    # `info`: the components tensors are counted in, in display order, a tensor name's component, and the
    # config in words (first line: the variant or kind). Defaults: weights / buffers / unknown by `keys`.
    components: Tuple[str, ...] = ("weights", "buffers (not weights)", "unknown")
    component_of: Optional[Callable[[str], str]] = None
    describe: Callable[[Any], List[str]] = lambda config: []
    # `chat`'s checks of a request before loading (images, prompt, memory): "module:Class" built as
    # cls(model_dir, config, options); None: the command checks only that image files exist.
    request_check: Optional[str] = None
    # `parity`'s stages: "module:function" called as fn(ms_model, processor, ParityRequest) -> ParityReport
    # (see `ms_xcomposer.parity`); None: the family has no stage-by-stage parity.
    parity: Optional[str] = None
    # The memory estimate's vision side (`info --estimate`, `chat`'s pre-check): "module:attribute" naming a
    # `ms_xcomposer.memory.VisionMemory`; None: the family has no estimate.
    vision_memory: Optional[str] = None

    def component(self, name: str) -> str:
        """The `info` component of tensor `name` (one of `components`)."""
        if self.component_of is not None:
            return self.component_of(name)
        m = self.keys.match_hf(name)
        return "unknown" if m is None else "buffers (not weights)" if m.target is None else "weights"

    def model_class(self) -> type:
        return _resolve(self.model)

    def processor_class(self) -> type:
        return _resolve(self.processor)

    def request_check_class(self) -> type:
        return _resolve(self.request_check)

    def parity_function(self) -> Callable:
        return _resolve(self.parity)

    def vision_memory_hook(self):
        """The family's `ms_xcomposer.memory.VisionMemory` (None when it has none)."""
        return None if self.vision_memory is None else _resolve(self.vision_memory)

    def parameter_shapes(self, config) -> Dict[str, Tuple[int, ...]]:
        """Every parameter of the model `config` describes, by name, with its shape, read off the family's Cells
        built without allocating their data (one description of the module tree for the converter and the
        loader)."""
        model = self.model_class()(config)
        return {name: tuple(int(d) for d in p.shape) for name, p in model.parameters_and_names()}


def _resolve(ref: Union[str, type]) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_FAMILIES: Dict[str, Family] = {}
_BY_ARCHITECTURE: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to the registry (its name and architectures must be new); returns it."""
    _load_builtins()
    _add(family)
    return family


def unregister_family(name: str) -> None:
    """Remove the family `name` (tests that register a toy family clean up with this)."""
    family = _FAMILIES.pop(name)
    for arch in family.architectures:
        _BY_ARCHITECTURE.pop(arch, None)


def _add(family: Family) -> None:
    if family.name in _FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    clash = [a for a in family.architectures if a in _BY_ARCHITECTURE]
    if clash:
        raise ValueError(f"architectures {clash} are already served by family {_BY_ARCHITECTURE[clash[0]].name!r}")
    _FAMILIES[family.name] = family
    for arch in family.architectures:
        _BY_ARCHITECTURE[arch] = family


_loaded = False


def _load_builtins() -> None:
    """Register the built-in families, then the plug-ins (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    plugins = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]
    plugins += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for module in (*BUILTIN_FAMILIES, *plugins):
        try:
            family = importlib.import_module(module).FAMILY
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model family plug-in {module!r} cannot be loaded (it must be an importable module "
                              f"defining FAMILY): {e}") from None
        _add(family)


def families() -> List[Family]:
    """Every registered family, built-in ones first."""
    _load_builtins()
    return list(_FAMILIES.values())


def family_named(name: str) -> Family:
    """The family called `name`; ConfigError lists the known names."""
    _load_builtins()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_for_hf_config(hf_config: Mapping[str, Any], path: str = "config.json") -> Family:
    """The family serving the `architectures` of an HF config.json (read from `path`, named in errors)."""
    _load_builtins()
    archs = hf_config.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ConfigError(f"{path} has no 'architectures' list: cannot tell which model family it is "
                          f"(known: {', '.join(sorted(_BY_ARCHITECTURE))})")
    for arch in archs:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise ConfigError(f"{path}: architectures {archs} are not supported; supported: "
                      f"{', '.join(sorted(_BY_ARCHITECTURE))}")


def family_for_section(section: Mapping[str, Any], path: str = "config.json") -> Family:
    """The family recorded in a converted directory's "ms_xcomposer" section (directories converted before
    families existed record none: they are XComposer2)."""
    name = section.get("family", "xcomposer2") if isinstance(section, Mapping) else None
    if not isinstance(name, str):
        raise ConfigError(f"{path}: the 'ms_xcomposer' section is not an object with a 'family' name")
    return family_named(name)
