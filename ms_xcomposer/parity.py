"""Stage-by-stage parity of a MindSpore model against PyTorch on the same inputs (`ms-xcomposer parity`).

Both sides run one chat prompt (the images given, the query) end to end, each on its own outputs, and every
stage is compared in pipeline order: the image side (pixels, vision features, projector: the family's stages),
the prompt's input embeddings, each decoder layer's output, the logits, and N greedy tokens (identical or
failed, with the first differing step).

This module is the family-independent machinery: the stage verdicts (`compare`, `compare_tokens`), the report
(`ParityReport`: table, JSON, the first diverging stage), forward-hook capture for the PyTorch side, the
remote-code rule, the request checks and `run_parity`. Each family's stages live behind its `Family.parity`
hook ("module:function", e.g. `ms_xcomposer.models.xcomposer2.parity:compare_loaded`), called as
`hook(ms_model, ms_processor, request: ParityRequest) -> ParityReport` on a loaded MindSpore model; the hook's
`options` attribute names the request options it takes (others are refused before loading). A family without
the hook has no parity.

Tolerances come from `ms_xcomposer.tolerances`, keyed by (MindSpore weight dtype, compute dtype); a stage
passes when every element is within atol + rtol x |expected| (allclose); max abs and relative Frobenius
differences are reported beside the verdict. A stage that misses its row is re-judged against the PyTorch side
run in float64 (`rejudge_against_float64`, the judge of `tolerances.judge`): a hook that can rerun its PyTorch
side in another dtype attaches a `TorchRerun` to its report; `run_parity` reruns it only when a numeric stage
failed, and only when the float64 copy fits in the available memory (otherwise the fp32 verdict stands and the
note says why).

Needs torch and transformers (`pip install 'ms-xcomposer[parity]'`). The library never prints and does not
change the MindSpore mode: the caller picks it (`runtime.setup`), the report records it.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mindspore as ms

from ms_xcomposer import runtime
from ms_xcomposer.tolerances import FLOAT64_FACTOR, Key, judge, tolerance

DEFAULT_QUERY = "Describe this image."
DEFAULT_STEPS = 8
_MS_DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}


class ParityError(ValueError):
    """The parity run cannot start: remote code not trusted, mismatched directories, bad arguments."""


@dataclass(frozen=True)
class ParityRequest:
    """What a family's parity hook compares: the PyTorch side's HF directory, the prompt (images, query), the
    greedy steps, the family's options (e.g. XComposer2's `hd_num`; a hook refuses options it does not know),
    and the remote-code choice (see `uses_remote_code`)."""

    hf_dir: str
    images: Tuple[str, ...] = ()
    query: str = DEFAULT_QUERY
    steps: int = DEFAULT_STEPS
    options: Mapping[str, object] = field(default_factory=dict)
    trust_remote_code: bool = False
    force_reference: bool = False

    def refuse_options(self, family: str, known: Sequence[str] = ()) -> None:
        """ParityError when the request carries options other than `known` (named in the message)."""
        unknown = sorted(k for k, v in self.options.items() if v is not None and k not in known)
        if unknown:
            raise ParityError(f"parity options {unknown} do not apply to the {family} family"
                              + (f" (its options: {', '.join(known)})" if known else " (it takes none)"))


# ---- results -------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """One compared stage; `tolerance` is (atol, rtol). For token stages (`greedy tokens`, `prompt ids`), max_abs
    is the number of differing positions, rel_frobenius their fraction, and the tolerance (0, 0): the ids must be
    identical. rule: which rule judged (`tolerances.Verdict.rule`; "identical" for ids); float64: after a
    re-judgement, the max abs from the float64 run of MindSpore ("mindspore") and of the PyTorch side's own run
    ("pytorch", in the dtype "pytorch_dtype")."""

    stage: str
    max_abs: float
    rel_frobenius: float
    tolerance: Tuple[float, float]
    passed: bool
    note: str = ""
    rule: str = "row"
    float64: Optional[Dict[str, object]] = None
    # (MindSpore output, PyTorch output) of a failed numeric stage, kept for the float64 re-judgement only
    outputs: Optional[Tuple[object, object]] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, object]:
        d = {k: v for k, v in asdict(self).items() if k != "outputs"}
        d["tolerance"] = {"atol": self.tolerance[0], "rtol": self.tolerance[1]}
        for k in ("max_abs", "rel_frobenius"):  # JSON has no inf
            d[k] = None if not math.isfinite(d[k]) else d[k]
        return d


@dataclass
class ParityReport:
    """Every stage in pipeline order, the side that judged, the tolerance key and the greedy tokens."""

    stages: List[StageResult]
    torch_side: str
    tolerance_key: Key
    mode: str
    inputs: Dict[str, object] = field(default_factory=dict)
    tokens: Dict[str, List[int]] = field(default_factory=dict)
    # the PyTorch side's rerun in another dtype (None: the hook has none); not part of the report's data
    rerun: Optional["TorchRerun"] = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    @property
    def first_failure(self) -> Optional[StageResult]:
        """The first stage (in pipeline order) outside its tolerance: where the two sides diverge."""
        return next((s for s in self.stages if not s.passed), None)

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.stage for s in self.stages]}")

    def to_dict(self) -> Dict[str, object]:
        first = self.first_failure
        return {
            "passed": self.passed, "first_failure": first.stage if first else None,
            "torch_side": self.torch_side, "mode": self.mode,
            "tolerance_key": {"weights": self.tolerance_key[0], "compute": self.tolerance_key[1]},
            "inputs": self.inputs, "tokens": self.tokens, "stages": [s.to_dict() for s in self.stages],
            "float64_factor": FLOAT64_FACTOR,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write_json(self, path: str) -> None:
        """Write `to_json()` to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    def format_table(self) -> str:
        """The stages as a fixed-width text table (stage, max abs, rel Frobenius, tolerance, result, rule, note)."""
        rows = [("stage", "max abs", "rel frob", "tolerance", "result", "rule", "note")]
        for s in self.stages:
            if s.tolerance == (0.0, 0.0):  # token ids: identical or not
                tol, diff, rel = "identical", f"{int(s.max_abs)} differ", f"{s.rel_frobenius:.2f}"
            else:
                tol = f"{s.tolerance[0]:.0e} + {s.tolerance[1]:.0e}|e|"
                diff, rel = f"{s.max_abs:.3e}", f"{s.rel_frobenius:.3e}"
            rows.append((s.stage, diff, rel, tol, "pass" if s.passed else "FAIL", s.rule, s.note))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + ("  " + r[6] if r[6] else "") for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def compare(stage: str, actual, expected, key: Key, note: str = "") -> StageResult:
    """Compare the MindSpore `actual` with the PyTorch `expected` under `key`'s (atol, rtol), allclose semantics
    (`ms_xcomposer.tolerances`). A shape mismatch is a failed stage (infinite differences) whose note gives both
    shapes.
    """
    try:
        verdict = judge(actual, expected, key)
    except ValueError as e:
        return StageResult(stage, math.inf, math.inf, tolerance(key), False, _join(note, str(e)), rule="failed")
    return StageResult(stage, verdict.max_abs, verdict.rel_frobenius, tolerance(key), verdict.passed, note,
                       rule=verdict.rule, outputs=None if verdict.passed else (actual, expected))


