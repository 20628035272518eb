"""The LLaVA family's parity stages (the `Family.parity` hook; machinery in `ms_xcomposer.parity`).

The PyTorch side is transformers' own `LlavaForConditionalGeneration` (float32) and `LlavaProcessor` built from
the HF directory (`CLIPImageProcessor` of its preprocessor_config.json, CLIP's settings at the tower's size when
there is none as `models.llava.processing` does; `AutoTokenizer`; patch size, select strategy and one additional
image token from config.json, as llava-hf's processor_config.json says). Both sides get the same prompt text,
the llava-hf chat template of the query (`prompt.conversation_text`, images first in the user turn unless the
query places them with "<image>"), and the same image files. Stages, in order:

    pixels -> prompt ids -> vision layer L -> projector -> embeddings -> layer 0 .. layer N-1 -> logits
    -> greedy tokens

- `pixels`: our `LlavaImageProcessor` against transformers' `CLIPImageProcessor` (every image, [N, 3, S, S]);
- `prompt ids`: our tokenizer and image-token expansion against transformers' processor (identical);
- `vision layer L`: the tower's hidden state `vision_feature_layer` L after the select strategy (class token
  dropped under "default"), i.e. what enters the projector; `projector`: the image features;
- `embeddings`: the prompt's input embeddings with the image features spliced in (the PyTorch side's captured
  at its language model's input); `layer i`: decoder layer i's output (forward hooks); `logits`: every
  position; `greedy tokens`: N greedy steps (repetition penalty 1, stop at the EOS id) must be identical.

transformers' `LlavaProcessor` takes the image token's id from `tokenizer.encode("<image>")[0]`, which is the
prefix piece "▁" for slow legacy=false tokenizers whose `<image>` is not special; its own count check then
fails. The id is set from the tokenizer's vocabulary instead (what the expanded text's ids hold).

No options; no remote code (llava-hf checkpoints are transformers' own classes).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from mindspore import Tensor

from ms_xcomposer.parity import (ParityError, ParityReport, ParityRequest, StageResult, TorchRerun,
                                 call_with_layer_outputs, compare, compare_tokens, decoder_stages, forward_hooks,
                                 greedy_margins, mode_name, remote_code_files, tolerance_key, torch_numpy)


class LlavaTorchSide:
    """transformers' LlavaForConditionalGeneration and LlavaProcessor for one HF directory (see the module doc)."""

    description = "transformers LlavaForConditionalGeneration + LlavaProcessor"

    def __init__(self, hf_dir: str):
        import torch
        import transformers

        from ms_xcomposer.models.llava.processing import PREPROCESSOR_CONFIG
        from ms_xcomposer.models.llava.prompt import IMAGE_TOKEN

        self.torch = torch
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
            hf_dir, dtype=torch.float32).eval()
        config = self.model.config
        size = config.vision_config.image_size
        if os.path.isfile(os.path.join(hf_dir, PREPROCESSOR_CONFIG)):
            images = transformers.CLIPImageProcessor.from_pretrained(hf_dir)
        else:
            images = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size})
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        self.processor = transformers.LlavaProcessor(
            image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
        self.processor.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)  # see the module doc

    def inputs(self, text: str, images: Sequence[str]) -> Dict[str, object]:
        """transformers' processor output (torch tensors) for the prompt text and image files."""
        from PIL import Image

        pil = [Image.open(p) for p in images]
        return dict(self.processor(images=pil or None, text=text, return_tensors="pt"))

    def image_stages(self, pixel_values) -> Dict[str, object]:
        """{"selected": the vision layer's features after the select strategy, "features": projected}."""
        config, core = self.model.config, self.model.model
        with self.torch.no_grad():
            states = core.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            selected = states[config.vision_feature_layer]
            if config.vision_feature_select_strategy == "default":
                selected = selected[:, 1:]
            return {"selected": selected, "features": core.multi_modal_projector(selected)}

    def prefill(self, inputs: Dict[str, object]):
        """(the embeddings entering the language model [1, S, hidden], each decoder layer's output, logits)."""
        captured: List[object] = []

        def embeds_in(module, args, kwargs):
            captured.append(kwargs.get("inputs_embeds"))

        language_model = self.model.model.language_model
        with forward_hooks([(language_model, "pre", embeds_in)]):
            layers, out = call_with_layer_outputs(language_model.layers, lambda: self.model(**inputs))
        if captured[0] is None:
            raise ParityError("transformers' language model was not called with inputs_embeds: cannot capture them")
        return torch_numpy(captured[0]), layers, torch_numpy(out.logits)

    def stages(self, inputs: Dict[str, object], keep: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """Every numeric stage ({name: numpy}, only `keep`'s when given) of the processor's `inputs`, end to end
        in the model's current dtype."""
        out: Dict[str, object] = {}
        if "pixel_values" in inputs:
            out["pixels"] = inputs["pixel_values"]
            pt = self.image_stages(inputs["pixel_values"])
            out[f"vision layer {self.model.config.vision_feature_layer}"] = pt["selected"]
            out["projector"] = pt["features"]
        out["embeddings"], layers, out["logits"] = self.prefill(inputs)
        out.update((f"layer {i}", h) for i, h in enumerate(layers))
        wanted = out if keep is None else {k: out[k] for k in keep if k in out}
        return {k: v if isinstance(v, np.ndarray) else torch_numpy(v) for k, v in wanted.items()}

    def rerun(self, inputs: Dict[str, object]) -> TorchRerun:
        """The same stages in another dtype (the model converted in place; see `TorchRerun`)."""

        def run(dtype: str, keep: Sequence[str]):
            self.model.to(getattr(self.torch, dtype))
            return self.stages(inputs, keep)

        return TorchRerun(sum(p.numel() for p in self.model.parameters()), run)

    def greedy(self, inputs: Dict[str, object], steps: int, eos: Sequence[int]):
        """Greedy new tokens (repetition penalty 1, stopping on `eos`) and each step's top-1 - top-2 margin."""
        with self.torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                      max_new_tokens=steps, eos_token_id=list(eos), pad_token_id=eos[0],
                                      output_scores=True, return_dict_in_generate=True)
        prompt = int(inputs["input_ids"].shape[1])
        return [int(t) for t in out.sequences[0, prompt:]], greedy_margins(out.scores)


