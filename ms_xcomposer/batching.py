"""Rows generating together in one KV cache: the batched half of generation (greedy and sampling).

A `DecodeBatch` holds the rows that decode together, their KV cache [rows, kv_heads, capacity, head_dim] and
each row's own length. Rows join between steps (`join`: their prompts prefilled together, left-padded to the
longest, their cache rows appended; or `begin_join` / `end_join` around a `Prefill` advanced chunk by chunk,
with decode steps of the batch in between) and leave when they finish or are cancelled (their cache rows
dropped, the memory reused by the next rows to join). Each row keeps its own positions, RoPE tables, attention bias and
per-token extras (XComposer2's PLoRA image mask), so its numbers are those of the same prompt run alone; its
tokens are chosen on the host with the same code as `generation.generate` (`choose_token`), with its own
decoding options and random generator.

Rows of one batch share the model's step extras (XComposer2: `infer_mode`, a compile-time flag); `batch_key`
says which rows can share a batch. Beam search is not batched (callers run it alone with `generate`).

In GRAPH mode every decode step, whatever the number of rows and their positions, reuses one compiled graph,
and so does every text-only prefill (the engine's dimensions are dynamic); prompts with image rows use the
PLoRA prefill graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, ops

from ms_xcomposer.cache import KVCache, round_capacity
from ms_xcomposer.generation import GenerationConfig, GenerationOutput, NonFiniteError, choose_token


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One sequence of a batch: its prompt (a `PreparedInputs`: embeddings [1, L, hidden], the model's extras,
    the ids its repetition penalty counts), decoding options, and callbacks.

    on_token(id) is called for every new token (an exception it raises ends the row as an error);
    should_stop(generated ids) ends it like a stop string. After it leaves the batch, `output` holds the
    `GenerationOutput` (or `error` the exception), `finish_reason` "stop", "length", "cancelled" or "error".
    """

    inputs: object
    config: GenerationConfig
    on_token: Optional[Callable[[int], None]] = None
    should_stop: Optional[Callable[[List[int]], bool]] = None
    generated: List[int] = field(default_factory=list)
    length: int = 0
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    output: Optional[GenerationOutput] = None

    def __post_init__(self) -> None:
        if self.config.num_beams != 1:
            raise ValueError("beam search (num_beams > 1) is not batched; run it alone with generation.generate")
        self._rng = np.random.default_rng(self.config.seed)
        self._cancelled = False

    @property
    def prompt_length(self) -> int:
        return int(self.inputs.inputs_embeds.shape[1])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Leave at the next step boundary (thread-safe: only sets a flag)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def end_if_cancelled(self) -> bool:
        """Finish the row as "cancelled" if it was cancelled and is not done yet; returns whether it is done."""
        if self._cancelled and not self.done:
            self._finish("cancelled")
        return self.done

    def fail(self, error: BaseException) -> None:
        """End the row with `error` (e.g. the batch's step failed)."""
        self._finish("error", error)

    def push(self, logits: np.ndarray) -> None:
        """Choose the next token from this row's last logits [1, vocab] and record it; sets `finish_reason`."""
        if self._cancelled:
            self._finish("cancelled")
            return
        if not np.isfinite(logits).all():
            self._finish("error", NonFiniteError(
                f"the model produced NaN/Inf logits at position {self.length - 1} of a batched row; run the "
                "prompt alone (`chat`) to find the stage"))
            return
        cfg = self.config
        token = choose_token(logits, cfg, self._rng, [*self.inputs.penalty_ids, *self.generated])
        self.generated.append(token)
        try:
            if self.on_token is not None:
                self.on_token(token)
        except BaseException as e:  # noqa: BLE001 - the consumer's failure ends this row only
            self._finish("cancelled" if self._cancelled else "error", e)
            return
        if token in cfg.eos_token_id:
            self._finish("stop", by_eos=True)
        elif self.should_stop is not None and self.should_stop(self.generated):
            self._finish("stop")
        elif len(self.generated) >= cfg.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str, error: Optional[BaseException] = None, by_eos: bool = False) -> None:
        self.finish_reason, self.error = reason, error
        self.output = GenerationOutput(list(self.generated), by_eos, steps=len(self.generated))


