"""LlavaProcessor: transformers' `LlavaProcessor` (images + text -> input_ids / pixel_values / attention_mask) and
this project's processor protocol (a chat turn -> the model's prefill; generated ids -> the response).

- `processor(images=..., text=...)`: each "<image>" of the text expanded to the image's feature count, tokenized
  by the checkpoint's LLaMA tokenizer (BOS first), the images preprocessed as `CLIPImageProcessor` does; numpy
  arrays (`return_tensors="np"`, the default; "ms" for MindSpore tensors, "pt" for torch). Several texts of
  different lengths need `padding=True`: padded with the tokenizer's pad token on the tokenizer's side
  (tokenizer_config.json's `padding_side`, llava-hf: left) or `padding_side`'s, as transformers does.
- `prepare(model, query, images, history, **options)`: the llava-hf chat template ("USER: <image>\\n{query}
  ASSISTANT:", earlier turns before it, `prompt.conversation_text`), its ids, and the embeddings with the image
  features spliced in (`model.get_inputs_embeds`). Images: a lone image, or several, with no "<image>" in the
  query or history go first in the first user turn (as the template puts them); otherwise each "<image>" of the
  history and query marks one image, in order. The repetition penalty counts the prompt ids, as transformers'
  `generate(input_ids=...)` does.
- `eos_token_ids` (`</s>`), `decode(ids)` (without special tokens), `stop_text` None (the stop is the EOS id).

Options (keyword arguments of `ms_xcomposer.chat`): `system` (a system text before the first turn; default
none, as llava-hf), `max_pixels` (largest accepted source image). Unknown options raise `OptionError`.

The image-token count is the model's (`LlavaConfig.image_tokens`: 576 for llava-1.5, 577 under "full"), which is
LlavaProcessor's formula for llava-hf's processor_config.json; the crop size must be the tower's image size.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ms_xcomposer.config import ConfigError
from ms_xcomposer.conversation import PreparedInputs, chat_options
from ms_xcomposer.images import MAX_IMAGE_PIXELS, ImageInput
from ms_xcomposer.models.llava.config import LlavaConfig
from ms_xcomposer.models.llava.processing import PREPROCESSOR_CONFIG, LlavaImageProcessor
from ms_xcomposer.models.llava.prompt import (IMAGE_TOKEN, PromptError, conversation_text, expand_image_tokens,
                                              prompt_ids, render_messages)
from ms_xcomposer.models.llava.tokenizer import LlamaTokenizer

RETURN_TENSORS = ("np", "ms", "pt")


@dataclass(frozen=True)
class ChatOptions:
    """This family's chat options (see the module docstring); unknown names are refused by `from_kwargs`."""

    system: str = ""
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_kwargs(cls, **options) -> "ChatOptions":
        return chat_options(cls, "LLaVA", options)