def compare_tokens(actual: Sequence[int], expected: Sequence[int], margins: Optional[Sequence[float]] = None,
                   stage: str = "greedy tokens") -> StageResult:
    """Token ids (greedy tokens; `stage` names others, e.g. "prompt ids"): identical, or failed with the first
    differing step in the note.

    margins: the PyTorch side's top-1 minus top-2 logit per step; a small margin at the first differing step
    means a near-tie that rounding can flip, which the note reports.
    """
    actual, expected = list(actual), list(expected)
    n = max(len(actual), len(expected))
    differing = [i for i in range(n) if i >= len(actual) or i >= len(expected) or actual[i] != expected[i]]
    note = ""
    if differing:
        first = differing[0]
        window = slice(max(0, first - 4), first + 12)  # long id lists (prompts): around the first difference
        shown = (actual, expected) if n <= 32 else (actual[window], expected[window])
        where = "" if n <= 32 else f" (positions {window.start}..{window.stop - 1})"
        note = f"first differs at step {first}: mindspore {shown[0]} vs pytorch {shown[1]}{where}"
        if margins is not None and first < len(margins):
            note += f"; pytorch top-1 - top-2 logit margin there {margins[first]:.3g}"
    return StageResult(stage, float(len(differing)), len(differing) / n if n else 0.0, (0.0, 0.0),
                       not differing, note, rule="identical")