def batch_key(model, extras: Dict[str, object]) -> tuple:
    """The step extras of a row (its extras but the per-token ones), hashable: rows with equal keys share a
    `DecodeBatch` (XComposer2: the same infer_mode)."""
    per_token = getattr(model, "per_token_extras", ())
    items = tuple(sorted((k, v) for k, v in extras.items() if k not in per_token))
    try:
        hash(items)
    except TypeError:
        raise TypeError(f"batched generation needs hashable step extras, got {[k for k, _ in items]}") from None
    return items


class Prefill:
    """The prompts of rows joining a `DecodeBatch`, prefilled together (left-padded to the longest) in chunks:
    each `advance()` runs the next chunk of every row through the model into this prefill's own KV cache, so a
    scheduler can run decode steps of the batch between two chunks (the running rows are not stalled for a whole
    long prompt). When `done`, `logits` [rows, vocab] are the prompts' last logits and `cache` their cache rows.

    Chunk boundaries: the last chunk ends at the longest prompt's end, the others `chunk` tokens before each
    other, and the first one extends over all left padding, so every chunk holds a real token of every row (a
    row's positions are never all padding). A row's numbers do not depend on the chunking: each chunk attends to
    the cache written by the earlier ones, at the row's own positions, as `CausalLM` itself chunks a prompt.
    """

    def __init__(self, model, step_extras: Dict[str, object], rows: Sequence[Row], chunk: Optional[int] = None):
        if not rows:
            raise ValueError("a prefill needs at least one row")
        if chunk is not None and chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 tokens, got {chunk}")
        self.model, self.step_extras, self.rows = model, step_extras, list(rows)
        self.embeds, self.positions, self.per_token = self._inputs()
        longest, shortest = self.positions.shape[1], min(r.prompt_length for r in self.rows)
        cuts = [] if chunk is None else [b for b in range(longest - chunk, 0, -chunk) if b > longest - shortest]
        self.bounds = [0, *reversed(cuts), longest]
        self.capacity = round_capacity(max(r.prompt_length + r.config.max_new_tokens for r in self.rows))
        self.cache: Optional[KVCache] = None
        self.logits: Optional[np.ndarray] = None
        self._next = 0

    @property
    def done(self) -> bool:
        return self._next == len(self.bounds) - 1

    def advance(self) -> None:
        """Run the next chunk."""
        a, b = self.bounds[self._next], self.bounds[self._next + 1]
        whole = (a, b) == (0, self.bounds[-1])
        embeds = self.embeds if whole else self.embeds[:, a:b]
        per_token = {k: v[:, a:b] for k, v in self.per_token.items()}
        out = self.model(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True, last_logits_only=True,
                         positions=self.positions[:, a:b], cache_capacity=self.capacity, **per_token,
                         **self.step_extras)
        self.cache = out.past_key_values
        self._next += 1
        if self.done:
            self.logits = out.logits.asnumpy()[:, -1]
            self.embeds, self.per_token = None, {}  # not needed any more: free them

    def _inputs(self) -> Tuple[Tensor, np.ndarray, Dict[str, np.ndarray]]:
        rows = self.rows
        longest = max(r.prompt_length for r in rows)
        embeds, positions = [], np.full((len(rows), longest), -1, np.int64)
        per_token: Dict[str, np.ndarray] = {}
        names = [n for n in getattr(self.model, "per_token_extras", ())
                 if any(r.inputs.extras.get(n) is not None for r in rows)]
        for name in names:
            per_token[name] = np.zeros((len(rows), longest), np.float32)
        for i, row in enumerate(rows):
            e, n = row.inputs.inputs_embeds, row.prompt_length
            e = e if isinstance(e, Tensor) else Tensor(np.asarray(e))
            if n < longest:
                e = ops.cat((ops.zeros((1, longest - n, int(e.shape[2])), e.dtype), e), axis=1)
            embeds.append(e)
            positions[i, longest - n:] = np.arange(n)
            for name in names:
                value = row.inputs.extras.get(name)
                if value is not None:
                    per_token[name][i, longest - n:] = _numpy(value).reshape(-1)
        return (embeds[0] if len(embeds) == 1 else ops.cat(embeds, axis=0)), positions, per_token


