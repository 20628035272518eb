"""Chat with an XComposer2 model: prompt -> embeddings -> generation -> response, as the official `chat`.

- `chat(model, tokenizer, query, image=None, ...)` -> `(response, history)`, the official signature and
  defaults (sampling, top_p 0.8, repetition penalty 1.005; IXC-2.5's `use_meta`, `hd_num`, `infer_mode`).
- `chat_with_ids(...)` -> `ChatResult` (response, history, the new token ids).
- `stream_chat(...)` -> `ChatStream`: iterate for text as it is produced; `.result` once it is exhausted.
- `build_chat_inputs(...)` -> `ChatInputs` (inputs_embeds, im_mask): the prefill the official builders make.

Prompt rules per variant are in `ms_xcomposer.prompt`; images go through `ms_xcomposer.processing` and
`model.encode_img`; decoding is `ms_xcomposer.generation.generate`. The response is the official
`tokenizer.decode(new_ids, skip_special_tokens=True)` cut at the first `[UNUSED_TOKEN_145]`.

Images: `image` is None (text only), one image or a list of them, each a file path, a PIL image, a uint8 array
(HxWx3), normalised float pixels [1,3,H,W], or for IXC-2.5 a video: a video file path (.mp4 ... , needs PyAV)
or a `Video` (a file, an animated GIF/WebP, or a list of frames), which becomes one canvas image of labelled
frames as the official `load_video` + `frame2img` + `Video_transform` build it.

Differences from the official code, on purpose: placeholder / image count mismatches raise `PromptError` (the
official 2.5 code prints a warning and drops images or text); a single image may be given without a list and
IXC2-VL / IXC2-4KHD accept several images (one `<ImageHere>` each); `hd_num` defaults to the variant's value.
The repetition penalty counts what transformers' `generate` sees as `input_ids` in the official code: the
prompt ids plus the generated ids in the text-only path (`build_inputs`), the generated ids only when the
prompt is given as embeddings (the image path).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor, ops

from ms_xcomposer.config import DEFAULT_META_INSTRUCTION
from ms_xcomposer.generation import GenerationConfig, GenerationOutput, Streamer, generate
from ms_xcomposer.processing import MAX_VIDEO_FRAMES, preprocess_video
from ms_xcomposer.prompt import (
    DEFAULT_MAX_LENGTH, TURN_END, Piece, PromptError, TextPiece, build_chat_prompt, check_max_length,
    effective_hd_num, kept_length,
)

History = List[Tuple[str, str]]

# Suffixes that a later token can still change: transformers' clean-up ("a ." -> "a.", "do n't" -> "don't")
# removes a space before these, and the stop text cuts the response.
_UNSTABLE_TAILS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're", TURN_END)


@dataclass(frozen=True)
class Video:
    """A video for IXC-2.5: `source` is a video file (needs PyAV), an animated image file (GIF, WebP) or a
    list of frames (PIL images or uint8 arrays, already sampled). Frames are sampled at 1 fps, at most
    `max_frames`; labels use `font_path` (e.g. the official SimHei.ttf) or PIL's built-in font."""

    source: Union[str, "os.PathLike[str]", Sequence[object]]
    max_frames: int = MAX_VIDEO_FRAMES
    font_path: Optional[str] = None


@dataclass
class ChatInputs:
    """The prefill of one chat turn.

    inputs_embeds: Tensor [1, S, hidden] in the model's compute dtype; im_mask: bool numpy [1, S] (True on
    image rows); pieces: the prompt pieces; piece_ids: token ids of each text piece (None for images), for the
    pieces built (a prompt over max_length stops early, as the official builder does); text_only: the official
    `build_inputs` path, whose prompt reaches `generate` as input ids.
    """

    inputs_embeds: Tensor
    im_mask: np.ndarray
    pieces: List[Piece]
    piece_ids: List[Optional[List[int]]]
    text_only: bool = False

    @property
    def penalty_ids(self) -> List[int]:
        """Prompt ids the repetition penalty counts: the whole prompt in the text-only path, none otherwise."""
        return [t for ids in self.piece_ids if ids for t in ids] if self.text_only else []