class LlavaProcessor:
    """The tokenizer, image processor and prompt rules of one llava-hf checkpoint (see the module doc)."""

    image_placeholder = IMAGE_TOKEN
    auto_image_placeholder = True  # images without "<image>" go first in the first user turn
    stop_text = None  # generation stops at the EOS id; decoded text never holds "</s>"

    def __init__(self, tokenizer: LlamaTokenizer, config: LlavaConfig,
                 image_processor: Optional[LlavaImageProcessor] = None):
        self.tokenizer, self.config = tokenizer, config
        size = config.vision.image_size
        self.image_processor = image_processor or LlavaImageProcessor(size, (size, size))
        if self.image_processor.crop_size != (size, size):
            raise ConfigError(f"the image processor crops {self.image_processor.crop_size[0]}x"
                              f"{self.image_processor.crop_size[1]} but the vision tower takes {size}x{size}")
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id != config.image_token_index:
            raise ConfigError(f"the tokenizer's {IMAGE_TOKEN} is id {image_id}, the config's image_token_index is "
                              f"{config.image_token_index}")
        self.image_tokens = config.image_tokens
        self.eos_token_ids: Tuple[int, ...] = (tokenizer.eos_token_id,)

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[LlavaConfig] = None) -> "LlavaProcessor":
        """The processor of the checkpoint directory `path`: tokenizer files, preprocessor_config.json (default:
        CLIP's settings at the tower's size), its config unless given."""
        if config is None:
            from ms_xcomposer.conversion.readers import open_checkpoint

            with open_checkpoint(path) as reader:
                config = reader.config
        images = (LlavaImageProcessor.from_pretrained(path)
                  if os.path.isfile(os.path.join(path, PREPROCESSOR_CONFIG)) else None)
        tokenizer = LlamaTokenizer.from_pretrained(path)
        return cls(tokenizer, config, images)

    # ---- transformers' LlavaProcessor ------------------------------------------------------------------
    def __call__(self, images: Union[None, ImageInput, Sequence[ImageInput]] = None,
                 text: Union[None, str, Sequence[str]] = None, return_tensors: Optional[str] = None,
                 padding: Union[bool, str] = False, padding_side: Optional[str] = None) -> Dict[str, object]:
        """{"input_ids" int64 [B, S], "attention_mask" int64 [B, S], "pixel_values" float32 [N, 3, H, W] (with
        images)}: each text's "<image>" expanded, the images in order across the texts. Texts of different
        lengths need `padding=True`; `padding_side` ("left"/"right") overrides the tokenizer's."""
        if text is None:
            raise PromptError("LlavaProcessor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PromptError("text must be a str or a non-empty list of str")
        image_list = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        marks = sum(t.count(IMAGE_TOKEN) for t in texts)
        if marks != len(image_list):
            raise PromptError(f"the text has {marks} {IMAGE_TOKEN} token(s) but {len(image_list)} image(s) were "
                              "given; they must match")
        rows = [self.tokenizer.encode(expand_image_tokens(t, t.count(IMAGE_TOKEN), self.image_tokens))
                for t in texts]
        width = max(len(r) for r in rows)
        if any(len(r) != width for r in rows) and padding in (False, "do_not_pad"):
            raise PromptError("texts of different lengths need padding=True")
        side = self.tokenizer.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise PromptError(f"padding_side {side!r}: expected 'left' or 'right'")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols], mask[i, cols] = r, 1
        out: Dict[str, object] = {"input_ids": ids, "attention_mask": mask}
        if image_list:
            out["pixel_values"] = self.image_processor(image_list)
        return {k: _tensor(v, return_tensors) for k, v in out.items()}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The llava-hf chat template on transformers-style messages (`prompt.render_messages`)."""
        return render_messages(messages, add_generation_prompt)

    def batch_decode(self, ids, skip_special_tokens: bool = False) -> List[str]:
        return [self.tokenizer.decode(list(map(int, row)), skip_special_tokens=skip_special_tokens) for row in ids]

    # ---- the project's processor protocol ----------------------------------------------------------------
    def system_options(self, text: str) -> Dict[str, object]:
        """The chat options that make `text` the system message (`system`): the server's system role."""
        return {"system": text}

    def prepare(self, model, query: str, images: Optional[Sequence[object]] = None,
                history: Sequence[Tuple[str, str]] = (), **options) -> PreparedInputs:
        """The prefill of one chat turn (see the module doc; `options` are `ChatOptions` fields)."""
        opts = ChatOptions.from_kwargs(**options)
        images = list(images or [])
        placed = (query.count(IMAGE_TOKEN) if isinstance(query, str) else 0) + sum(
            q.count(IMAGE_TOKEN) for q, _ in history if isinstance(q, str))
        text = conversation_text(query, history, 0 if placed else len(images), opts.system)
        ids = prompt_ids(self.tokenizer, text, len(images), self.image_tokens)
        pixels = None
        if images:
            image_processor = copy.copy(self.image_processor)  # this turn's max_pixels only
            image_processor.max_pixels = opts.max_pixels
            pixels = image_processor(images)
        embeds = model.get_inputs_embeds(np.asarray([ids], np.int32), pixels)
        return PreparedInputs(embeds, {}, list(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """The response text: the ids decoded without special tokens."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _tensor(x: np.ndarray, return_tensors: Optional[str]):
    if return_tensors in (None, "np"):
        return x
    if return_tensors == "ms":
        from mindspore import Tensor

        return Tensor(x)
    if return_tensors == "pt":
        import torch

        return torch.from_numpy(x)
    raise ValueError(f"return_tensors {return_tensors!r}: expected one of {list(RETURN_TENSORS)}")
