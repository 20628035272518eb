"""InternVLProcessor: a query, history and images -> the model's prefill; generated ids -> the response text.

The family's half of a chat turn (the generic half, decoding and streaming, is `ms_xcomposer.conversation`):
- `load_image(image, max_num=6)`: the model card's `load_image` -> pixel_values [T, 3, 448, 448];
- `prepare(model, query, images, history, **options)`: the internlm2-chat prompt (`prompt.chat_prompt`) with an
  image block `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>` per image, tokenized (BOS once), embedded,
  and the `<IMG_CONTEXT>` rows replaced by the images' features in order (`InternVLChatModel.splice`);
- `eos_token_ids`, `decode(ids)`, `stop_text`: stop at `<|im_end|>` (and `</s>`); the response is the text
  before the first `<|im_end|>`, stripped, as the official chat returns it.

Where images go (`<image>` is the placeholder): with no `<image>` in the query or history, one image goes
first in the first user turn, as the official `chat` puts it (`<img>...</img>\\n` + question), and several
images go there as the official `multi_image_chat` numbers them (`<image k> (图k):<img>...</img>`, back to
back, then a newline). Otherwise every `<image>` of the history's queries and the query, in order, becomes
the block of the next image (the training data's format: `<image>\\n` + question is the official chat
prompt); their count must equal the number of images (PromptError otherwise). Each turn re-sends every image
of the conversation, as `images` (the official multi-turn chat passes pixel_values again with the history).

Options (keyword arguments of `ms_xcomposer.chat`): `max_num` (most tiles per image, default 6 as the model
card; the thumbnail comes on top), `system_message` (default: the template's), `max_pixels` (largest
accepted source image).

Images: file paths, PIL images, uint8 arrays (HxWx3), or pixel_values already made (float [T, 3, S, S],
numpy or Tensor: used as given).

Differences from the official code, on purpose: text-only chat works (v1.5.1's `chat` crashes without
pixel_values; here the question goes into the template with no image block, as the template renders it);
the library chat also stops at `</s>` (the official chat only at `<|im_end|>`; `model.chat` keeps that);
images with transparency are composited on white (the official `convert("RGB")` keeps the hidden colour).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from ms_xcomposer.conversation import PreparedInputs, chat_options
from ms_xcomposer.images import MAX_IMAGE_PIXELS
from ms_xcomposer.models.internvl import processing
from ms_xcomposer.models.internvl.config import InternVLConfig
from ms_xcomposer.models.internvl.prompt import (
    IMG_CONTEXT_TOKEN, PromptError, chat_prompt, get_template, image_block, multi_image_block,
)
from ms_xcomposer.prompt_checks import check_history, check_text
from ms_xcomposer.tokenizer import InternLM2Tokenizer

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_NUM = processing.DEFAULT_MAX_NUM


@dataclass(frozen=True)
class ChatOptions:
    """This family's chat options (see the module docstring); unknown names are refused by `from_kwargs`."""

    max_num: int = DEFAULT_MAX_NUM
    system_message: Optional[str] = None
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_kwargs(cls, **options) -> "ChatOptions":
        opts = chat_options(cls, "InternVL", options)
        if not isinstance(opts.max_num, int) or opts.max_num < 1:
            raise ValueError(f"max_num must be a positive integer, got {opts.max_num!r}")
        if opts.system_message is not None:
            check_text(opts.system_message, "system_message")
        return opts


@dataclass
class InternVLInputs(PreparedInputs):
    """`PreparedInputs` plus what was built on the way: the prompt text, its token ids and the tiles per image."""

    prompt: str = ""
    input_ids: List[int] = field(default_factory=list)
    image_tiles: List[int] = field(default_factory=list)