@dataclass
class ChatResult:
    """response: the answer text; history: the history with this turn appended; ids: the new token ids
    (a final stop id included when one was produced); generation: the raw `GenerationOutput`."""

    response: str
    history: History
    ids: List[int]
    generation: GenerationOutput = field(repr=False, default=None)


# ---- inputs ----------------------------------------------------------------------------------------------
def chat_eos_ids(tokenizer) -> List[int]:
    """The official chat's stop ids: [eos, id of '[UNUSED_TOKEN_145]']."""
    eoa = tokenizer.convert_tokens_to_ids(TURN_END)
    if eoa == tokenizer.unk_token_id:
        raise PromptError(f"the tokenizer has no {TURN_END} token: is it an InternLM2 / XComposer2 tokenizer?")
    return [tokenizer.eos_token_id, eoa]


def decode_response(tokenizer, ids: Sequence[int]) -> str:
    """The official response text: decode without special tokens, keep what precedes '[UNUSED_TOKEN_145]'."""
    return tokenizer.decode(ids, skip_special_tokens=True).split(TURN_END)[0]


def _image_list(image) -> Optional[list]:
    if image is None:
        return None
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def _encode_image(model, image, hd_num: int) -> Tensor:
    if isinstance(image, Video):
        pixels = preprocess_video(image.source, model.config.spec, max_frames=image.max_frames,
                                  font_path=image.font_path)
        return model.encode_img(pixels)
    return model.encode_img(image, hd_num)


def build_chat_inputs(model, tokenizer, query: str, image=None, hd_num: Optional[int] = None,
                      history: Sequence[Tuple[str, str]] = (), use_meta: bool = False,
                      meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION,
                      max_length: Optional[int] = None) -> ChatInputs:
    """Embeddings and image mask of one chat turn, as the official `interleav_wrap_chat` / `build_inputs`.

    Text pieces are tokenized (BOS per the variant's rule) and embedded with `model.embed_tokens`, images
    encoded with `model.encode_img(image, hd_num)`, all concatenated in prompt order; the result is cut to
    `max_length` rows (default: the variant's official limit, see `prompt.DEFAULT_MAX_LENGTH`) with a warning.
    The text-only path (image None) is not cut, as in the official code.
    """
    spec = model.config.spec
    images = _image_list(image)
    n_images = None if images is None else len(images)
    pieces = build_chat_prompt(query, history, spec, n_images, use_meta, meta_instruction)
    hd = effective_hd_num(spec, n_images or 0, hd_num)
    limit = check_max_length(DEFAULT_MAX_LENGTH[spec.name] if max_length is None else max_length)
    embeds: List[Tensor] = []
    masks: List[np.ndarray] = []
    piece_ids: List[Optional[List[int]]] = []
    total = 0
    for piece in pieces:
        if isinstance(piece, TextPiece):
            ids = tokenizer.encode(piece.text, add_bos=piece.add_bos)
            piece_ids.append(ids)
            if not ids:
                continue
            rows = model.embed_tokens(np.asarray([ids], dtype=np.int32))
            mask = np.zeros((1, len(ids)), bool)
        else:
            piece_ids.append(None)
            rows = _encode_image(model, images[piece.index], hd)
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
    return ChatInputs(inputs_embeds, im_mask, pieces, piece_ids, text_only=images is None)