def decoder_stages(ms_model, embeds, expected: Mapping[str, object], key: Key, steps: int, eos: Sequence[int],
                   torch_greedy: Callable[[], Tuple[Sequence[int], Sequence[float]]],
                   **extras) -> Tuple[List[StageResult], List[int], List[int]]:
    """The language-model stages every family shares, on the MindSpore prompt embeddings `embeds` against the
    PyTorch side's `expected` stages: `embeddings`, `layer i` (each decoder layer's output), `logits`, then
    `greedy tokens`: `steps` greedy steps (repetition penalty 1, stopping at `eos`) against `torch_greedy()` ->
    (tokens, top-1 - top-2 logit margins). extras: the family's per-token model inputs (XComposer2's im_mask).
    Returns the stages and the MindSpore and PyTorch tokens."""
    from ms_xcomposer.generation import GenerationConfig, generate

    stages = [compare("embeddings", embeds, expected["embeddings"], key)]
    out = ms_model(inputs_embeds=embeds, output_hidden_states=True, **extras)
    for i, hidden in enumerate(out.hidden_states[1:]):
        stages.append(compare(f"layer {i}", hidden, expected[f"layer {i}"], key))
    stages.append(compare("logits", out.logits, expected["logits"], key))
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, repetition_penalty=1.0, eos_token_id=list(eos))
    ms_tokens = [int(t) for t in generate(ms_model, embeds, gen, **extras).ids]
    pt_tokens, margins = torch_greedy()
    stages.append(compare_tokens(ms_tokens, pt_tokens, margins))
    return stages, ms_tokens, [int(t) for t in pt_tokens]


# ---- the float64 re-judgement ------------------------------------------------------------------------------------
@dataclass
class TorchRerun:
    """A family's PyTorch side rerun end to end in another dtype on the same inputs.

    run(dtype name, stage names) -> {stage: output} for those stages: converts the PyTorch model in place (so
    "float64" must come before "float16"; the fp32 weights are exact in float64). parameters: the model's
    parameter count (the memory check)."""

    parameters: int
    run: Callable[[str, Sequence[str]], Mapping[str, object]]


def float64_bytes(report: ParityReport, stages: Sequence[StageResult]) -> int:
    """Estimated memory the float64 rerun adds: the model's float32 -> float64 growth (4 bytes a parameter) and the
    re-judged stages' float64 outputs twice (kept, plus the one being computed)."""
    elements = sum(_elements(s.outputs[1]) for s in stages)
    return 4 * report.rerun.parameters + 2 * 8 * elements


def _elements(x) -> int:
    numel = getattr(x, "numel", None)  # torch (size is a method there); numpy and MindSpore: size
    return int(numel()) if callable(numel) else int(x.size)


def available_memory() -> int:
    """Bytes of memory available to this process now (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def rejudge_against_float64(report: ParityReport) -> None:
    """Re-judge every failed numeric stage of `report` against its PyTorch side run in float64
    (`tolerances.judge`), in place; a no-op when none failed or the hook has no `rerun`. When the estimated
    memory (`float64_bytes`) exceeds what is available, the stages keep the fp32 verdict and their note says so.
    The stages' kept outputs are released either way."""
    failed = [s for s in report.stages if not s.passed and s.outputs is not None]
    try:
        if failed and report.rerun is not None:
            _rejudge(report, failed)
    finally:
        for s in failed:
            s.outputs = None


