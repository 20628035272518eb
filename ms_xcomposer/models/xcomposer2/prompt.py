"""Chat prompts of the XComposer2 family: the official template and the per-variant splitting rules.

Pure Python (no MindSpore, no tokenizer): `build_chat_prompt` turns a query, the history and the number of
images into an ordered list of pieces, each a text to tokenize (with or without BOS) or an image slot. The
caller (`XComposer2Processor.prepare`) tokenizes, embeds and concatenates them in that order.

The rules, as the official `chat` / `interleav_wrap_chat` / `build_inputs` of each variant apply them:

- Template: `[UNUSED_TOKEN_146]system\\n{meta}[UNUSED_TOKEN_145]\\n` (only when the meta instruction is sent
  and non-empty), then per history turn `[UNUSED_TOKEN_146]user\\n{q}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]`
  `assistant\\n{a}[UNUSED_TOKEN_145]\\n`, then the query turn ending in `[UNUSED_TOKEN_146]assistant\\n`.
- Meta instruction: IXC2-VL and IXC2-4KHD always send it (`VariantSpec.meta_always`); IXC-2.5 only with
  `use_meta=True`.
- No image argument (`n_images=None`): the official `build_inputs` path: one text piece starting with the
  literal `<s>`, tokenized with BOS as well, so the ids start `[1, 1, ...]`.
- With images (also with an empty image list, IXC-2.5's official default): the prompt is split at
  `<ImageHere>` (history included) and image i goes after text part i. IXC2-VL / IXC2-4KHD tokenize every
  non-empty part with BOS and skip empty parts; IXC-2.5 tokenizes the first part with BOS even when it is
  empty (a lone BOS), and later non-empty parts without BOS.
- A single image and no `<ImageHere>` anywhere in the prompt: IXC-2.5 puts it first; IXC2-VL puts it after the
  whole prompt (a warning says so); IXC2-4KHD refuses.

Where the official code goes on with a placeholder count that does not match the images (IXC-2.5 prints a
warning, IXC2-VL says nothing; both then drop images or text silently), `PromptError` is raised instead.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from ms_xcomposer.models.xcomposer2.config import DEFAULT_META_INSTRUCTION, VariantSpec
from ms_xcomposer.prompt_checks import History, PromptError, check_history, check_text  # noqa: F401 (PromptError: this module's API)
from ms_xcomposer.models.xcomposer2.config import variant_spec as variant_spec_of

IMAGE_PLACEHOLDER = "<ImageHere>"
BOS_TEXT = "<s>"
TURN_START = "[UNUSED_TOKEN_146]"
TURN_END = "[UNUSED_TOKEN_145]"  # also the chat's stop token; the response is cut at its first occurrence

# Longest prompt, in embedding rows (text ids + image tokens), before the official builders cut it: IXC-2.5's
# `interleav_wrap_chat(max_length=16384)`; IXC2-VL / IXC2-4KHD use `config.max_length` of the released
# config.json (4096 / 16384). The text-only path (`build_inputs`) is never cut.
DEFAULT_MAX_LENGTH = {"ixc2-vl": 4096, "ixc2-4khd": 16384, "ixc2.5": 16384}

# Variants whose official chat raises when the prompt has no `<ImageHere>` for a single image.
_PLACEHOLDER_REQUIRED = frozenset({"ixc2-4khd"})



@dataclass(frozen=True)
class TextPiece:
    """Text to tokenize; `add_bos` prepends BOS (id 1). Literal `<s>` in `text` is a BOS id too."""

    text: str
    add_bos: bool


@dataclass(frozen=True)
class ImageSlot:
    """Where image number `index` (0-based, in the order the images were given) goes."""

    index: int


Piece = Union[TextPiece, ImageSlot]


def conversation_text(query: str, history: History = (), meta_instruction: str = "") -> str:
    """The official template: optional system turn, the history turns, the query turn, the assistant header."""
    check_text(query, "query")
    prompt = f"{TURN_START}system\n{meta_instruction}{TURN_END}\n" if meta_instruction else ""
    for turn in check_history(history):
        prompt += (f"{TURN_START}user\n{turn[0]}{TURN_END}\n"
                   f"{TURN_START}assistant\n{turn[1]}{TURN_END}\n")
    return prompt + f"{TURN_START}user\n{query}{TURN_END}\n{TURN_START}assistant\n"


def effective_meta(spec: VariantSpec, use_meta: bool, meta_instruction: Optional[str]) -> str:
    """The system text actually sent: always for VL / 4KHD, with `use_meta` for IXC-2.5 ('' = none)."""
    if meta_instruction is None:
        return ""
    check_text(meta_instruction, "meta_instruction")
    return meta_instruction if (spec.meta_always or use_meta) else ""


def build_chat_prompt(query: str, history: History = (), variant_spec: Union[str, VariantSpec] = "ixc2.5",
                      n_images: Optional[int] = None, use_meta: bool = False,
                      meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION) -> List[Piece]:
    """Pieces of one chat prompt, in order: `TextPiece`s to tokenize and `ImageSlot`s to fill with images.

    Args:
        query: the user's message; `<ImageHere>` marks where an image goes.
        history: earlier (query, response) turns; their placeholders count too (images are re-sent each turn).
        variant_spec: a `VariantSpec` or a variant name.
        n_images: how many images are given; None = no image argument at all (the official text-only path,
            ids start [1, 1, ...]); 0 = an empty image list (the interleaved path with no image: one BOS, as
            IXC-2.5's official default `image=[]` gives).
        use_meta: IXC-2.5 only: send the meta instruction (VL / 4KHD always send it).
        meta_instruction: the system text ('' or None: none).

    Raises:
        PromptError: placeholders and images disagree, a 4KHD prompt without `<ImageHere>`, bad history.
    """
    spec = variant_spec_of(variant_spec)
    if n_images is not None and (isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0):
        raise PromptError(f"n_images must be None or a non-negative integer, got {n_images!r}")
    meta = effective_meta(spec, use_meta, meta_instruction)
    prompt = conversation_text(query, history, meta)
    count = prompt.count(IMAGE_PLACEHOLDER)
    if n_images is None:
        if count:
            raise PromptError(
                f"the prompt (history included) has {count} {IMAGE_PLACEHOLDER} placeholder(s) but no image was "
                "given; pass the images of the conversation again with each turn")
        return [TextPiece(BOS_TEXT + prompt, add_bos=True)]

    if n_images == 1 and count == 0:
        if spec.auto_image_placeholder:
            prompt, count = IMAGE_PLACEHOLDER + prompt, 1
        elif spec.name in _PLACEHOLDER_REQUIRED:
            raise PromptError(f"{spec.name} needs {IMAGE_PLACEHOLDER} in the query (or history) to place the "
                              f"image, e.g. '{IMAGE_PLACEHOLDER}{query}'")
        else:
            warnings.warn(f"{spec.name}: the prompt has no {IMAGE_PLACEHOLDER}; the image goes after the whole "
                          "prompt, as the official code places it. Put the placeholder in the query to choose.",
                          stacklevel=2)
            prompt, count = prompt + IMAGE_PLACEHOLDER, 1
    if count != n_images:
        raise PromptError(f"the prompt (history included) has {count} {IMAGE_PLACEHOLDER} placeholder(s) but "
                          f"{n_images} image(s) were given; they must match")

    pieces: List[Piece] = []
    for idx, part in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if spec.bos_every_piece:
            if part:
                pieces.append(TextPiece(part, add_bos=True))
        elif idx == 0 or part:
            pieces.append(TextPiece(part, add_bos=idx == 0))  # 2.5: the first part always, even empty
        if idx < n_images:
            pieces.append(ImageSlot(idx))
    return pieces


def effective_hd_num(variant_spec: Union[str, VariantSpec], n_images: int, hd_num: Optional[int] = None) -> int:
    """HD tile budget per image: `hd_num` (default: the variant's), or IXC-2.5's 6 when several images."""
    spec = variant_spec_of(variant_spec)
    if hd_num is None:
        hd_num = spec.default_hd_num
    if isinstance(hd_num, bool) or not isinstance(hd_num, int) or hd_num < 1:
        raise PromptError(f"hd_num must be a positive integer, got {hd_num!r}")
    if n_images > 1 and spec.multi_image_hd_num is not None:
        return spec.multi_image_hd_num
    return hd_num


def check_max_length(max_length: object) -> int:
    """`max_length` itself when it is a positive integer, else `PromptError`."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise PromptError(f"max_length must be a positive integer, got {max_length!r}")
    return max_length


def kept_length(piece_lengths: Sequence[int], max_length: int) -> int:
    """Rows of the prompt kept: all of them, or the first `max_length` with a warning (as the official cut).

    `piece_lengths`: embedding rows of each piece (text ids, image tokens) in order.
    """
    check_max_length(max_length)
    total = sum(piece_lengths)
    if total <= max_length:
        return total
    warnings.warn(f"the prompt exceeds max_length={max_length} embedding rows (text ids + image tokens); it is cut "
                  f"to the first {max_length}, which drops its end (the assistant header included), as the "
                  "official code does. Use fewer or smaller images (hd_num) or a larger max_length.",
                  stacklevel=2)
    return max_length
