"""The XComposer2 family's parity stages (the `Family.parity` hook; machinery in `ms_xcomposer.parity`).

Stages, in order:

    pixels -> vit input -> vision tower -> assembled tokens -> projector   (per image)
    -> embeddings -> layer 0 .. layer N-1 -> logits -> greedy tokens

- `pixels`: `ms_xcomposer.models.xcomposer2.processing.preprocess` against the PyTorch side's own preprocessing.
  Only the official remote code has one; the project's reference takes the same numpy pixels, so on that path
  the row says it is not an independent check.
- `vit input`: the ViT batch (HD: the bicubic global view, then the tiles); `vision tower`: last-layer
  features, CLS dropped; `assembled tokens`: what enters `vision_proj` (HD: merged tiles with separators);
  `projector`: the image embeddings.
- `embeddings`: the whole prompt's input embeddings (text ids embedded, images spliced in); `layer i`: output
  of decoder layer i (PyTorch side captured with forward hooks); `logits`: every position.
- `greedy tokens`: N greedy steps (repetition penalty 1, stop on the chat's stop ids) must be identical.

The PyTorch side is the project's reference (`ms_xcomposer.reference`), or the HF directory's own remote code
(`modeling_*.py`, loaded with transformers' `trust_remote_code`) when the caller explicitly trusts it. The
remote code's images are encoded by its own `encode_img(path, hd_num)`, with the stages captured by hooks
on the modules named as the checkpoint keys (`vit`, `vit.vision_tower`, `vision_proj`); the official code may
need things this environment lacks (torchvision; IXC-2.5 downloads a font at start-up).

Option: `hd_num` (HD tile budget per image; default: the variant's rule).
"""
from __future__ import annotations

import inspect
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from ms_xcomposer.parity import (DEFAULT_QUERY, DEFAULT_STEPS, ParityError, ParityReport, ParityRequest, StageResult,
                                 TorchRerun, call_with_layer_outputs, check_images_and_steps, compare, decoder_stages,
                                 first_tensor, forward_hooks, greedy_margins, mode_name, remote_code_files,
                                 tolerance_key, torch_numpy, uses_remote_code)

IMAGE_STAGES = ("pixels", "vit input", "vision tower", "assembled tokens", "projector")


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
            return first_tensor(args[0] if args else kwargs.get(name))

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
        with self.torch.no_grad(), forward_hooks(registrations):
            model.encode_img(os.fspath(image), **kwargs)
        if not all(got.values()):
            raise ParityError(f"the remote encode_img did not run every stage: "
                              f"{[k for k, v in got.items() if not v]} not captured")
        cat = self.torch.cat
        return {"pixels": got["pixels"][0], "vit_input": cat(got["vit_input"]),
                "vit_features": cat(got["vit_features"]), "assembled": got["assembled"][0],
                "img_embeds": got["img_embeds"][0]}

    def stages(self, images: Sequence[str], pixels: Sequence[np.ndarray], hd_num: int, pieces: Sequence[object],
               tokenizer, keep: Optional[Sequence[str]] = None):
        """Every numeric stage ({name: numpy}, only `keep`'s when given) of the prompt `pieces` with `images` (the
        reference encodes the MindSpore side's `pixels`), end to end in the model's current dtype; and the
        prompt's embeddings (torch) and image mask (numpy [1, S])."""
        from ms_xcomposer.models.xcomposer2.prompt import ImageSlot

        out: Dict[str, object] = {}
        encoded = []
        for i, (path, px) in enumerate(zip(images, pixels)):
            pt = self.encode_image(path, px, hd_num)
            suffix = image_suffix(i, len(images))
            out.update((name + suffix, pt[k]) for name, k in zip(
                IMAGE_STAGES, ("pixels", "vit_input", "vit_features", "assembled", "img_embeds")))
            encoded.append(pt["img_embeds"])
        parts, masks = [], []
        for piece in pieces:
            if isinstance(piece, ImageSlot):
                parts.append(encoded[piece.index])
            else:
                ids = tokenizer.encode(piece.text, add_bos=piece.add_bos)
                if not ids:
                    continue
                parts.append(self.embed(ids))
            masks.append(np.full(int(parts[-1].shape[1]), isinstance(piece, ImageSlot)))
        dtype = self.model.model.tok_embeddings.weight.dtype  # one dtype: remote code may give float32 images
        embeds, mask = self.torch.cat([p.to(dtype) for p in parts], dim=1), np.concatenate(masks)[None]
        out["embeddings"] = embeds
        layers, result = run_with_layer_outputs(self.model, inputs_embeds=embeds, im_mask=self.torch.from_numpy(mask))
        out.update((f"layer {i}", h) for i, h in enumerate(layers))
        out["logits"] = result.logits
        wanted = out if keep is None else {k: out[k] for k in keep if k in out}
        return {k: v if isinstance(v, np.ndarray) else torch_numpy(v) for k, v in wanted.items()}, embeds, mask

    def rerun(self, images: Sequence[str], pixels: Sequence[np.ndarray], hd_num: int, pieces: Sequence[object],
              tokenizer) -> TorchRerun:
        """The same stages in another dtype (the model converted in place; see `TorchRerun`)."""

        def run(dtype: str, keep: Sequence[str]):
            self.model.to(getattr(self.torch, dtype))
            return self.stages(images, pixels, hd_num, pieces, tokenizer, keep)[0]

        return TorchRerun(sum(p.numel() for p in self.model.parameters()), run)

    def embed(self, ids: Sequence[int]):
        """[1, n, hidden] token embeddings."""
        with self.torch.no_grad():
            return self.model.model.tok_embeddings(self.torch.tensor([list(ids)], dtype=self.torch.long))

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
        # only new tokens: the prompt was given as embeddings
        return [int(t) for t in out.sequences[0]], greedy_margins(out.scores)


