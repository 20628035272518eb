"""Chat with any model family: the family's processor builds the prompt, the engine generates, the processor
decodes. The public entry points are re-exported at the top level (`from ms_xcomposer import chat`).

- `chat(model, processor, query, images=None, history=(), generation=None, **options)` -> (response, history);
- `chat_with_ids(...)` -> `ChatResult` (response, history, the new token ids, the raw `GenerationOutput`);
- `stream_chat(...)` -> `ChatStream`: iterate for text as it is produced; `.result` once it is exhausted;
- `batch_chat(model, processor, queries, images=..., ...)` -> [(response, history)]: several turns in one batch
  (`batch_chat_with_ids` -> a `ChatResult` each).

`generation` is a `GenerationConfig` (default: the model's, i.e. the checkpoint's generation_config.json over
the class defaults: greedy). Keyword arguments that are GenerationConfig fields override it (`do_sample=True`,
`max_new_tokens=64`, ...); the other keyword arguments are the family's options (XComposer2: `hd_num`,
`use_meta`, `meta_instruction`, `infer_mode`, `max_length`, `max_pixels`), checked by its processor.
`history` is a list of (query, response) pairs; the returned history ends with this turn.

A processor provides: `prepare(model, query, images, history, **options)` -> `PreparedInputs`,
`eos_token_ids`, `decode(ids)` (the response text), `stop_text` (a string the response is cut at, or None)
and `tokenizer` (its `decode(ids, skip_special_tokens=True)` for streaming).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mindspore import Tensor

from ms_xcomposer.generation import GenerationConfig, GenerationOutput, Streamer, generate

History = List[Tuple[str, str]]

# Suffixes that a later token can still change: transformers' clean-up ("a ." -> "a.", "do n't" -> "don't")
# removes a space before these.
_UNSTABLE_TAILS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


class OptionError(TypeError, ValueError):
    """An option the family (or GenerationConfig) does not take: a TypeError for Python callers, and bad input
    (a ValueError, exit 2) for the command line."""


def chat_options(options_class: type, family: str, options: Mapping[str, object]):
    """`options_class(**options)`: a family's chat options (a dataclass); OptionError names the unknown ones."""
    known = sorted(f.name for f in dataclasses.fields(options_class))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise OptionError(f"unknown {family} chat options {unknown}; known: {', '.join(known)}")
    return options_class(**options)


@dataclass
class PreparedInputs:
    """The prefill of one chat turn: inputs_embeds [1, S, hidden] in the model's compute dtype; the model's
    extras (passed to `generate`); the prompt ids the repetition penalty counts (HF's `input_ids`)."""

    inputs_embeds: Tensor
    extras: Dict[str, object]
    penalty_ids: List[int] = field(default_factory=list)


@dataclass
class ChatResult:
    """response: the answer text; history: the history with this turn appended; ids: the new token ids
    (a final stop id included when one was produced); generation: the raw `GenerationOutput`."""

    response: str
    history: History
    ids: List[int]
    generation: GenerationOutput = field(repr=False, default=None)


def generation_config(model, processor, generation: Optional[GenerationConfig] = None,
                      **overrides) -> GenerationConfig:
    """The decoding options of a turn: `generation` (default: the model's `generation_config`, else the class
    defaults), then `overrides`. The processor's stop ids (a chat turn's end, e.g. IXC's [UNUSED_TOKEN_145])
    always stop, besides any the config names (a generation_config.json usually names only the EOS)."""
    base = generation or getattr(model, "generation_config", None) or GenerationConfig()
    cfg = base.updated(**overrides)
    return cfg.updated(eos_token_id=tuple(dict.fromkeys((*processor.eos_token_ids, *cfg.eos_token_id))))


def split_options(kwargs: dict) -> Tuple[dict, dict]:
    """(GenerationConfig fields, the family's options) of a chat call's keyword arguments."""
    names = GenerationConfig.field_names()
    return ({k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names})


def stop_check(processor, cfg: GenerationConfig) -> Optional[Callable[[List[int]], bool]]:
    """should_stop(generated ids) for `cfg.stop` strings, or None without them."""
    if not cfg.stop:
        return None
    return lambda ids: any(s in processor.tokenizer.decode(ids, skip_special_tokens=True) for s in cfg.stop)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


@dataclass
class Turn:
    """A prepared chat turn: its decoding options and the model's inputs."""

    generation: GenerationConfig
    inputs: PreparedInputs