# ---- chat ------------------------------------------------------------------------------------------------
def chat_with_ids(model, tokenizer, query: str, image=None, hd_num: Optional[int] = None,
                  history: Sequence[Tuple[str, str]] = (), max_new_tokens: int = 1024, do_sample: bool = True,
                  num_beams: int = 1, temperature: float = 1.0, top_p: float = 0.8, top_k: Optional[int] = None,
                  repetition_penalty: float = 1.005, use_meta: bool = False,
                  meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION, streamer: Optional[Streamer] = None,
                  infer_mode: str = "base", seed: Optional[int] = None,
                  max_length: Optional[int] = None) -> ChatResult:
    """One chat turn; returns the response, the updated history and the new token ids. Arguments as `chat`."""
    inputs = build_chat_inputs(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction,
                               max_length)
    config = _generation_config(tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p, top_k,
                                repetition_penalty, seed)
    out = generate(model, inputs.inputs_embeds, inputs.im_mask, config, streamer=streamer, infer_mode=infer_mode,
                   prompt_ids=inputs.penalty_ids)
    return _result(tokenizer, query, history, out)


def _generation_config(tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p, top_k,
                       repetition_penalty, seed) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, eos_token_id=tuple(chat_eos_ids(tokenizer)),
                            seed=seed)


def _result(tokenizer, query: str, history: Sequence[Tuple[str, str]], out: GenerationOutput) -> ChatResult:
    response = decode_response(tokenizer, out.ids)
    return ChatResult(response, list(history) + [(query, response)], list(out.ids), out)


def chat(model, tokenizer, query: str, image=None, hd_num: Optional[int] = None,
         history: Sequence[Tuple[str, str]] = (), max_new_tokens: int = 1024, do_sample: bool = True,
         num_beams: int = 1, temperature: float = 1.0, top_p: float = 0.8, top_k: Optional[int] = None,
         repetition_penalty: float = 1.005, use_meta: bool = False,
         meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION, streamer: Optional[Streamer] = None,
         infer_mode: str = "base", seed: Optional[int] = None,
         max_length: Optional[int] = None) -> Tuple[str, History]:
    """One chat turn, as the official `model.chat(tokenizer, query, image, ...)`; returns (response, history).

    Args:
        query: the user's message; `<ImageHere>` marks where each image goes (IXC-2.5 puts a single image
            first when there is none; IXC2-4KHD requires it).
        image: None (text only: the official `build_inputs` path, ids start [1, 1]), an image, or a list of
            images / videos (see the module docstring). `[]` is the interleaved path with no image (one BOS:
            IXC-2.5's official default).
        hd_num: HD tile budget per image (default: the variant's, 24 for IXC-2.5, 25 for IXC2-4KHD; IXC-2.5
            uses 6 when several images are given; IXC2-VL ignores it).
        history: earlier (query, response) turns (their `<ImageHere>` count: re-send their images).
        max_new_tokens, do_sample, num_beams, temperature, top_p, top_k (None: 50 when sampling),
        repetition_penalty, seed: decoding (`ms_xcomposer.generation.GenerationConfig`).
        use_meta: IXC-2.5: send `meta_instruction` as the system turn (IXC2-VL / 4KHD always send it).
        streamer: receives new ids (`put(list)`) as they come, then `end()`.
        infer_mode: IXC-2.5 task adapters: "base", "web" or "write".
        max_length: prompt rows kept (default: the variant's official limit); longer prompts are cut with a
            warning.

    Raises:
        PromptError: placeholders and images disagree, bad history; ImageError: unreadable image or video.
    """
    result = chat_with_ids(model, tokenizer, query, image, hd_num, history, max_new_tokens, do_sample, num_beams,
                           temperature, top_p, top_k, repetition_penalty, use_meta, meta_instruction, streamer,
                           infer_mode, seed, max_length)
    return result.response, result.history


# ---- streaming -------------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Text of a growing id sequence, released only when later ids cannot change it.

    `push(ids)` returns the newly stable text; `finish()` the rest. Held back: a trailing U+FFFD (a byte-fallback
    character still missing bytes), a tail a later token could turn into a clean-up pattern, and any text at or
    after '[UNUSED_TOKEN_145]'. The pieces joined equal `decode_response(tokenizer, all_ids)`.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if TURN_END in text:
            return self._release(text.split(TURN_END)[0])
        return self._release(text[:len(text) - _unstable_tail(text)])

    def finish(self) -> str:
        return self._release(decode_response(self.tokenizer, self.ids))

    def _release(self, stable: str) -> str:
        if not stable.startswith(self.emitted):  # cannot happen with the tails held back; never re-emit
            return ""
        new = stable[len(self.emitted):]
        self.emitted = stable
        return new


