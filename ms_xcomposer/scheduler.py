"""Continuous batching: one engine thread owns the model; requests join the running decode batch at step
boundaries and leave it when they finish.

`BatchingEngine.submit(...)` queues a chat turn (any thread) and returns a `Ticket`; the engine thread builds
its prompt (the family's processor: tokenizer, image encoding) and the requests waiting at a step boundary are
grouped into prefills (`batching.Prefill`): short prompts together, up to `max_prefill_tokens` tokens (padding
included) per prefill; a longer prompt alone, in chunks of that many tokens. The engine loop runs rounds: one
chunk of the oldest prefill, then one decode step of every running batch, so a prompt of any length delays the
running rows by at most one chunk per token they generate (vLLM's chunked prefill, without mixing prefill and
decode tokens in one call). A finished prefill's rows join the running `batching.DecodeBatch` of their step
flags. Every decode step advances every running row by one token; finished and cancelled rows leave and their
cache rows are reused. The caller hears of its request through a `Listener`, called on the engine thread:
`started(prompt tokens)`, `token(id)` per new token, then `finished(ChatResult, finish_reason, prompt tokens)`
or `failed(error)`. Listeners must not block (the server hands the events to its event loop).

Limits: `max_batch` rows decode (or prefill) together; `max_queue` requests wait (more: `QueueFull`);
`max_tokens` bounds the tokens in flight, the sum over running and prefilling rows of prompt + max_new_tokens
(a request that alone exceeds it fails with `RequestTooLarge`; others wait until rows leave);
`max_prefill_tokens` bounds the prompt tokens of one prefill chunk. Beam-search requests (num_beams > 1) are
not batched: they run alone on the engine thread, the running rows waiting meanwhile.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Protocol, Sequence, Tuple

from ms_xcomposer.batching import DecodeBatch, Prefill, Row, batch_key
from ms_xcomposer.config import MAX_PREFILL_TOKENS
from ms_xcomposer.conversation import ChatResult, Turn, finish_turn, prepare_turn, run_turn, stop_check


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


class RequestTooLarge(ValueError):
    """The prompt plus max_new_tokens alone exceed the engine's `max_tokens` in flight."""