def _rejudge(report: ParityReport, failed: Sequence[StageResult]) -> None:
    need, available = float64_bytes(report, failed), available_memory()
    if need > available:
        for s in failed:
            s.note = _join(s.note, f"float64 rerun skipped: it needs about {need / 1e9:.1f} GB, "
                                   f"{available / 1e9:.1f} GB available; judged by the float32 comparison only")
        return
    names = [s.stage for s in failed]
    compute = report.tolerance_key[1]
    try:  # the PyTorch side may be foreign code (trusted remote code) that does not run in float64
        exact = report.rerun.run("float64", names)
        own = report.rerun.run(compute, names) if compute != "float32" else {}
    except (RuntimeError, TypeError, ValueError) as e:
        for s in failed:
            s.note = _join(s.note, f"float64 rerun failed ({type(e).__name__}: {e}); judged by the float32 "
                                   "comparison only")
        return
    for s in (s for s in failed if s.stage in exact):  # every numeric stage of the three families has one
        ours, theirs = s.outputs
        verdict = judge(ours, theirs, report.tolerance_key, exact[s.stage], own.get(s.stage))
        s.passed, s.rule = verdict.passed, verdict.rule
        s.float64 = {"mindspore": verdict.ours, "pytorch": verdict.reference, "pytorch_dtype": verdict.reference_dtype}
        s.note = _join(s.note, verdict.explain())


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ---- the PyTorch side: forward hooks ------------------------------------------------------------------------
@contextlib.contextmanager
def forward_hooks(registrations: Sequence[Tuple[object, str, Callable]]) -> Iterator[None]:
    """Register (module, "pre"|"post", fn) torch forward hooks (with kwargs) for the duration of the block."""
    handles = []
    try:
        for module, kind, fn in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def first_tensor(value):
    """The tensor in a hook's argument or output: itself, or the first of a list / tuple (recursively)."""
    if isinstance(value, (list, tuple)):
        return first_tensor(value[0]) if value else None
    return value


def call_with_layer_outputs(layers: Sequence[object], fn: Callable[[], object]) -> Tuple[List[object], object]:
    """Call `fn()` without gradients, capturing the output of each torch module of `layers` (forward hooks).

    Returns (the captured outputs as numpy arrays (`torch_numpy`), in call order; fn's result).
    """
    import torch

    outputs: List[object] = []
    hooks = [(layer, "post", lambda m, a, k, out: outputs.append(first_tensor(out))) for layer in layers]
    with torch.no_grad(), forward_hooks(hooks):
        out = fn()
    return [torch_numpy(o) for o in outputs], out


def torch_numpy(t) -> "np.ndarray":
    """A torch tensor as numpy: float64 kept (the float64 rerun), every other float dtype as float32."""
    import torch

    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).numpy()


def greedy_margins(scores: Sequence[object]) -> List[float]:
    """Each step's top-1 minus top-2 logit of transformers' `generate(output_scores=True)` scores (batch row 0)."""
    import torch

    tops = [torch.topk(s[0].float(), 2).values for s in scores]
    return [float(top[0] - top[1]) for top in tops]


def remote_code_files(hf_dir: str) -> List[str]:
    """The `modeling_*.py` files of an HF directory (its remote code), sorted by name."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "modeling_*.py")))


def uses_remote_code(hf_dir: str, trust_remote_code: bool = False, force_reference: bool = False) -> bool:
    """Whether the PyTorch side of `hf_dir` is its remote code (True) or the project's PyTorch side (False).

    Raises ParityError when the directory carries remote code and neither flag says what to do with it.
    """
    files = remote_code_files(hf_dir)
    if not files or force_reference:
        return False
    if not trust_remote_code:
        raise ParityError(
            f"{hf_dir} carries remote code ({', '.join(files)}); running it executes that code. Pass "
            "--trust-remote-code to use it as the PyTorch side, or --reference to use the project's PyTorch "
            "reference instead")
    return True


# ---- the run ---------------------------------------------------------------------------------------------------
def tolerance_key(model) -> Key:
    """(storage dtype of the MindSpore weights, compute dtype) of a loaded model: the output head's weights, or
    the decoder's (token embedding first) when the head is tied to the embedding."""
    params = list(model.lm_head.get_parameters()) or list(model.decoder.get_parameters())
    return _MS_DTYPE_NAMES[params[0].dtype], _MS_DTYPE_NAMES[model.compute_dtype]