def run_with_layer_outputs(model, **forward_kwargs) -> Tuple[List[np.ndarray], object]:
    """Call a PyTorch XComposer2 model (the reference or the remote code) without gradients, capturing the output
    of every decoder layer (`model.model.layers`) with forward hooks.

    Returns (float32 numpy arrays [B, S, hidden], one per layer in order; the model's output).
    """
    return call_with_layer_outputs(model.model.layers, lambda: model(**forward_kwargs))


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



# ---- the run ----------------------------------------------------------------------------------------------
def compare_models(ms_model, torch_side: TorchSide, tokenizer, images: Sequence[str] = (),
                   query: str = DEFAULT_QUERY, hd_num: Optional[int] = None,
                   steps: int = DEFAULT_STEPS) -> ParityReport:
    """Run both models on one chat prompt (official template, no history) and compare every stage.

    ms_model: an `XComposer2ForCausalLM`; torch_side: `load_torch_side(...)`; tokenizer: the checkpoint's
    `InternLM2Tokenizer`; images: image files (none = the text-only prompt); hd_num: HD tile budget (default:
    the variant's rule); steps: greedy steps compared.
    """
    from ms_xcomposer.models.xcomposer2.processor import XComposer2Processor
    from ms_xcomposer.models.xcomposer2.processing import preprocess
    from ms_xcomposer.models.xcomposer2.prompt import ImageSlot, build_chat_prompt, effective_hd_num

    images = check_images_and_steps(images, steps)
    cfg = ms_model.config
    key = tolerance_key(ms_model)
    hd = effective_hd_num(cfg.spec, len(images), hd_num)
    pieces = build_chat_prompt(query, (), cfg.spec, len(images) if images else None)
    stages: List[StageResult] = []
    all_pixels = [preprocess(path, cfg.spec, hd) for path in images]
    pt_stages, pt_embeds, pt_mask = torch_side.stages(images, all_pixels, hd, pieces, tokenizer)

    ms_images = []
    for i, path in enumerate(images):
        suffix = image_suffix(i, len(images))
        pixels = all_pixels[i]
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
            stages.append(compare(name + suffix, ms_stages[k], pt_stages[name + suffix], key,
                                  pixel_note if k == "pixels" else ""))
        ms_images.append(ms_stages["img_embeds"])

    # Each side builds its own prompt: if image token counts differ (e.g. another tile grid), its stages show it
    # as shape mismatches while the greedy tokens are still compared.
    ms_parts, ms_masks = [], []
    for piece in pieces:
        if isinstance(piece, ImageSlot):
            ms_parts.append(ms_images[piece.index].asnumpy().astype(np.float32))
        else:
            ids = tokenizer.encode(piece.text, add_bos=piece.add_bos)
            if not ids:
                continue
            ms_parts.append(ms_model.embed_tokens(np.asarray([ids], np.int32)).asnumpy().astype(np.float32))
        ms_masks.append(np.full(ms_parts[-1].shape[1], isinstance(piece, ImageSlot)))
    ms_embeds, ms_mask = np.concatenate(ms_parts, axis=1), np.concatenate(ms_masks)[None]
    eos = XComposer2Processor(tokenizer, cfg).eos_token_ids
    lm_stages, ms_tokens, pt_tokens = decoder_stages(
        ms_model, ms_embeds, pt_stages, key, steps, eos, lambda: torch_side.greedy(pt_embeds, pt_mask, steps, eos),
        im_mask=ms_mask)
    stages += lm_stages

    return ParityReport(
        stages=stages, torch_side=torch_side.description, tolerance_key=key,
        mode=mode_name(),
        inputs={"images": images, "query": query, "hd_num": hd if images else None, "steps": steps,
                "prompt_length": int(ms_mask.shape[1]), "image_tokens": int(ms_mask.sum())},
        tokens={"mindspore": list(ms_tokens), "pytorch": list(pt_tokens)},
        rerun=torch_side.rerun(images, all_pixels, hd, pieces, tokenizer),
    )


def image_suffix(index: int, count: int) -> str:
    """The stage-name suffix of image `index` of `count` (none for a single image)."""
    return f" (image {index + 1})" if count > 1 else ""


def compare_loaded(ms_model, processor, request: ParityRequest) -> ParityReport:
    """The family's parity hook: the PyTorch side of `request.hf_dir` (reference or trusted remote code) against
    the loaded `ms_model`, tokenized with the HF directory's own tokenizer. ParityError when the two are
    different variants."""
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    request.refuse_options("xcomposer2", compare_loaded.options)
    torch_side = load_torch_side(request.hf_dir, request.trust_remote_code, request.force_reference)
    torch_variant = getattr(getattr(torch_side.model, "xc", None), "variant", None)
    if torch_variant is not None and torch_variant != ms_model.config.variant:
        raise ParityError(f"the MindSpore model is {ms_model.config.variant} but {request.hf_dir} is {torch_variant}")
    tokenizer = InternLM2Tokenizer.from_pretrained(request.hf_dir)
    return compare_models(ms_model, torch_side, tokenizer, request.images, request.query,
                          request.options.get("hd_num"), request.steps)


compare_loaded.options = ("hd_num",)