def prepare_turn(model, processor, query: str, images: Optional[List[object]], history: Sequence[Tuple[str, str]],
                 generation: Optional[GenerationConfig] = None, **kwargs) -> Turn:
    """Options checked and the prompt built (prompt, option and image errors raise here), nothing generated.
    `images` goes to the processor as given (None: the text-only path)."""
    overrides, options = split_options(kwargs)
    cfg = generation_config(model, processor, generation, **overrides)
    return Turn(cfg, processor.prepare(model, query, images, history, **options))


def run_turn(model, processor, query: str, history: Sequence[Tuple[str, str]], turn: Turn,
             streamer: Optional[Streamer] = None) -> ChatResult:
    """Generate and decode a prepared turn."""
    cfg, inputs = turn.generation, turn.inputs
    out = generate(model, inputs.inputs_embeds, cfg, streamer=streamer, prompt_ids=inputs.penalty_ids,
                   should_stop=stop_check(processor, cfg), **inputs.extras)
    return finish_turn(processor, query, history, cfg, out)


def finish_turn(processor, query: str, history: Sequence[Tuple[str, str]], cfg: GenerationConfig,
                out: GenerationOutput) -> ChatResult:
    """The `ChatResult` of a turn's generated ids: the response decoded and cut at the stop strings."""
    response = _cut_at_stop(processor.decode(out.ids), cfg.stop)
    return ChatResult(response, list(history) + [(query, response)], list(out.ids), out)


def image_list(images) -> Optional[List[object]]:
    """`images` of the public chat functions as a list, or None for a text-only turn (None or [])."""
    if images is None or (isinstance(images, (list, tuple)) and not images):
        return None
    return list(images) if isinstance(images, (list, tuple)) else [images]


# ---- chat ------------------------------------------------------------------------------------------------
def chat_with_ids(model, processor, query: str, images: Optional[Sequence[object]] = None,
                  history: Sequence[Tuple[str, str]] = (), generation: Optional[GenerationConfig] = None,
                  streamer: Optional[Streamer] = None, **kwargs) -> ChatResult:
    """One chat turn; returns the response, the updated history and the new token ids. Arguments as `chat`."""
    turn = prepare_turn(model, processor, query, image_list(images), history, generation, **kwargs)
    return run_turn(model, processor, query, history, turn, streamer)


def chat(model, processor, query: str, images: Optional[Sequence[object]] = None,
         history: Sequence[Tuple[str, str]] = (), generation: Optional[GenerationConfig] = None,
         streamer: Optional[Streamer] = None, **kwargs) -> Tuple[str, History]:
    """One chat turn -> (response, history).

    Args:
        model, processor: as `ms_xcomposer.load` returns them.
        query: the user's message (XComposer2: `<ImageHere>` marks where each image goes).
        images: None or [] for a text-only turn (the official text-only path: IXC-2.5's ids start [1, 1]), else
            a list of images (or one image): paths, PIL images, arrays; the family's processor says what it takes.
        history: earlier (query, response) turns.
        generation: decoding options (see the module doc); GenerationConfig fields given as keyword arguments
            override it.
        streamer: receives new ids (`put(list)`) as they come, then `end()`.
        **kwargs: GenerationConfig fields, and the family's options.

    Raises:
        OptionError (a TypeError): an option the family does not take; ValueError (e.g. PromptError,
        ImageError): bad prompt, history or image.
    """
    result = chat_with_ids(model, processor, query, images, history, generation, streamer, **kwargs)
    return result.response, result.history


def batch_chat(model, processor, queries: Sequence[str], images: Optional[Sequence[object]] = None,
               histories: Optional[Sequence[Sequence[Tuple[str, str]]]] = None,
               generation: Optional[GenerationConfig] = None, **kwargs) -> List[Tuple[str, History]]:
    """Several chat turns generated together in one batch -> [(response, history)], one per query, in order.
    Arguments as `batch_chat_with_ids`."""
    return [(r.response, r.history) for r in
            batch_chat_with_ids(model, processor, queries, images, histories, generation, **kwargs)]


