"""XComposer2Processor: a query, history and images -> the model's prefill; generated ids -> the response text.

The family's half of a chat turn (the generic half, decoding and streaming, is `ms_xcomposer.conversation`):
- `preprocess(image, hd_num)`: a path, PIL image, uint8 array, normalised pixels or `Video` -> pixels
  [1, 3, H, W] for `model.encode_img` (`processing.preprocess` / `preprocess_video` per variant);
- `prepare(model, query, images, history, **options)`: the prompt pieces (`prompt.build_chat_prompt`),
  tokenized (BOS per the variant's rule) and embedded, images encoded, all concatenated in prompt order, as
  the official `interleav_wrap_chat` / `build_inputs` make them; the model's extras are `im_mask` and
  `infer_mode`;
- `eos_token_ids`, `decode(ids)`, `stop_text`: the official chat's stop ids [eos, '[UNUSED_TOKEN_145]'] and
  response text (`decode(ids, skip_special_tokens=True)` cut at the first '[UNUSED_TOKEN_145]').

Options (keyword arguments of `ms_xcomposer.chat`): `hd_num` (HD tile budget per image; default the
variant's: 24 for IXC-2.5, 25 for IXC2-4KHD, IXC-2.5 uses 6 with several images; IXC2-VL ignores it),
`use_meta` / `meta_instruction` (IXC-2.5 sends the system turn only with use_meta; VL / 4KHD always),
`infer_mode` (IXC-2.5's "base", "web", "write"), `max_length` (prompt rows kept; default the variant's
official limit, longer prompts are cut with a warning), `max_pixels` (largest accepted source image).

Images: `images` None is the official text-only path (`build_inputs`, ids start [1, 1]); a list (also empty:
IXC-2.5's official default) is the interleaved path. Each image is a file path, a PIL image, a uint8 array
(HxWx3), normalised float pixels [1,3,H,W], or for IXC-2.5 a video: a video file path (.mp4 ..., needs PyAV)
or a `Video` (a file, an animated GIF/WebP, or a list of frames), which becomes one canvas image of labelled
frames as the official `load_video` + `frame2img` + `Video_transform` build it.

Differences from the official code, on purpose: placeholder / image count mismatches raise `PromptError` (the
official 2.5 code prints a warning and drops images or text); IXC2-VL / IXC2-4KHD accept several images (one
`<ImageHere>` each). The repetition penalty counts what transformers' `generate` sees as `input_ids` in the
official code: the prompt ids plus the generated ids in the text-only path, the generated ids only when the
prompt is given as embeddings (the image path).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor, ops

from ms_xcomposer.conversation import PreparedInputs, chat_options
from ms_xcomposer.images import MAX_IMAGE_PIXELS
from ms_xcomposer.models.xcomposer2.config import DEFAULT_META_INSTRUCTION, INFER_MODES, XComposerConfig
from ms_xcomposer.models.xcomposer2.processing import MAX_VIDEO_FRAMES, preprocess, preprocess_video
from ms_xcomposer.models.xcomposer2.prompt import (
    DEFAULT_MAX_LENGTH, IMAGE_PLACEHOLDER, TURN_END, Piece, PromptError, TextPiece, build_chat_prompt, check_max_length,
    effective_hd_num, kept_length,
)
from ms_xcomposer.tokenizer import InternLM2Tokenizer


@dataclass(frozen=True)
class Video:
    """A video for IXC-2.5: `source` is a video file (needs PyAV), an animated image file (GIF, WebP) or a
    list of frames (PIL images or uint8 arrays, already sampled). Frames are sampled at 1 fps, at most
    `max_frames`; labels use `font_path` (e.g. the official SimHei.ttf) or PIL's built-in font."""

    source: Union[str, "os.PathLike[str]", Sequence[object]]
    max_frames: int = MAX_VIDEO_FRAMES
    font_path: Optional[str] = None


@dataclass(frozen=True)
class ChatOptions:
    """This family's chat options (see the module docstring); unknown names are refused by `from_kwargs`."""

    hd_num: Optional[int] = None
    use_meta: bool = False
    meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION
    infer_mode: str = "base"
    max_length: Optional[int] = None
    max_pixels: int = MAX_IMAGE_PIXELS

    @classmethod
    def from_kwargs(cls, **options) -> "ChatOptions":
        opts = chat_options(cls, "XComposer2", options)
        if opts.infer_mode not in INFER_MODES:
            raise ValueError(f"infer_mode {opts.infer_mode!r} unknown; expected one of {sorted(INFER_MODES)}")
        return opts


@dataclass
class XComposer2Inputs(PreparedInputs):
    """`PreparedInputs` plus what the official builders make on the way: the prompt pieces, the token ids of
    each text piece (None for images; a prompt over max_length stops early, as the official builder does), and
    whether this is the text-only path (`build_inputs`, whose prompt reaches `generate` as input ids)."""

    pieces: List[Piece] = field(default_factory=list)
    piece_ids: List[Optional[List[int]]] = field(default_factory=list)
    text_only: bool = False

    @property
    def im_mask(self) -> np.ndarray:
        """bool [1, S], True on image rows."""
        return self.extras["im_mask"]