def check_request(hf_dir: str, images: Sequence[str] = (), steps: int = DEFAULT_STEPS,
                  trust_remote_code: bool = False, force_reference: bool = False) -> List[str]:
    """Validate a parity request without loading anything; returns the image paths. Raises ParityError."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ParityError(f"parity needs {' and '.join(missing)} for the PyTorch side: "
                          "pip install 'ms-xcomposer[parity]'")
    if not os.path.isdir(hf_dir):
        raise ParityError(f"HF directory {hf_dir} does not exist")
    uses_remote_code(hf_dir, trust_remote_code, force_reference)
    return check_images_and_steps(images, steps)


def check_images_and_steps(images: Sequence[str], steps: int) -> List[str]:
    """The image paths of a request (each must be a file) after checking `steps` is a positive integer."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParityError(f"steps must be a positive integer, got {steps!r}")
    paths = [os.fspath(p) for p in images]
    for path in paths:
        if not os.path.isfile(path):
            raise ParityError(f"image {path} does not exist")
    return paths


def mode_name() -> str:
    """The MindSpore mode a report records."""
    return "graph" if runtime.is_graph_mode() else "pynative"


def parity_hook(family) -> Callable:
    """The `Family.parity` hook of `family`; ParityError naming the families that have one when it has none."""
    if family.parity is None:
        from ms_xcomposer.families import families

        have = [f.name for f in families() if f.parity is not None]
        raise ParityError(f"stage-by-stage parity is not implemented for the {family.name} family; it is for "
                          f"{', '.join(have)}")
    return family.parity_function()


def run_parity(hf_dir: str, ms_dir: Optional[str] = None, images: Sequence[str] = (), query: str = DEFAULT_QUERY,
               dtype: Optional[str] = None, hd_num: Optional[int] = None, steps: int = DEFAULT_STEPS,
               trust_remote_code: bool = False, force_reference: bool = False,
               **options: object) -> ParityReport:
    """Load the MindSpore model from `ms_dir` (default: `hf_dir` itself) and compare it with the PyTorch side of
    `hf_dir` through its family's parity hook. dtype: the MindSpore compute dtype (None: the device default);
    hd_num and `options`: the family's options (None: not given).

    Raises ParityError (remote code without trust, a family without parity, options it does not take,
    mismatched directories), OSError / ValueError for unreadable directories.
    """
    from ms_xcomposer.api import load
    from ms_xcomposer.conversion.readers import open_checkpoint

    images = check_request(hf_dir, images, steps, trust_remote_code, force_reference)  # before the (slow) loading
    with open_checkpoint(ms_dir or hf_dir) as reader:
        family = reader.family
    with open_checkpoint(hf_dir) as reader:
        if reader.family.name != family.name:
            raise ParityError(f"{ms_dir} is a {family.name} model but {hf_dir} is {reader.family.name}")
    hook = parity_hook(family)
    request = ParityRequest(hf_dir, tuple(images), query, steps, {"hd_num": hd_num, **options},
                            trust_remote_code, force_reference)
    request.refuse_options(family.name, getattr(hook, "options", ()))
    ms_model, processor = load(ms_dir or hf_dir, dtype=dtype)
    report = hook(ms_model, processor, request)
    rejudge_against_float64(report)
    report.inputs.update(hf_dir=os.path.abspath(hf_dir), ms_dir=os.path.abspath(ms_dir or hf_dir))
    return report