def compare_loaded(ms_model, processor, request: ParityRequest) -> ParityReport:
    """The family's parity hook: transformers' model and processor of `request.hf_dir` against the loaded
    `ms_model` and its `processor`, stage by stage (see the module doc)."""
    from ms_xcomposer.models.llava.prompt import IMAGE_TOKEN, conversation_text

    request.refuse_options("llava")
    if request.trust_remote_code and remote_code_files(request.hf_dir):
        raise ParityError(f"{request.hf_dir}: LLaVA parity runs transformers' own LlavaForConditionalGeneration; "
                          "remote code is not used (drop --trust-remote-code)")
    torch_side = LlavaTorchSide(request.hf_dir)
    key = tolerance_key(ms_model)
    images = list(request.images)
    text = conversation_text(request.query, (), 0 if IMAGE_TOKEN in request.query else len(images))
    ours = processor(images=images or None, text=text)
    theirs = torch_side.inputs(text, images)
    ids = ours["input_ids"]
    pt = torch_side.stages(theirs)
    stages: List[StageResult] = []
    if images:
        stages.append(compare("pixels", ours["pixel_values"], pt["pixels"], key))
    stages.append(compare_tokens(ids[0].tolist(), theirs["input_ids"][0].tolist(), stage="prompt ids"))
    if images:
        pixels = ours["pixel_values"]
        selected, _ = ms_model.vision_tower(Tensor(pixels).astype(ms_model.compute_dtype))
        name = f"vision layer {ms_model.config.vision_feature_layer}"
        stages.append(compare(name, selected, pt[name], key))
        stages.append(compare("projector", ms_model.get_image_features(pixels), pt["projector"], key))
    embeds = ms_model.get_inputs_embeds(ids.astype(np.int32), ours.get("pixel_values"))
    eos = list(processor.eos_token_ids)
    lm_stages, ms_tokens, pt_tokens = decoder_stages(ms_model, embeds, pt, key, request.steps, eos,
                                                     lambda: torch_side.greedy(theirs, request.steps, eos))
    stages += lm_stages
    return ParityReport(
        stages=stages, torch_side=torch_side.description, tolerance_key=key, mode=mode_name(),
        inputs={"images": images, "query": request.query, "steps": request.steps, "prompt_length": int(ids.shape[1]),
                "image_tokens": int((ids == ms_model.config.image_token_index).sum())},
        tokens={"mindspore": list(ms_tokens), "pytorch": list(pt_tokens)},
        rerun=torch_side.rerun(theirs),
    )


compare_loaded.options = ()