class InternVLProcessor:
    """The tokenizer, image transform and prompt rules of one InternVL-1.5 checkpoint (see the module doc)."""

    image_placeholder = IMAGE_PLACEHOLDER
    auto_image_placeholder = True  # a lone image with no <image> goes first, as the official chat puts it

    def __init__(self, tokenizer: InternLM2Tokenizer, config: InternVLConfig):
        self.tokenizer, self.config = tokenizer, config
        self.template = get_template(config.template)
        self.stop_text = self.template.sep
        self.turn_end_id = self._token_id(self.template.sep)
        self.img_context_token_id = self._token_id(IMG_CONTEXT_TOKEN)
        self.eos_token_ids: Tuple[int, ...] = (self.turn_end_id, tokenizer.eos_token_id)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id == self.tokenizer.unk_token_id:
            raise PromptError(f"the tokenizer has no {token} token: is it an InternVL-1.5 (InternLM2) tokenizer?")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[InternVLConfig] = None) -> "InternVLProcessor":
        """The processor of the checkpoint directory `path` (its tokenizer files; its config unless given)."""
        if config is None:
            from ms_xcomposer.conversion.readers import open_checkpoint

            with open_checkpoint(path) as reader:
                config = reader.config
        return cls(InternLM2Tokenizer.from_pretrained(path), config)

    # ---- images -------------------------------------------------------------------------------------------
    def load_image(self, image, max_num: int = DEFAULT_MAX_NUM, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """The model card's `load_image(image, input_size=448, max_num=6)`: pixel_values float32 [T, 3, 448, 448]
        (dynamic tiles plus the thumbnail; see `processing.load_image`). image: a path, PIL image or uint8 array."""
        return processing.load_image(image, input_size=self.config.image_size, max_num=max_num,
                                     max_pixels=max_pixels)

    def pixel_values(self, image, max_num: int = DEFAULT_MAX_NUM, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """`load_image`, or float pixel_values [T, 3, S, S] (numpy or Tensor) as given."""
        if isinstance(image, Tensor):
            image = image.asnumpy()
        if isinstance(image, np.ndarray) and image.dtype.kind == "f":
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"pixel_values must be [tiles, 3, H, W], got {list(image.shape)}")
            return image.astype(np.float32, copy=False)
        return self.load_image(image, max_num, max_pixels)

    # ---- prompts ------------------------------------------------------------------------------------------
    def build_prompt(self, query: str, image_tiles: Sequence[int], history: Sequence[Tuple[str, str]] = (),
                     system_message: Optional[str] = None) -> str:
        """The prompt text of a turn whose images have `image_tiles` tiles each (see the module doc)."""
        check_text(query, "query")
        turns = check_history(history)
        texts = [q for q, _ in turns] + [query]
        for i, text in enumerate(texts):
            if IMG_CONTEXT_TOKEN in text:
                where = "query" if i == len(turns) else f"history[{i}][0]"
                raise PromptError(f"{where} holds {IMG_CONTEXT_TOKEN}: write {IMAGE_PLACEHOLDER} where an image "
                                  "goes, the processor builds the image blocks")
        n = self.config.num_image_token
        placed = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        if placed == 0 and image_tiles:
            block = (image_block(image_tiles[0], n) if len(image_tiles) == 1 else multi_image_block(image_tiles, n))
            texts[0] = block + "\n" + texts[0]
        elif placed != len(image_tiles):
            raise PromptError(f"the query and history hold {placed} {IMAGE_PLACEHOLDER} placeholders but "
                              f"{len(image_tiles)} images were given")
        else:
            blocks = iter(image_block(t, n) for t in image_tiles)
            texts = ["".join(part if k == 0 else next(blocks) + part
                             for k, part in enumerate(t.split(IMAGE_PLACEHOLDER))) for t in texts]
        turns = [(q, a) for q, (_, a) in zip(texts, turns)]
        return chat_prompt(texts[-1], None, history=turns, template=self.config.template,
                           system_message=system_message)

    def system_options(self, text: str) -> Dict[str, object]:
        """The chat options that make `text` the system message (`system_message`): the server's system role."""
        return {"system_message": text}

    def prepare(self, model, query: str, images: Optional[Sequence[object]] = None,
                history: Sequence[Tuple[str, str]] = (), **options) -> InternVLInputs:
        """Embeddings of one chat turn (see the module doc; `options` are `ChatOptions` fields)."""
        opts = ChatOptions.from_kwargs(**options)
        pixels = [self.pixel_values(image, opts.max_num, opts.max_pixels) for image in images or ()]
        tiles = [int(p.shape[0]) for p in pixels]
        prompt = self.build_prompt(query, tiles, history, opts.system_message)
        ids = self.tokenizer.encode(prompt, add_bos=True)
        model.img_context_token_id = self.img_context_token_id  # as the official chat sets it
        vit = model.extract_feature(np.concatenate(pixels)) if pixels else None
        embeds = model.splice([ids], vit)
        # The official chat hands generate inputs_embeds: the repetition penalty sees the new ids only.
        return InternVLInputs(embeds, {}, [], prompt, ids, tiles)

    # ---- responses ----------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """The official response text: decode without special tokens, keep what precedes `<|im_end|>`, strip."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).split(self.stop_text)[0].strip()