def _unstable_tail(text: str) -> int:
    stripped = text.rstrip("\ufffd")
    if len(stripped) < len(text):
        return len(text) - len(stripped)
    for n in range(min(len(text), max(map(len, _UNSTABLE_TAILS))), 0, -1):
        tail = text[-n:]
        if any(p.startswith(tail) for p in _UNSTABLE_TAILS):
            return n
    return 0


class _Cancelled(Exception):
    """Raised inside the generation thread when the consumer closed the stream."""


class ChatStream(Iterator[str]):
    """Text of one chat turn as it is generated; after the last piece, `result` holds the `ChatResult`.

    Generation runs in a worker thread; `close()` (or leaving a `with` block) stops it at the next token.
    Errors of the worker are raised from the iteration.
    """

    def __init__(self, run: Callable[[Streamer], ChatResult], tokenizer) -> None:
        self.result: Optional[ChatResult] = None
        self._decoder = IncrementalDecoder(tokenizer)
        self._queue: "queue.Queue[Tuple[str, object]]" = queue.Queue()
        self._cancel = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._thread.start()

    def _work(self, run: Callable[[Streamer], ChatResult]) -> None:
        stream = self

        class _Put:
            def put(self, ids: List[int]) -> None:
                if stream._cancel.is_set():
                    raise _Cancelled()
                stream._queue.put(("ids", list(ids)))

            def end(self) -> None:
                pass

        try:
            self._queue.put(("done", run(_Put())))
        except _Cancelled:
            self._queue.put(("cancelled", None))
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put(("error", e))

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        while not self._done:
            kind, value = self._queue.get()
            if kind == "ids":
                text = self._decoder.push(value)
                if text:
                    return text
                continue
            self._done = True
            if kind == "error":
                raise value
            if kind == "done":
                self.result = value
                text = self._decoder.finish()
                if text:
                    return text
        raise StopIteration

    def close(self) -> None:
        """Stop generating (at the next token) and wait for the worker."""
        self._cancel.set()
        self._thread.join()
        self._done = True

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_chat(model, tokenizer, query: str, image=None, hd_num: Optional[int] = None,
                history: Sequence[Tuple[str, str]] = (), max_new_tokens: int = 1024, do_sample: bool = True,
                num_beams: int = 1, temperature: float = 1.0, top_p: float = 0.8, top_k: Optional[int] = None,
                repetition_penalty: float = 1.005, use_meta: bool = False,
                meta_instruction: Optional[str] = DEFAULT_META_INSTRUCTION, infer_mode: str = "base",
                seed: Optional[int] = None, max_length: Optional[int] = None) -> ChatStream:
    """`chat`, streamed: iterate the returned `ChatStream` for text pieces (whole characters only, nothing
    after the stop text); their concatenation is the response. `stream.result` (a `ChatResult` with the ids
    and history) is set once the iteration ends. Beam search yields the text at the end."""
    # Inputs are built here, so prompt and image errors are raised by this call, not by the iteration.
    inputs = build_chat_inputs(model, tokenizer, query, image, hd_num, history, use_meta, meta_instruction,
                               max_length)
    config = _generation_config(tokenizer, max_new_tokens, do_sample, num_beams, temperature, top_p, top_k,
                                repetition_penalty, seed)

    def run(streamer: Streamer) -> ChatResult:
        out = generate(model, inputs.inputs_embeds, inputs.im_mask, config, streamer=streamer,
                       infer_mode=infer_mode, prompt_ids=inputs.penalty_ids)
        return _result(tokenizer, query, history, out)

    return ChatStream(run, tokenizer)
