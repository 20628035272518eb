"""The InternVL-1.5 family's parity stages (the `Family.parity` hook; machinery in `ms_xcomposer.parity`).

The PyTorch side is the project's reference (`ms_xcomposer.reference.ReferenceInternVL`, float32), loaded from the
HF directory; it preprocesses the images itself (the model card's `load_image`), so `pixels` is an independent
check. Both sides build the chat prompt of the query with the images first in the user turn (one image: the
official `chat` block; several: `multi_image_chat`'s numbered blocks), each from its own tile counts, tokenized by
the HF directory's tokenizer. Stages, in order:

    pixels -> vision embeddings -> vision layer 1 .. k -> pixel shuffle -> mlp1
    -> embeddings -> layer 0 .. layer N-1 -> logits -> greedy tokens

- `pixels`: all tiles of all images [T, 3, 448, 448] (the processor's `load_image` against the reference's);
- `vision embeddings`: class token + patches + positions; `vision layer i`: the output of InternViT layer i, up to
  the layer `select_layer` reads (k = num_layers + 1 + select_layer for a negative select_layer); the hidden state
  selected is the last of these;
- `pixel shuffle`: CLS dropped, pixel-shuffled (ps_version) tokens, mlp1's input [T, 256, 4C]; `mlp1`:
  vit_embeds [T, 256, hidden] from the model's compiled `extract_feature`;
- `embeddings`: the prompt's token embeddings with the `<IMG_CONTEXT>` rows replaced by vit_embeds; `layer i`:
  decoder layer i's output; `logits`: every position; `greedy tokens`: N greedy steps (repetition penalty 1,
  stop at `<|im_end|>` or `</s>`) must be identical.

Every stage is each side's own output (end to end). Option: `max_num` (most tiles per image, default 6).
The official remote code is not used (it needs torchvision, timm and flash-attn paths): a directory carrying it
is compared with `--reference`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from mindspore import Tensor

from ms_xcomposer.parity import (ParityError, ParityReport, ParityRequest, StageResult, TorchRerun,
                                 call_with_layer_outputs, compare, compare_tokens, decoder_stages, greedy_margins,
                                 mode_name, remote_code_files, tolerance_key, torch_numpy)


def image_stage_names(num_layers_run: int) -> List[str]:
    """The image-side stage names for a tower that runs `num_layers_run` layers."""
    return (["pixels", "vision embeddings"] + [f"vision layer {i}" for i in range(1, num_layers_run + 1)]
            + ["pixel shuffle", "mlp1"])


class InternVLTorchSide:
    """`ReferenceInternVL` of one HF directory, with its own image loading (see the module doc)."""

    description = "reference (ReferenceInternVL)"

    def __init__(self, hf_dir: str):
        import torch

        from ms_xcomposer.reference import ReferenceInternVL

        self.torch = torch
        self.model = ReferenceInternVL.from_pretrained(hf_dir)

    def pixels(self, images: Sequence[str], max_num: int):
        """(all tiles [T, 3, S, S] torch, tiles per image)."""
        from ms_xcomposer.reference.internvl import load_image

        size = self.model.config.image_size
        per_image = [load_image(path, max_num, size) for path in images]
        return self.torch.cat(per_image), [int(p.shape[0]) for p in per_image]

    def stages(self, images: Sequence[str], max_num: int, ids: Sequence[int], img_context_token_id: int,
               keep: Optional[Sequence[str]] = None):
        """Every numeric stage ({name: numpy}, only `keep`'s when given) of the prompt `ids` with `images`, end to
        end in the model's current dtype, and the prompt's embeddings (torch)."""
        out: Dict[str, object] = {}
        vit = None
        if images:
            pixels, _ = self.pixels(images, max_num)
            pt = self.model.image_stages(pixels)
            names = image_stage_names(len(pt["hidden_states"]) - 1)
            out["pixels"] = pixels
            out.update(zip(names[1:-2], pt["hidden_states"]))
            out.update({"pixel shuffle": pt["shuffled"], "mlp1": pt["vit_embeds"]})
            vit = pt["vit_embeds"]
        embeds = self.model.splice(ids, vit, img_context_token_id)
        out["embeddings"] = embeds
        lm = self.model.language_model
        layers, logits = call_with_layer_outputs(lm.model.layers, lambda: lm(inputs_embeds=embeds))
        out.update((f"layer {i}", h) for i, h in enumerate(layers))
        out["logits"] = logits.logits
        wanted = out if keep is None else {k: out[k] for k in keep if k in out}
        return {k: v if isinstance(v, np.ndarray) else torch_numpy(v) for k, v in wanted.items()}, embeds

    def rerun(self, images: Sequence[str], max_num: int, ids: Sequence[int], img_context_token_id: int) -> TorchRerun:
        """The same stages in another dtype (the model converted in place; see `TorchRerun`)."""

        def run(dtype: str, keep: Sequence[str]):
            self.model.to(getattr(self.torch, dtype))
            return self.stages(images, max_num, ids, img_context_token_id, keep)[0]

        return TorchRerun(sum(p.numel() for p in self.model.parameters()), run)

    def greedy(self, embeds, steps: int, eos: Sequence[int]):
        """Greedy new tokens and each step's top-1 - top-2 margin."""
        with self.torch.no_grad():
            out = self.model.language_model.generate(
                inputs_embeds=embeds, attention_mask=self.torch.ones(embeds.shape[:2], dtype=self.torch.long),
                do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=steps,
                eos_token_id=list(eos), pad_token_id=eos[0], output_scores=True, return_dict_in_generate=True)
        return [int(t) for t in out.sequences[0]], greedy_margins(out.scores)


def compare_loaded(ms_model, processor, request: ParityRequest) -> ParityReport:
    """The family's parity hook: the reference of `request.hf_dir` against the loaded `ms_model` and its
    `processor`, stage by stage (see the module doc). The report carries the reference's rerun in another dtype
    (`ms_xcomposer.parity.rejudge_against_float64`)."""
    from ms_xcomposer.models.internvl.processor import DEFAULT_MAX_NUM, InternVLProcessor
    from ms_xcomposer.models.internvl.projector import vit_tokens
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    request.refuse_options("internvl", compare_loaded.options)
    if request.trust_remote_code and remote_code_files(request.hf_dir):
        raise ParityError(f"{request.hf_dir}: InternVL parity runs the project's PyTorch reference; the remote code "
                          "is not used (pass --reference instead of --trust-remote-code)")
    max_num = request.options.get("max_num") or DEFAULT_MAX_NUM
    if not isinstance(max_num, int) or max_num < 1:
        raise ParityError(f"max_num must be a positive integer, got {max_num!r}")
    torch_side = InternVLTorchSide(request.hf_dir)
    ref = torch_side.model
    key = tolerance_key(ms_model)
    images = list(request.images)
    stages: List[StageResult] = []

    # the PyTorch side's prompt, from its own tile counts
    pt_tiles = [int(torch_side.pixels([p], max_num)[1][0]) for p in images]
    tokenizer = InternLM2Tokenizer.from_pretrained(request.hf_dir)
    pt_processor = InternVLProcessor(tokenizer, ref.config)
    pt_ids = tokenizer.encode(pt_processor.build_prompt(request.query, pt_tiles), add_bos=True)
    context_id = pt_processor.img_context_token_id
    pt, pt_embeds = torch_side.stages(images, max_num, pt_ids, context_id)

    ours = processor.prepare(ms_model, request.query, images, max_num=max_num)
    if images:
        pixels = np.concatenate([processor.load_image(p, max_num) for p in images])
        stages.append(compare("pixels", pixels, pt["pixels"], key))
        x = Tensor(pixels).astype(ms_model.compute_dtype)
        selected, states = ms_model.vision_model.encode(x, output_hidden_states=True)
        names = image_stage_names(len(states) - 1)
        for name, ms_h in zip(names[1:-2], states):
            stages.append(compare(name, ms_h, pt[name], key))
        cfg = ms_model.config
        stages.append(compare("pixel shuffle", vit_tokens(selected, cfg.downsample_ratio, cfg.ps_version),
                              pt["pixel shuffle"], key))
        stages.append(compare("mlp1", ms_model.extract_feature(pixels), pt["mlp1"], key))

    stages.append(compare_tokens(ours.input_ids, pt_ids, stage="prompt ids"))
    eos = list(processor.eos_token_ids)
    lm_stages, ms_tokens, pt_tokens = decoder_stages(ms_model, ours.inputs_embeds, pt, key, request.steps, eos,
                                                     lambda: torch_side.greedy(pt_embeds, request.steps, eos))
    stages += lm_stages
    ids = np.asarray(ours.input_ids)
    return ParityReport(
        stages=stages, torch_side=torch_side.description, tolerance_key=key, mode=mode_name(),
        inputs={"images": images, "query": request.query, "steps": request.steps, "max_num": max_num,
                "tiles": list(ours.image_tiles), "prompt_length": int(ids.size),
                "image_tokens": int((ids == processor.img_context_token_id).sum())},
        tokens={"mindspore": list(ms_tokens), "pytorch": list(pt_tokens)},
        rerun=torch_side.rerun(images, max_num, pt_ids, context_id),
    )


compare_loaded.options = ("max_num",)


__all__ = ["compare_loaded", "image_stage_names", "InternVLTorchSide"]
