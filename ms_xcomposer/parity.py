"""Stage-by-stage parity of the MindSpore model against PyTorch on the same inputs (`ms-xcomposer parity`).

Both sides run one chat prompt (the images given, the query) end to end, each on its own outputs, and every
stage is compared in order:

    pixels -> vit input -> vision tower -> assembled tokens -> projector   (per image)
    -> embeddings -> layer 0 .. layer N-1 -> logits -> greedy tokens

- `pixels`: `ms_xcomposer.models.xcomposer2.processing.preprocess` against the PyTorch side's own preprocessing. Only the
  official remote code has one; the project's reference takes the same numpy pixels, so on that path the row
  says it is not an independent check.
- `vit input`: the ViT batch (HD: the bicubic global view, then the tiles); `vision tower`: last-layer
  features, CLS dropped; `assembled tokens`: what enters `vision_proj` (HD: merged tiles with separators);
  `projector`: the image embeddings.
- `embeddings`: the whole prompt's input embeddings (text ids embedded, images spliced in); `layer i`: output
  of decoder layer i (PyTorch side captured with forward hooks); `logits`: every position.
- `greedy tokens`: N greedy steps (repetition penalty 1, stop on the chat's stop ids) must be identical.

Tolerances come from `ms_xcomposer.tolerances`, keyed by (MindSpore weight dtype, compute dtype); a stage
passes when every element is within atol + rtol x |expected| (allclose); max abs and relative Frobenius
differences are reported beside the verdict.

The PyTorch side is the project's reference (`ms_xcomposer.reference`), or the HF directory's own remote code
(`modeling_*.py`, loaded with transformers' `trust_remote_code`) when the caller explicitly trusts it. The
remote code's images are encoded by its own `encode_img(path, hd_num)`, with the stages captured by hooks
on the modules named as the checkpoint keys (`vit`, `vit.vision_tower`, `vision_proj`); the official code may
need things this environment lacks (torchvision; IXC-2.5 downloads a font at start-up).

Needs torch and transformers (`pip install 'ms-xcomposer[parity]'`). The library never prints and does not
change the MindSpore mode: the caller picks it (`runtime.setup`), the report records it.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ms_xcomposer import runtime
from ms_xcomposer.tolerances import Key, metrics, tolerance

DEFAULT_QUERY = "Describe this image."
DEFAULT_STEPS = 8
IMAGE_STAGES = ("pixels", "vit input", "vision tower", "assembled tokens", "projector")
_MS_DTYPE_NAMES = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}


# The families whose stages (vision tower, projector, decoder layers) this module compares.
PARITY_FAMILIES = ("xcomposer2",)


class ParityError(ValueError):
    """The parity run cannot start: remote code not trusted, mismatched directories, bad arguments."""


# ---- results -------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """One compared stage; `tolerance` is (atol, rtol). For `greedy tokens`, max_abs is the number of differing
    positions, rel_frobenius their fraction, and the tolerance (0, 0): the tokens must be identical."""

    stage: str
    max_abs: float
    rel_frobenius: float
    tolerance: Tuple[float, float]
    passed: bool
    note: str = ""

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
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
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def write_json(self, path: str) -> None:
        """Write `to_json()` to `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    def format_table(self) -> str:
        """The stages as a fixed-width text table (stage, max abs, rel Frobenius, tolerance, result, note)."""
        rows = [("stage", "max abs", "rel frob", "tolerance", "result", "note")]
        for s in self.stages:
            if s.stage == "greedy tokens":
                tol, diff, rel = "identical", f"{int(s.max_abs)} differ", f"{s.rel_frobenius:.2f}"
            else:
                tol = f"{s.tolerance[0]:.0e} + {s.tolerance[1]:.0e}|e|"
                diff, rel = f"{s.max_abs:.3e}", f"{s.rel_frobenius:.3e}"
            rows.append((s.stage, diff, rel, tol, "pass" if s.passed else "FAIL", s.note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def compare(stage: str, actual, expected, key: Key, note: str = "") -> StageResult:
    """Compare the MindSpore `actual` with the PyTorch `expected` under `key`'s (atol, rtol), allclose semantics
    (`ms_xcomposer.tolerances`). A shape mismatch is a failed stage (infinite differences) whose note gives both
    shapes.
    """
    try:
        max_abs, rel, ratio = metrics(actual, expected, key)
    except ValueError as e:
        return StageResult(stage, math.inf, math.inf, tolerance(key), False, _join(note, str(e)))
    return StageResult(stage, max_abs, rel, tolerance(key), ratio <= 1.0, note)


def compare_tokens(actual: Sequence[int], expected: Sequence[int],
                   margins: Optional[Sequence[float]] = None) -> StageResult:
    """Greedy tokens: identical, or failed with the first differing step in the note.

    margins: the PyTorch side's top-1 minus top-2 logit per step; a small margin at the first differing step
    means a near-tie that rounding can flip, which the note reports.
    """
    actual, expected = list(actual), list(expected)
    n = max(len(actual), len(expected))
    differing = [i for i in range(n) if i >= len(actual) or i >= len(expected) or actual[i] != expected[i]]
    note = ""
    if differing:
        first = differing[0]
        note = f"first differs at step {first}: mindspore {actual} vs pytorch {expected}"
        if margins is not None and first < len(margins):
            note += f"; pytorch top-1 - top-2 logit margin there {margins[first]:.3g}"
    return StageResult("greedy tokens", float(len(differing)), len(differing) / n if n else 0.0, (0.0, 0.0),
                       not differing, note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ---- the PyTorch side ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hooks(registrations: Sequence[Tuple[object, str, Callable]]) -> Iterator[None]:
    """Register (module, "pre"|"post", fn) forward hooks for the duration of the block."""
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


def _first_tensor(value):
    """The tensor in a hook's argument or output: itself, or the first of a list / tuple (recursively)."""
    if isinstance(value, (list, tuple)):
        return _first_tensor(value[0]) if value else None
    return value


class TorchSide:
    """The PyTorch model a MindSpore model is compared with: the project's reference or the official remote code.

    Both are called the same way for the language model (`model(inputs_embeds=, im_mask=)`, transformers'
    `generate`, decoder layers at `model.model.layers`); they differ in how images are encoded.
    """

    def __init__(self, model, remote: bool, description: str):
        import torch

        self.torch = torch
        self.model = model
        self.remote = remote
        self.description = description

    @property
    def independent_pixels(self) -> bool:
        """Whether this side preprocesses images itself (only the remote code does)."""
        return self.remote

    def encode_image(self, image, pixels: np.ndarray, hd_num: int) -> Dict[str, object]:
        """Stages of one image as torch tensors: pixels, vit_input, vit_features, assembled, img_embeds.

        The reference encodes the given (MindSpore-side) `pixels`; the remote code encodes `image` itself.
        """
        torch = self.torch
        with torch.no_grad():
            if not self.remote:
                stages = dict(self.model.encode_img_stages(torch.from_numpy(pixels)))
                stages["pixels"] = torch.from_numpy(pixels)
                return stages
            return self._remote_encode(image, hd_num)

    def _remote_encode(self, image, hd_num: int) -> Dict[str, object]:
        model = self.model
        got: Dict[str, List[object]] = {k: [] for k in ("pixels", "vit_input", "vit_features", "assembled",
                                                         "img_embeds")}

        def arg(args, kwargs, name):
            return _first_tensor(args[0] if args else kwargs.get(name))

        def tower_out(module, args, kwargs, out):
            states = getattr(out, "hidden_states", None)
            if states is None:
                raise ParityError("the remote vision tower returned no hidden_states; cannot capture its features")
            got["vit_features"].append(states[-1][:, 1:])

        registrations = [
            (model.vit, "pre", lambda m, a, k: got["pixels"].append(arg(a, k, "images"))),
            (model.vit.vision_tower, "pre", lambda m, a, k: got["vit_input"].append(arg(a, k, "pixel_values"))),
            (model.vit.vision_tower, "post", tower_out),
            (model.vision_proj, "pre", lambda m, a, k: got["assembled"].append(arg(a, k, "input"))),
            (model.vision_proj, "post", lambda m, a, k, out: got["img_embeds"].append(out)),
        ]
        kwargs = {"hd_num": hd_num} if "hd_num" in inspect.signature(model.encode_img).parameters else {}
        with self.torch.no_grad(), _hooks(registrations):
            model.encode_img(os.fspath(image), **kwargs)
        if not all(got.values()):
            raise ParityError(f"the remote encode_img did not run every stage: "
                              f"{[k for k, v in got.items() if not v]} not captured")
        cat = self.torch.cat
        return {"pixels": got["pixels"][0], "vit_input": cat(got["vit_input"]),
                "vit_features": cat(got["vit_features"]), "assembled": got["assembled"][0],
                "img_embeds": got["img_embeds"][0]}

    def embed(self, ids: Sequence[int]):
        """[1, n, hidden] token embeddings."""
        with self.torch.no_grad():
            return self.model.model.tok_embeddings(self.torch.tensor([list(ids)], dtype=self.torch.long))

    def prefill(self, embeds, im_mask: np.ndarray) -> Tuple[List[np.ndarray], np.ndarray]:
        """Each decoder layer's output [1, S, hidden] and the logits [1, S, vocab] (float32 numpy)."""
        layers, out = run_with_layer_outputs(self.model, inputs_embeds=embeds, im_mask=self.torch.from_numpy(im_mask))
        return layers, out.logits.float().numpy()

    def greedy(self, embeds, im_mask: np.ndarray, steps: int, eos: Sequence[int]) -> Tuple[List[int], List[float]]:
        """Greedy new tokens (repetition penalty 1, stopping on `eos`) and each step's top-1 - top-2 logit margin."""
        torch = self.torch
        mask = torch.from_numpy(im_mask)
        with torch.no_grad():
            out = self.model.generate(inputs_embeds=embeds, im_mask=mask,
                                      attention_mask=torch.ones_like(mask, dtype=torch.long), do_sample=False,
                                      num_beams=1, repetition_penalty=1.0, max_new_tokens=steps,
                                      eos_token_id=list(eos), pad_token_id=eos[0], output_scores=True,
                                      return_dict_in_generate=True)
        margins = []
        for scores in out.scores:
            top = torch.topk(scores[0].float(), 2).values
            margins.append(float(top[0] - top[1]))
        return [int(t) for t in out.sequences[0]], margins  # only new tokens: the prompt was given as embeddings


def run_with_layer_outputs(model, **forward_kwargs) -> Tuple[List[np.ndarray], object]:
    """Call a PyTorch XComposer2 model (the reference or the remote code) without gradients, capturing the output
    of every decoder layer (`model.model.layers`) with forward hooks.

    Returns (float32 numpy arrays [B, S, hidden], one per layer in order; the model's output).
    """
    import torch

    outputs: List[object] = []
    hooks = [(layer, "post", lambda m, a, k, out: outputs.append(_first_tensor(out))) for layer in model.model.layers]
    with torch.no_grad(), _hooks(hooks):
        out = model(**forward_kwargs)
    return [o.float().numpy() for o in outputs], out


def remote_code_files(hf_dir: str) -> List[str]:
    """The `modeling_*.py` files of an HF directory (its remote code), sorted by name."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "modeling_*.py")))


def uses_remote_code(hf_dir: str, trust_remote_code: bool = False, force_reference: bool = False) -> bool:
    """Whether the PyTorch side of `hf_dir` is its remote code (True) or the project's reference (False).

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


def load_torch_side(hf_dir: str, trust_remote_code: bool = False, force_reference: bool = False) -> TorchSide:
    """The PyTorch side for `hf_dir` in float32: its remote code (only with `trust_remote_code`), or the project's
    reference loaded from the directory's weights. See `uses_remote_code` for the choice."""
    if uses_remote_code(hf_dir, trust_remote_code, force_reference):
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True, torch_dtype=torch.float32).eval()
        return TorchSide(model, remote=True, description=f"remote code ({', '.join(remote_code_files(hf_dir))})")
    from ms_xcomposer.reference import ReferenceXComposer2

    return TorchSide(ReferenceXComposer2.from_pretrained(hf_dir), remote=False, description="reference")


# ---- the run ---------------------------------------------------------------------------------------------------
def tolerance_key(model) -> Key:
    """(storage dtype of the MindSpore weights, compute dtype) of a loaded model."""
    storage = model.output.weight.dtype
    return _MS_DTYPE_NAMES[storage], _MS_DTYPE_NAMES[model.compute_dtype]


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
    return _check_images_and_steps(images, steps)


def _check_images_and_steps(images: Sequence[str], steps: int) -> List[str]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParityError(f"steps must be a positive integer, got {steps!r}")
    paths = [os.fspath(p) for p in images]
    for path in paths:
        if not os.path.isfile(path):
            raise ParityError(f"image {path} does not exist")
    return paths


def compare_models(ms_model, torch_side: TorchSide, tokenizer, images: Sequence[str] = (),
                   query: str = DEFAULT_QUERY, hd_num: Optional[int] = None,
                   steps: int = DEFAULT_STEPS) -> ParityReport:
    """Run both models on one chat prompt (official template, no history) and compare every stage.

    ms_model: an `XComposer2ForCausalLM`; torch_side: `load_torch_side(...)`; tokenizer: the checkpoint's
    `InternLM2Tokenizer`; images: image files (none = the text-only prompt); hd_num: HD tile budget (default:
    the variant's rule); steps: greedy steps compared.
    """
    from ms_xcomposer.models.xcomposer2.processor import XComposer2Processor
    from ms_xcomposer.generation import GenerationConfig, generate
    from ms_xcomposer.models.xcomposer2.processing import preprocess
    from ms_xcomposer.models.xcomposer2.prompt import ImageSlot, build_chat_prompt, effective_hd_num

    images = _check_images_and_steps(images, steps)
    cfg = ms_model.config
    key = tolerance_key(ms_model)
    hd = effective_hd_num(cfg.spec, len(images), hd_num)
    pieces = build_chat_prompt(query, (), cfg.spec, len(images) if images else None)
    stages: List[StageResult] = []

    ms_images, pt_images = [], []
    for i, path in enumerate(images):
        suffix = f" (image {i + 1})" if len(images) > 1 else ""
        pixels = preprocess(path, cfg.spec, hd)
        pt = torch_side.encode_image(path, pixels, hd)
        views, _, _ = ms_model.vit_views(pixels)
        ms_stages = {
            "pixels": pixels,
            "vit_input": views,
            "vit_features": ms_model.vit.encode(Tensor(views).astype(ms_model.compute_dtype)),
            "assembled": ms_model.encode_img(pixels, project=False),
            "img_embeds": ms_model.encode_img(pixels),
        }
        pixel_note = "" if torch_side.independent_pixels else (
            "same pixels fed to the PyTorch reference (it has no preprocessing of its own): not an independent check")
        for name, k in zip(IMAGE_STAGES, ("pixels", "vit_input", "vit_features", "assembled", "img_embeds")):
            stages.append(compare(name + suffix, ms_stages[k], pt[k], key, pixel_note if k == "pixels" else ""))
        ms_images.append(ms_stages["img_embeds"])
        pt_images.append(pt["img_embeds"])

    # Each side builds its own prompt: if image token counts differ (e.g. another tile grid), its stages show it
    # as shape mismatches while the greedy tokens are still compared.
    ms_parts, pt_parts, ms_masks, pt_masks = [], [], [], []
    for piece in pieces:
        if isinstance(piece, ImageSlot):
            ms_parts.append(ms_images[piece.index].asnumpy().astype(np.float32))
            pt_parts.append(pt_images[piece.index].float())
        else:
            ids = tokenizer.encode(piece.text, add_bos=piece.add_bos)
            if not ids:
                continue
            ms_parts.append(ms_model.embed_tokens(np.asarray([ids], np.int32)).asnumpy().astype(np.float32))
            pt_parts.append(torch_side.embed(ids).float())
        is_image = isinstance(piece, ImageSlot)
        ms_masks.append(np.full(ms_parts[-1].shape[1], is_image))
        pt_masks.append(np.full(int(pt_parts[-1].shape[1]), is_image))
    ms_embeds, ms_mask = np.concatenate(ms_parts, axis=1), np.concatenate(ms_masks)[None]
    pt_embeds, pt_mask = torch_side.torch.cat(pt_parts, dim=1), np.concatenate(pt_masks)[None]
    stages.append(compare("embeddings", ms_embeds, pt_embeds, key))

    out = ms_model(inputs_embeds=ms_embeds, im_mask=ms_mask, output_hidden_states=True)
    pt_layers, pt_logits = torch_side.prefill(pt_embeds, pt_mask)
    for i, (ms_h, pt_h) in enumerate(zip(out.hidden_states[1:], pt_layers)):
        stages.append(compare(f"layer {i}", ms_h, pt_h, key))
    stages.append(compare("logits", out.logits, pt_logits, key))

    eos = list(XComposer2Processor(tokenizer, cfg).eos_token_ids)
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, repetition_penalty=1.0, eos_token_id=eos)
    ms_tokens = generate(ms_model, ms_embeds, gen, im_mask=ms_mask).ids
    pt_tokens, margins = torch_side.greedy(pt_embeds, pt_mask, steps, eos)
    stages.append(compare_tokens(ms_tokens, pt_tokens, margins))

    return ParityReport(
        stages=stages, torch_side=torch_side.description, tolerance_key=key,
        mode="graph" if runtime.is_graph_mode() else "pynative",
        inputs={"images": images, "query": query, "hd_num": hd if images else None, "steps": steps,
                "prompt_length": int(ms_mask.shape[1]), "image_tokens": int(ms_mask.sum())},
        tokens={"mindspore": list(ms_tokens), "pytorch": list(pt_tokens)},
    )


def run_parity(hf_dir: str, ms_dir: Optional[str] = None, images: Sequence[str] = (), query: str = DEFAULT_QUERY,
               dtype: Optional[str] = None, hd_num: Optional[int] = None, steps: int = DEFAULT_STEPS,
               trust_remote_code: bool = False, force_reference: bool = False) -> ParityReport:
    """Load the PyTorch side from `hf_dir` and the MindSpore model from `ms_dir` (default: `hf_dir` itself),
    then `compare_models`. dtype: the MindSpore compute dtype (None: the device default).

    Raises ParityError (remote code without trust, variants that differ), OSError / ValueError for unreadable
    directories.
    """
    from ms_xcomposer.api import load
    from ms_xcomposer.conversion.readers import open_checkpoint
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    check_request(hf_dir, images, steps, trust_remote_code, force_reference)  # before the (slow) loading
    with open_checkpoint(ms_dir or hf_dir) as reader:
        family = reader.family.name
    if family not in PARITY_FAMILIES:
        raise ParityError(f"{ms_dir or hf_dir} is a {family} model; stage-by-stage parity is implemented for "
                          f"{', '.join(PARITY_FAMILIES)}")
    torch_side = load_torch_side(hf_dir, trust_remote_code, force_reference)
    ms_model, _ = load(ms_dir or hf_dir, dtype=dtype)
    torch_variant = getattr(getattr(torch_side.model, "xc", None), "variant", None)
    if torch_variant is not None and torch_variant != ms_model.config.variant:
        raise ParityError(f"{ms_dir or hf_dir} is a {ms_model.config.variant} model but {hf_dir} is {torch_variant}")
    tokenizer = InternLM2Tokenizer.from_pretrained(hf_dir)
    report = compare_models(ms_model, torch_side, tokenizer, images, query, hd_num, steps)
    report.inputs.update(hf_dir=os.path.abspath(hf_dir), ms_dir=os.path.abspath(ms_dir or hf_dir))
    return report
