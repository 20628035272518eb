"""Text generation with a KV cache: greedy, sampling and beam search with Hugging Face semantics.

The model runs on the device (one compiled prefill graph and one compiled decode graph in GRAPH mode);
the per-token logits processing runs on the host in numpy float32, mirroring transformers 4.57:
- processors: repetition penalty (over `prompt_ids` + the generated tokens: HF's `input_ids` holds the prompt
  ids when the prompt is given as ids, and only generated tokens when it is given as embeddings), then, when
  sampling, temperature, top-k (HF default 50 when `top_k` is None), top-p;
- greedy: argmax; sampling: a draw from softmax (numpy Generator seeded by `seed`);
- beam search (`num_beams` > 1): log-softmax, processors, accumulated scores, top (1 + n_eos) * num_beams
  candidates, finished hypotheses scored by sum_logprobs / generated_len ** length_penalty, HF's
  early-stop heuristic (early_stopping=False). With `do_sample` (HF's beam sampling) the candidates are drawn
  without replacement from the softmax of the accumulated scores, as `torch.multinomial` does; when fewer
  entries than candidates have a non-zero probability, the rest are filled, as torch fills them, with
  zero-probability entries (here: the best-scored of them, so a dead candidate never outranks a live one).
Logits that hold NaN or Inf raise `NonFiniteError` naming the first stage that produced them.
Decode steps carry no image tokens, so they run without the PLoRA branch, as the official model does.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from ms_xcomposer.cache import KVCache

HF_DEFAULT_TOP_K = 50
NEG_INF = -np.inf


class NonFiniteError(ValueError):
    """The model produced NaN or Inf: weights holding NaN/Inf, or an overflow of the compute dtype."""


class Streamer(Protocol):
    """Receives new token ids as they are generated (HF's BaseStreamer protocol)."""

    def put(self, ids: List[int]) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options: the one place for their defaults, used by the library, the CLI and the server.

    The defaults are transformers' (greedy, no penalties) with chat-sized `max_new_tokens`. A checkpoint's
    generation_config.json overrides them (`from_pretrained`, as transformers does), and arguments override
    that (`updated`). `top_k` None means HF's 50 when sampling. `eos_token_id` empty: the processor's stop ids.
    `stop`: strings that end the response (it is cut before them). `pad_token_id`: what transformers-style
    batched `generate` writes after a row that stopped early (None: the first EOS, as transformers falls back).
    """

    max_new_tokens: int = 1024
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    eos_token_id: Tuple[int, ...] = ()
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        else:
            object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(t, str) or not t for t in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def updated(self, **overrides) -> "GenerationConfig":
        """A copy with `overrides` (field names; None values are ignored), validated; TypeError names an unknown
        field."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown generation options {unknown}; known: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_pretrained(cls, path: str) -> "GenerationConfig":
        """The defaults overridden by `path/generation_config.json` when present (its fields this class knows;
        HF's `max_length` and the like are ignored). ValueError names the file when it is malformed."""
        file = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
        if not os.path.isfile(file):
            return cls()
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
            known = {k: v for k, v in data.items() if k in cls.field_names() and k != "stop"}
            return cls().updated(**known)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{file}: not a usable generation config: {e}") from None


@dataclass
class GenerationOutput:
    """ids: the new tokens (a final EOS included when one was produced); score: beam score (beam search)."""

    ids: List[int]
    finished_by_eos: bool
    score: Optional[float] = None
    steps: int = 0
    extra: dict = field(default_factory=dict)


# ---- logits processing (HF semantics) ------------------------------------------------------------------
def apply_repetition_penalty(scores: np.ndarray, generated: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """scores [B, V]: each token already generated in row b is divided by penalty (multiplied if negative)."""
    if penalty == 1.0:
        return scores
    out = scores.copy()
    for row, ids in enumerate(generated):
        if len(ids):
            idx = np.unique(np.asarray(ids, dtype=np.int64))
            idx = idx[idx < scores.shape[1]]
            s = out[row, idx]
            out[row, idx] = np.where(s < 0, s * penalty, s / penalty)
    return out


def apply_warpers(scores: np.ndarray, cfg: GenerationConfig, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Temperature, top-k, top-p as HF's sampling warpers, in that order (masked entries become -inf)."""
    out = scores.astype(np.float32)
    if cfg.temperature != 1.0:
        out = out / np.float32(cfg.temperature)
    top_k = HF_DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k
    if top_k:
        k = min(max(top_k, min_tokens_to_keep), out.shape[-1])
        kth = -np.partition(-out, k - 1, axis=-1)[:, k - 1:k]
        out = np.where(out < kth, NEG_INF, out).astype(np.float32)
    if cfg.top_p < 1.0:
        order = np.argsort(out, axis=-1, kind="stable")  # ascending, as HF sorts
        sorted_scores = np.take_along_axis(out, order, -1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[:, -min_tokens_to_keep:] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        out = np.where(remove, NEG_INF, out).astype(np.float32)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _non_finite(where: str, stage: str) -> NonFiniteError:
    return NonFiniteError(f"the model produced NaN/Inf logits in {where}; the first non-finite output is "
                          f"{stage}. The weights may hold NaN/Inf (`ms-xcomposer convert --check-finite` finds "
                          "them), or the compute dtype overflowed (float16: try float32)")


def _sample_candidates(rng: np.random.Generator, scores: np.ndarray, k: int) -> np.ndarray:
    """k indices of `scores` drawn without replacement from softmax(scores), as `torch.multinomial`; when
    fewer than k have a non-zero probability, the best-scored of the others complete the draw."""
    probs = _softmax(scores.astype(np.float64))
    live = np.flatnonzero(probs > 0)
    drawn = rng.choice(live, size=min(k, live.size), replace=False, p=probs[live] / probs[live].sum())
    if drawn.size == k:
        return drawn
    rest = np.setdiff1d(np.arange(scores.shape[0]), drawn, assume_unique=True)
    fill = rest[np.argsort(-scores[rest], kind="stable")[:k - drawn.size]]
    return np.concatenate([drawn, fill])


# ---- model stepping ------------------------------------------------------------------------------------
class _Stepper:
    """Runs the prefill and the cached decode steps, returning last-position logits as numpy [B, V]. The model's
    extras go to the prefill; those it names in `per_token_extras` describe the prompt and stay out of steps."""

    def __init__(self, model, extras: dict):
        self.model, self.extras = model, extras
        self.step_extras = {k: v for k, v in extras.items() if k not in getattr(model, "per_token_extras", ())}
        self.cache: Optional[KVCache] = None

    def prefill(self, embeds, capacity: int) -> np.ndarray:
        out = self.model(inputs_embeds=embeds, use_cache=True, last_logits_only=True, cache_capacity=capacity,
                         **self.extras)
        logits = out.logits.asnumpy()[:, -1]
        if not np.isfinite(logits).all():
            raise _non_finite("the prefill", self._first_non_finite(self.extras, inputs_embeds=embeds))
        self.cache = out.past_key_values
        return logits

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1, 1)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, last_logits_only=True,
                         **self.step_extras)
        logits = out.logits.asnumpy()[:, -1]
        if not np.isfinite(logits).all():
            raise _non_finite(f"the decode step at position {self.cache.length}",
                              self._first_non_finite(self.step_extras, input_ids=ids, past_key_values=self.cache))
        self.cache = out.past_key_values
        return logits

    def _first_non_finite(self, extras: dict, **inputs) -> str:
        """The first stage whose output holds NaN/Inf, found by running the same inputs again with every
        layer's output (only after non-finite logits: this costs one more forward). Rows a per-token extra
        marks (IXC's im_mask: image rows) are reported as image embeddings."""
        out = self.model(**inputs, **extras, last_logits_only=True, output_hidden_states=True)
        embeds, layers = out.hidden_states[0].asnumpy(), out.hidden_states[1:]
        if not np.isfinite(embeds).all():
            rows = ~np.isfinite(embeds).all(axis=-1)
            marks = [_numpy(extras[k]) != 0 for k in getattr(self.model, "per_token_extras", ())
                     if extras.get(k) is not None]
            if any((rows & m).any() for m in marks):
                return "the image embeddings (vision tower or projector)"
            return "the token embeddings"
        for i, hidden in enumerate(layers):
            if not np.isfinite(hidden.asnumpy()).all():
                return f"decoder layer {i}"
        return "the final norm or the output projection"

    def reorder(self, beam_index: Sequence[int]) -> None:
        self.cache = self.cache.select(beam_index)


def generate(model, inputs_embeds, config: Optional[GenerationConfig] = None, streamer: Optional[Streamer] = None,
             prompt_ids: Sequence[int] = (), should_stop: Optional[Callable[[List[int]], bool]] = None,
             **extras) -> GenerationOutput:
    """Generate new tokens after a prompt given as embeddings.

    inputs_embeds [1, S, hidden] (numpy or Tensor); `extras`: the model family's arguments (XComposer2:
    im_mask [1, S], infer_mode), passed to the prefill, and to decode steps except the per-token ones.
    prompt_ids: ids the repetition penalty counts besides the generated ones (the prompt's ids when HF would
    have been given `input_ids`, as the official text-only chat does; empty for an embeddings prompt).
    should_stop(generated ids): checked after each token of greedy / sampled decoding (stop strings).
    Returns GenerationOutput with the new ids (EOS included when produced). `streamer.put` receives each
    new token (greedy/sampling) or the final ids (beam search), then `streamer.end()`.
    """
    cfg = config or GenerationConfig()
    embeds = inputs_embeds if isinstance(inputs_embeds, Tensor) else Tensor(np.asarray(inputs_embeds))
    if embeds.ndim != 3 or int(embeds.shape[0]) != 1:
        raise ValueError(f"inputs_embeds must be [1, S, hidden], got {list(embeds.shape)}")
    stepper = _Stepper(model, extras)
    capacity = int(embeds.shape[1]) + cfg.max_new_tokens
    logits = stepper.prefill(embeds, capacity)
    prefix = [int(t) for t in prompt_ids]
    if cfg.num_beams == 1:
        result = _greedy_or_sample(stepper, logits, cfg, streamer, prefix, should_stop)
    else:
        result = _beam_search(stepper, logits, cfg, prefix)
        if streamer is not None:
            streamer.put(list(result.ids))
    if streamer is not None:
        streamer.end()
    return result


def choose_token(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, history: Sequence[int]) -> int:
    """The next token of one sequence from its last logits [1, vocab]: the repetition penalty over `history`
    (penalised ids and the generated ones), then argmax, or a draw from the warped softmax when sampling."""
    scores = apply_repetition_penalty(logits.astype(np.float32), [history], cfg.repetition_penalty)
    if cfg.do_sample:
        probs = _softmax(apply_warpers(scores, cfg).astype(np.float64))[0]
        return int(rng.choice(probs.shape[0], p=probs / probs.sum()))
    return int(np.argmax(scores[0]))


def _greedy_or_sample(stepper: _Stepper, logits: np.ndarray, cfg: GenerationConfig, streamer: Optional[Streamer],
                      prefix: List[int], should_stop: Optional[Callable[[List[int]], bool]]) -> GenerationOutput:
    rng = np.random.default_rng(cfg.seed)
    eos = set(cfg.eos_token_id)
    generated: List[int] = []
    for step in range(cfg.max_new_tokens):
        token = choose_token(logits, cfg, rng, prefix + generated)
        generated.append(token)
        if streamer is not None:
            streamer.put([token])
        if token in eos:
            return GenerationOutput(generated, True, steps=step + 1)
        if should_stop is not None and should_stop(generated):
            return GenerationOutput(generated, False, steps=step + 1)
        if step + 1 < cfg.max_new_tokens:
            logits = stepper.step([token])
    return GenerationOutput(generated, False, steps=cfg.max_new_tokens)


def _beam_search(stepper: _Stepper, logits: np.ndarray, cfg: GenerationConfig, prefix: List[int]) -> GenerationOutput:
    """HF 4.57 `_beam_search` for one prompt (decoder_prompt_len 0: the prompt is embeddings)."""
    nb, lp = cfg.num_beams, cfg.length_penalty
    eos = np.asarray(cfg.eos_token_id, dtype=np.int64)
    keep = max(2, 1 + len(eos)) * nb
    rng = np.random.default_rng(cfg.seed)
    vocab = logits.shape[-1]
    logits = np.repeat(logits, nb, axis=0)
    stepper.reorder([0] * nb)
    running: List[List[int]] = [[] for _ in range(nb)]
    running_scores = np.full(nb, -1e9, np.float32)
    running_scores[0] = 0.0
    finished: List[Tuple[float, List[int], bool]] = []  # (score, ids, ended by eos)
    heuristic_unsatisfied = True
    for cur_len in range(cfg.max_new_tokens):
        log_probs = _log_softmax(logits.astype(np.float32))
        log_probs = apply_repetition_penalty(log_probs, [prefix + seq for seq in running], cfg.repetition_penalty)
        if cfg.do_sample:
            log_probs = apply_warpers(log_probs, cfg, min_tokens_to_keep=len(eos) + 1)
        acc = (log_probs + running_scores[:, None]).reshape(-1)
        if cfg.do_sample:
            cand = _sample_candidates(rng, acc, keep)
        else:
            cand = np.argsort(-acc, kind="stable")[:keep]
        cand_scores = acc[cand]
        cand_beam, cand_tok = cand // vocab, cand % vocab
        cand_seqs = [running[b] + [int(t)] for b, t in zip(cand_beam, cand_tok)]
        hits = np.isin(cand_tok, eos) | (cur_len + 1 >= cfg.max_new_tokens)
        # finished hypotheses: candidates among the top nb that hit a stopping criterion
        if heuristic_unsatisfied:
            for rank in range(nb):
                if hits[rank]:
                    score = float(cand_scores[rank]) / ((cur_len + 1) ** lp)
                    finished.append((score, cand_seqs[rank], bool(np.isin(cand_tok[rank], eos))))
            finished.sort(key=lambda f: -f[0])
            finished = finished[:nb]
        # running beams: the best nb candidates that did not stop
        open_scores = cand_scores + hits.astype(np.float32) * np.float32(-1e9)
        order = np.argsort(-open_scores, kind="stable")[:nb]
        running = [cand_seqs[i] for i in order]
        running_scores = open_scores[order].astype(np.float32)
        if len(finished) == nb:
            best_possible = running_scores[0] / ((cur_len + 1) ** lp)
            heuristic_unsatisfied = heuristic_unsatisfied and best_possible > min(f[0] for f in finished)
        if not heuristic_unsatisfied or hits.all() or cur_len + 1 >= cfg.max_new_tokens:
            break
        stepper.reorder([int(cand_beam[i]) for i in order])
        logits = stepper.step([seq[-1] for seq in running])
    score, ids, by_eos = finished[0]
    return GenerationOutput(ids, by_eos, score=score, steps=cur_len + 1)