class Listener(Protocol):
    def started(self, prompt_tokens: int) -> None: ...

    def token(self, token_id: int) -> None: ...

    def finished(self, result: ChatResult, finish_reason: str, prompt_tokens: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...


@dataclass(eq=False)
class Ticket:
    """A submitted request. `cancel()` (any thread) drops it from the queue, or ends its row at the next step."""

    query: str
    images: Optional[List[object]]
    history: Sequence[Tuple[str, str]]
    options: Dict[str, object]
    listener: Listener
    turn: Optional[Turn] = None
    row: Optional[Row] = None
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        self.cancelled = True
        if self.row is not None:
            self.row.cancel()


class BatchingEngine:
    """The engine thread and its queue (see the module doc). `start()` it, `submit()` turns, `stop()` it."""

    def __init__(self, model, processor, max_batch: int = 8, max_queue: int = 64, max_tokens: Optional[int] = None,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS):
        if max_batch < 1 or max_queue < 1 or max_prefill_tokens < 1 or (max_tokens is not None and max_tokens < 1):
            raise ValueError(f"max_batch, max_queue, max_tokens and max_prefill_tokens must be >= 1, got {max_batch}, "
                             f"{max_queue}, {max_tokens}, {max_prefill_tokens}")
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue, self.max_tokens = max_batch, max_queue, max_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self._cond = threading.Condition()
        self._queue: Deque[Ticket] = collections.deque()
        self._waiting: Deque[Ticket] = collections.deque()  # prepared, waiting for a free row or token budget
        self._batches: Dict[tuple, DecodeBatch] = {}
        self._prefills: Deque[Tuple[tuple, Prefill]] = collections.deque()  # (batch key, prefill), oldest first
        self._tickets: Dict[int, Ticket] = {}  # id(row) -> its ticket
        self._stopping = False
        self._ended: Dict[str, int] = collections.Counter()  # requests ended, by finish reason
        self._thread = threading.Thread(target=self._loop, name="ms-xcomposer-engine", daemon=True)

    # ---- any thread ------------------------------------------------------------------------------------
    def start(self) -> "BatchingEngine":
        self._thread.start()
        return self

    def submit(self, query: str, images: Optional[Sequence[object]], history: Sequence[Tuple[str, str]],
               listener: Listener, **options) -> Ticket:
        """Queue a chat turn (arguments as `conversation.chat`'s; `options`: GenerationConfig fields and the
        family's options). Raises QueueFull or EngineStopped."""
        ticket = Ticket(query, None if images is None else list(images), list(history), options, listener)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down and takes no new requests")
            if len(self._queue) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (--max-queue); retry later")
            self._queue.append(ticket)
            self._cond.notify()
        return ticket

    def stats(self) -> Dict[str, int]:
        """Rows decoding, requests waiting, and requests ended so far by reason (stop, length, cancelled, error)."""
        with self._cond:
            return {"running": self._running(),
                    "queued": len(self._queue) + len(self._waiting),
                    **{reason: self._ended[reason] for reason in ("stop", "length", "cancelled", "error")}}

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Refuse new requests; with `drain`, finish the queued and running ones first (else cancel them); wait
        for the engine thread to end."""
        with self._cond:
            self._stopping = True
            if not drain:
                for ticket in [*self._queue, *self._waiting, *self._tickets.values()]:
                    ticket.cancel()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._waiting or self._running()) and not self._stopping:
                    self._cond.wait()
                if self._stopping and not (self._queue or self._waiting or self._running()):
                    return
            self._admit()
            self._advance_prefill()
            for key in list(self._batches):
                self._run(self._batches[key], lambda b: b.step())

    def _rows(self) -> List[Row]:
        """The rows decoding and prefilling (snapshots of the containers: `stats` reads them from other threads)."""
        batches, prefills = list(self._batches.values()), list(self._prefills)
        return [r for b in batches for r in b.rows] + [r for _, p in prefills for r in p.rows]

    def _running(self) -> int:
        return len(self._rows())

    def _in_flight(self) -> int:
        return sum(r.prompt_length + r.config.max_new_tokens for r in self._rows())

    def _next_prepared(self) -> Optional[Ticket]:
        """The next request with its prompt built (failures reported and skipped), or None."""
        while True:
            if self._waiting:
                return self._waiting[0]
            with self._cond:
                if not self._queue:
                    return None
                ticket = self._queue.popleft()
            if ticket.cancelled:
                self._count("cancelled")
                continue
            try:
                ticket.turn = prepare_turn(self.model, self.processor, ticket.query, ticket.images, ticket.history,
                                           **ticket.options)
                need = ticket.turn.inputs.inputs_embeds.shape[1] + ticket.turn.generation.max_new_tokens
                if self.max_tokens is not None and need > self.max_tokens:
                    raise RequestTooLarge(f"the prompt ({ticket.turn.inputs.inputs_embeds.shape[1]} tokens) plus "
                                          f"max_tokens ({ticket.turn.generation.max_new_tokens}) exceed the "
                                          f"server's {self.max_tokens} tokens in flight")
            except Exception as e:  # noqa: BLE001 - bad input of one request: reported to it, the engine goes on
                self._count("error")
                ticket.listener.failed(e)
                continue
            ticket.images = None  # encoded now; do not keep the pixels
            ticket.listener.started(int(ticket.turn.inputs.inputs_embeds.shape[1]))
            with self._cond:
                self._waiting.append(ticket)

    def _admit(self) -> None:
        """Move prepared requests into new prefills while rows and the token budget allow: consecutive requests
        of one batch key share a prefill while its rows x longest prompt stays within `max_prefill_tokens`."""
        groups: List[Tuple[tuple, List[Row]]] = []
        open_group: Dict[tuple, List[Row]] = {}  # the last group of each key, still taking rows
        rows, budget = self._running(), self._in_flight()
        while rows < self.max_batch:
            ticket = self._next_prepared()
            if ticket is None:
                break
            turn = ticket.turn
            need = int(turn.inputs.inputs_embeds.shape[1]) + turn.generation.max_new_tokens
            if self.max_tokens is not None and budget + need > self.max_tokens and rows:
                break  # wait for rows to leave (a request alone always fits: checked when prepared)
            with self._cond:
                self._waiting.popleft()
            if ticket.cancelled:
                self._count("cancelled")
                continue
            if turn.generation.num_beams > 1:
                self._run_alone(ticket)
                continue
            ticket.row = Row(turn.inputs, turn.generation, on_token=ticket.listener.token,
                             should_stop=stop_check(self.processor, turn.generation))
            if ticket.cancelled:
                ticket.row.cancel()
            self._tickets[id(ticket.row)] = ticket
            key = batch_key(self.model, turn.inputs.extras)
            group = open_group.get(key)
            if group is not None and (len(group) + 1) * max(r.prompt_length for r in [*group, ticket.row]) \
                    <= self.max_prefill_tokens:
                group.append(ticket.row)
            else:
                open_group[key] = [ticket.row]
                groups.append((key, open_group[key]))
            rows, budget = rows + 1, budget + need
        for key, group in groups:
            try:
                self._prefills.append((key, Prefill(self.model, dict(key), group, self.max_prefill_tokens)))
            except Exception as e:  # noqa: BLE001 - e.g. a runtime failure: these rows end, the engine goes on
                self._fail(group, e)

    def _advance_prefill(self) -> None:
        """One chunk of the oldest prefill; when it is done its rows join their batch (a new one if none runs).
        A prefill whose requests were all cancelled is dropped; a failure fails its rows, the engine goes on."""
        if not self._prefills:
            return
        key, prefill = self._prefills[0]
        if all(r.cancelled for r in prefill.rows):
            self._prefills.popleft()
            for row in prefill.rows:
                row.end_if_cancelled()
                self._report(row)
            return
        try:
            prefill.advance()
        except Exception as e:  # noqa: BLE001 - e.g. a runtime failure: these rows end, the engine goes on
            self._prefills.popleft()
            self._fail(prefill.rows, e)
            return
        if prefill.done:
            self._prefills.popleft()
            batch = self._batches.setdefault(key, DecodeBatch(self.model, key))
            self._run(batch, lambda b: b.end_join(prefill), prefill.rows)

    def _fail(self, rows: Sequence[Row], error: BaseException) -> None:
        for row in rows:
            row.fail(error)
            self._report(row)

    def _run(self, batch: DecodeBatch, action, joining: Sequence[Row] = ()) -> None:
        """`action(batch)` (a join or a step), then report its finished rows; a failure fails every row in it."""
        try:
            finished = action(batch)
        except Exception as e:  # noqa: BLE001 - e.g. a runtime failure: these rows end, the engine goes on
            failed = list(batch.rows) + [r for r in joining if r not in batch.rows]
            batch.rows, batch.cache = [], None
            finished = []
            for row in failed:
                row.fail(e)
                finished.append(row)
        for row in finished:
            self._report(row)
        if not batch.rows:
            self._batches.pop(batch.key, None)

    def _count(self, reason: str) -> None:
        with self._cond:
            self._ended[reason] += 1

    def _report(self, row: Row) -> None:
        ticket = self._tickets.pop(id(row))
        self._count(row.finish_reason)
        if row.finish_reason == "cancelled":
            return
        if row.error is not None:
            ticket.listener.failed(row.error)
            return
        result = finish_turn(self.processor, ticket.query, ticket.history, ticket.turn.generation, row.output)
        ticket.listener.finished(result, row.finish_reason, row.prompt_length)

    def _run_alone(self, ticket: Ticket) -> None:
        listener = ticket.listener

        class _Ids:
            def put(self, ids: List[int]) -> None:
                for token in ids:
                    listener.token(token)

            def end(self) -> None:
                pass

        prompt = int(ticket.turn.inputs.inputs_embeds.shape[1])
        try:
            result = run_turn(self.model, self.processor, ticket.query, ticket.history, ticket.turn, _Ids())
        except Exception as e:  # noqa: BLE001
            self._count("error")
            listener.failed(e)
            return
        cfg = ticket.turn.generation
        reason = "length" if not result.generation.finished_by_eos and len(result.ids) >= cfg.max_new_tokens else "stop"
        self._count(reason)
        listener.finished(result, reason, prompt)