class DecodeBatch:
    """Rows decoding together with one KV cache (see the module doc). Not thread-safe: one thread drives it."""

    def __init__(self, model, key: tuple = ()):
        self.model, self.key = model, key
        self.step_extras = dict(key)
        self.rows: List[Row] = []
        self.cache: Optional[KVCache] = None

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: Sequence[Row]) -> List[Row]:
        """Prefill `rows` together (left-padded to the longest prompt), choose their first tokens and append them
        to the batch. Returns the rows that finished (already removed), these or others."""
        if not rows:
            return []
        prefill = self.begin_join(rows)
        while not prefill.done:
            prefill.advance()
        return self.end_join(prefill)

    def begin_join(self, rows: Sequence[Row], chunk: Optional[int] = None) -> "Prefill":
        """A `Prefill` of `rows` to advance chunk by chunk (`chunk` tokens per row and call; None: the whole
        prompt in one call), decode steps of this batch running between chunks; then `end_join` it."""
        for row in rows:
            if batch_key(self.model, row.inputs.extras) != self.key:
                raise ValueError("a row's step extras differ from its batch's (group rows by batch_key)")
        return Prefill(self.model, self.step_extras, rows, chunk)

    def end_join(self, prefill: "Prefill") -> List[Row]:
        """Rows of a finished `prefill` choose their first tokens and join the batch (their cache rows appended).
        Returns the rows that finished (already removed), these or others."""
        if not prefill.done:
            raise ValueError("end_join before the prefill's last chunk")
        for i, row in enumerate(prefill.rows):
            row.length = row.prompt_length
            row.push(prefill.logits[i:i + 1])
        self.cache = prefill.cache if self.cache is None else self.cache.concat(prefill.cache)
        prefill.cache = None
        self.rows.extend(prefill.rows)
        return self._drop_done()

    def step(self) -> List[Row]:
        """One decode step of every row (each at its own position). Returns the rows that finished (removed)."""
        finished = self._drop_done()  # cancelled between steps
        if not self.rows:
            return finished
        tokens = np.asarray([[r.generated[-1]] for r in self.rows], np.int32)
        positions = np.asarray([[r.length] for r in self.rows], np.int64)
        need = max(r.prompt_length + r.config.max_new_tokens for r in self.rows)
        out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True, last_logits_only=True,
                         positions=positions, cache_capacity=need, **self.step_extras)
        self.cache = out.past_key_values
        logits = out.logits.asnumpy()[:, -1]
        for i, row in enumerate(self.rows):
            row.length += 1
            row.push(logits[i:i + 1])
        return finished + self._drop_done()

    def _drop_done(self) -> List[Row]:
        done = [r for r in self.rows if r.end_if_cancelled()]
        if done:
            keep = [i for i, r in enumerate(self.rows) if not r.done]
            self.rows = [self.rows[i] for i in keep]
            self.cache = self.cache.select(keep) if keep else None
        return done


def run_to_completion(model, rows: Sequence[Row]) -> None:
    """Generate every row of `rows` to its end: rows with equal `batch_key`s share one `DecodeBatch`, joined
    together; afterwards each row's `output` holds its ids. Raises the first row's error (in row order)."""
    groups: Dict[tuple, List[Row]] = {}
    for row in rows:
        groups.setdefault(batch_key(model, row.inputs.extras), []).append(row)
    for key, members in groups.items():
        batch = DecodeBatch(model, key)
        batch.join(members)
        while len(batch):
            batch.step()
    for row in rows:
        if row.error is not None:
            raise row.error


def _numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