def batch_chat_with_ids(model, processor, queries: Sequence[str], images: Optional[Sequence[object]] = None,
                        histories: Optional[Sequence[Sequence[Tuple[str, str]]]] = None,
                        generation: Optional[GenerationConfig] = None, **kwargs) -> List[ChatResult]:
    """Several chat turns generated together in one batch -> a `ChatResult` per query, in order.

    Args:
        queries: the user messages.
        images: one entry per query: None (text-only) or that query's images (a list, or one image); None for all
            text-only.
        histories: one history per query (default: none).
        generation, **kwargs: as `chat`, the same for every row.

    Each row's tokens are those `chat` gives for the same arguments (its own positions, RoPE, PLoRA mask;
    padding never changes a row's numbers; with sampling each row draws from its own generator seeded by
    `seed`). Rows with different step flags (e.g. XComposer2's infer_mode) cannot share a batch: they are in
    separate batches. Beam search (num_beams > 1) is not batched: those rows run one after the other.
    Every prompt is built before anything is generated, so a bad input raises before any work.
    """
    from ms_xcomposer.batching import Row, run_to_completion

    queries = list(queries)
    per_query_images = [None] * len(queries) if images is None else list(images)
    per_query_history = [()] * len(queries) if histories is None else [list(h) for h in histories]
    for name, values in (("images", per_query_images), ("histories", per_query_history)):
        if len(values) != len(queries):
            raise ValueError(f"batch_chat: {len(queries)} queries but {len(values)} {name}")
    turns = [prepare_turn(model, processor, q, image_list(i), h, generation, **kwargs)
             for q, i, h in zip(queries, per_query_images, per_query_history)]
    results: List[Optional[ChatResult]] = [None] * len(queries)
    rows: Dict[int, Row] = {}
    for i, turn in enumerate(turns):
        if turn.generation.num_beams > 1:
            results[i] = run_turn(model, processor, queries[i], per_query_history[i], turn)
        else:
            rows[i] = Row(turn.inputs, turn.generation, should_stop=stop_check(processor, turn.generation))
    run_to_completion(model, list(rows.values()))
    for i, row in rows.items():
        results[i] = finish_turn(processor, queries[i], per_query_history[i], turns[i].generation, row.output)
    return results


# ---- streaming -------------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Text of a growing id sequence, released only when later ids cannot change it.

    `push(ids)` returns the newly stable text; `finish()` the rest. Held back: a trailing U+FFFD (a byte-fallback
    character still missing bytes), a tail a later token could turn into a clean-up pattern or the start of a
    stop string, and any text at or after a stop string (the processor's `stop_text` and `stops`). The pieces
    joined equal `processor.decode(all_ids)` cut at the stops.
    """

    def __init__(self, processor, stops: Sequence[str] = ()) -> None:
        self.processor = processor
        self.stops = tuple(s for s in (getattr(processor, "stop_text", None), *stops) if s)
        self.ids: List[int] = []
        self.emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        # The processor's decode, not the tokenizer's: a family may post-process the text (InternVL strips it)
        text = self.processor.decode(self.ids)
        cut = _cut_at_stop(text, self.stops)
        if cut != text:
            return self._release(cut)
        return self._release(text[:len(text) - _unstable_tail(text, self.stops)])

    def finish(self) -> str:
        return self._release(_cut_at_stop(self.processor.decode(self.ids), self.stops))

    def _release(self, stable: str) -> str:
        if not stable.startswith(self.emitted):  # cannot happen with the tails held back; never re-emit
            return ""
        new = stable[len(self.emitted):]
        self.emitted = stable
        return new


def _unstable_tail(text: str, stops: Sequence[str] = ()) -> int:
    stripped = text.rstrip("\ufffd")
    if len(stripped) < len(text):
        return len(text) - len(stripped)
    patterns = _UNSTABLE_TAILS + tuple(stops)
    for n in range(min(len(text), max(map(len, patterns))), 0, -1):
        tail = text[-n:]
        if any(p.startswith(tail) for p in patterns):
            return n
    return 0


class _Cancelled(Exception):
    """Raised inside the generation thread when the consumer closed the stream."""


class ChatStream(Iterator[str]):
    """Text of one chat turn as it is generated; after the last piece, `result` holds the `ChatResult`.

    Generation runs in a worker thread; `close()` (or leaving a `with` block) stops it at the next token.
    Errors of the worker are raised from the iteration.
    """

    def __init__(self, run: Callable[[Streamer], ChatResult], processor, stops: Sequence[str] = ()) -> None:
        self.result: Optional[ChatResult] = None
        self._decoder = IncrementalDecoder(processor, stops)
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


def stream_chat(model, processor, query: str, images: Optional[Sequence[object]] = None,
                history: Sequence[Tuple[str, str]] = (), generation: Optional[GenerationConfig] = None,
                **kwargs) -> ChatStream:
    """`chat`, streamed: iterate the returned `ChatStream` for text pieces (whole characters only, nothing
    after a stop string); their concatenation is the response. `stream.result` (a `ChatResult` with the ids
    and history) is set once the iteration ends. Beam search yields the text at the end. Prompt, option and
    image errors are raised by this call, not by the iteration."""
    turn = prepare_turn(model, processor, query, image_list(images), history, generation, **kwargs)
    return ChatStream(lambda streamer: run_turn(model, processor, query, history, turn, streamer), processor,
                      turn.generation.stop)