class XComposer2Processor:
    """The tokenizer, image transforms and prompt rules of one XComposer2 checkpoint (see the module doc)."""

    def __init__(self, tokenizer: InternLM2Tokenizer, config: XComposerConfig):
        self.tokenizer, self.config = tokenizer, config
        self.spec = config.spec
        eoa = tokenizer.convert_tokens_to_ids(TURN_END)
        if eoa == tokenizer.unk_token_id:
            raise PromptError(f"the tokenizer has no {TURN_END} token: is it an InternLM2 / XComposer2 tokenizer?")
        self.eos_token_ids: Tuple[int, ...] = (tokenizer.eos_token_id, eoa)
        self.stop_text = TURN_END
        self.image_placeholder = IMAGE_PLACEHOLDER
        self.auto_image_placeholder = self.spec.auto_image_placeholder  # a lone image goes first (IXC-2.5)

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[XComposerConfig] = None) -> "XComposer2Processor":
        """The processor of the checkpoint directory `path` (its tokenizer files; its config unless given)."""
        if config is None:
            from ms_xcomposer.conversion.readers import open_checkpoint

            with open_checkpoint(path) as reader:
                config = reader.config
        return cls(InternLM2Tokenizer.from_pretrained(path), config)

    # ---- images -------------------------------------------------------------------------------------------
    def preprocess(self, image, hd_num: Optional[int] = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """One image or `Video` -> normalised pixels float32 [1, 3, H, W] for `model.encode_img`."""
        if isinstance(image, Video):
            return preprocess_video(image.source, self.spec, max_frames=image.max_frames, font_path=image.font_path,
                                    max_pixels=max_pixels)
        return preprocess(image, self.spec, hd_num, max_pixels=max_pixels)

    # ---- prompts ------------------------------------------------------------------------------------------
    def system_options(self, text: str) -> Dict[str, object]:
        """The chat options that make `text` the system message (`meta_instruction`, sent: `use_meta`): the
        server's system role."""
        return {"use_meta": True, "meta_instruction": text}

    def prepare(self, model, query: str, images: Optional[Sequence[object]] = None,
                history: Sequence[Tuple[str, str]] = (), **options) -> XComposer2Inputs:
        """Embeddings and extras of one chat turn (see the module doc; `options` are `ChatOptions` fields).

        The result is cut to `max_length` rows (default: the variant's official limit) with a warning; the
        text-only path (images None) is not cut, as in the official code.
        """
        opts = ChatOptions.from_kwargs(**options)
        images = None if images is None else list(images)
        n_images = None if images is None else len(images)
        pieces = build_chat_prompt(query, history, self.spec, n_images, opts.use_meta, opts.meta_instruction)
        hd = effective_hd_num(self.spec, n_images or 0, opts.hd_num)
        limit = check_max_length(DEFAULT_MAX_LENGTH[self.spec.name] if opts.max_length is None else opts.max_length)
        embeds: List[Tensor] = []
        masks: List[np.ndarray] = []
        piece_ids: List[Optional[List[int]]] = []
        total = 0
        for piece in pieces:
            if isinstance(piece, TextPiece):
                ids = self.tokenizer.encode(piece.text, add_bos=piece.add_bos)
                piece_ids.append(ids)
                if not ids:
                    continue
                rows = model.embed_tokens(np.asarray([ids], dtype=np.int32))
                mask = np.zeros((1, len(ids)), bool)
            else:
                piece_ids.append(None)
                rows = model.encode_img(self.preprocess(images[piece.index], hd, opts.max_pixels))
                mask = np.ones((1, int(rows.shape[1])), bool)
            embeds.append(rows)
            masks.append(mask)
            total += mask.shape[1]
            if images is not None and total > limit:
                break  # the official builder stops here too: later images are never encoded
        im_mask = np.concatenate(masks, axis=1)
        inputs_embeds = embeds[0] if len(embeds) == 1 else ops.cat(embeds, axis=1)
        if images is not None:
            kept = kept_length([m.shape[1] for m in masks], limit)
            if kept < im_mask.shape[1]:
                inputs_embeds, im_mask = inputs_embeds[:, :kept], im_mask[:, :kept]
        text_only = images is None
        penalty_ids = [t for ids in piece_ids if ids for t in ids] if text_only else []
        extras: Dict[str, object] = {"im_mask": im_mask, "infer_mode": opts.infer_mode}
        return XComposer2Inputs(inputs_embeds, extras, penalty_ids, pieces, piece_ids, text_only)

    # ---- responses ----------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """The official response text: decode without special tokens, keep what precedes '[UNUSED_TOKEN_145]'."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).split(TURN_END)[0]
