"""The generic engine: a decoder-only language model with an explicit KV cache, run as compiled pieces.

It knows nothing of PLoRA, images or any family. A family's model subclasses `CausalLM`, owns its Cells
(parameter names = the HF keys) and says three things:
- `decoder`: the Cell with `tok_embeddings`, `layers` and `norm`, and `lm_head`: the output projection;
- `llm_config`: the decoder's `LLMConfig` (heads, widths, RoPE);
- `step_inputs(extras, batch, seq)`: its per-call extras (e.g. IXC's `im_mask`, `infer_mode`) as one per-token
  tensor [B, S] and a tuple of compile-time flags. Every decoder layer is called as
  `layer(x, token_mask, cos, sin, positions, bias, k_cache, v_cache, flags)` and returns (x, k_cache, v_cache).
  Extras named in `per_token_extras` describe the prompt only; generation leaves them out of decode steps.

Rows of a batch are independent: each has its own positions (= its KV-cache slots), RoPE tables and attention
bias, so rows of different lengths (left-padded prompts, rows decoding at different positions) share one call.
A padding token (position -1) is written to a slot after its row's last token, which the row's next tokens
overwrite, and no real token ever sees it: padding never changes a row's numbers.

Compiled pieces. The model itself is not compiled; it drives small parameter-free Cells that reference its
sub-cells (so parameter names stay the HF keys) and that MindSpore compiles in GRAPH mode:
- `DecoderStep`: embeddings -> decoder layers (KV cache in/out) -> norm -> logits. Batch, sequence and cache
  capacity dimensions are dynamic, so every prefill length and every decode step reuse one graph per flag set.
- `EmbedTokens`: the token-embedding lookup, dynamic batch and sequence (one graph for every prompt and step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_xcomposer import runtime
from ms_xcomposer.cache import KVCache, round_capacity
from ms_xcomposer.config import PREFILL_CHUNK, LLMConfig
from ms_xcomposer.models import rope

MASKED = -1e30  # additive attention bias of hidden positions; softmax runs in float32


@dataclass
class CausalLMOutput:
    """logits [B, S or 1, vocab] float32; past_key_values when use_cache; hidden_states when asked
    (the input embeddings, then each decoder layer's output; final norm not applied)."""

    logits: Tensor
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None


class GraphPiece(nn.Cell):
    """A parameter-free Cell that computes with the sub-cells of `owner`; compiled in GRAPH mode."""

    def __init__(self, owner: "CausalLM"):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "owner", owner)  # not a child: the owner's parameter names stay as they are


class DecoderStep(GraphPiece):
    """New tokens through every decoder layer with the KV cache, then the final norm and the LM head."""

    def __init__(self, owner: "CausalLM", flags: tuple, last_only: bool, hidden_states: bool):
        super().__init__(owner)
        self.flags, self.last_only, self.hidden_states = flags, last_only, hidden_states
        object.__setattr__(self, "decoder", owner.decoder)
        object.__setattr__(self, "lm_head", owner.lm_head)
        llm, dt = owner.llm_config, owner.compute_dtype
        # Batch, sequence and cache capacity are dynamic: one graph serves every prefill and decode step.
        cache = ms.mutable(tuple(Tensor(shape=[None, llm.num_key_value_heads, None, llm.head_dim], dtype=dt)
                                 for _ in range(llm.num_hidden_layers)))
        self.set_inputs(Tensor(shape=[None, None, llm.hidden_size], dtype=dt), Tensor(shape=[None, None, 1], dtype=dt),
                        Tensor(shape=[None, None, llm.head_dim], dtype=dt),
                        Tensor(shape=[None, None, llm.head_dim], dtype=dt), Tensor(shape=[None, None], dtype=ms.int32),
                        Tensor(shape=[None, None, None], dtype=ms.float32), cache, cache)

    def construct(self, embeds, token_mask, cos, sin, positions, bias, k_caches, v_caches):
        x = embeds
        hidden = (x,)
        new_k = ()
        new_v = ()
        for i, layer in enumerate(self.decoder.layers):
            x, k, v = layer(x, token_mask, cos, sin, positions, bias, k_caches[i], v_caches[i], self.flags)
            new_k = new_k + (k,)
            new_v = new_v + (v,)
            if self.hidden_states:
                hidden = hidden + (x,)
        if self.last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.decoder.norm(x)).astype(ms.float32)
        return logits, new_k, new_v, hidden


class EmbedTokens(GraphPiece):
    """[B, S] int32 ids -> [B, S, hidden] embeddings; batch and sequence dynamic, so one graph serves all."""

    def __init__(self, owner: "CausalLM"):
        super().__init__(owner)
        object.__setattr__(self, "decoder", owner.decoder)
        self.set_inputs(Tensor(shape=[None, None], dtype=ms.int32))

    def construct(self, ids):
        return self.decoder.tok_embeddings(ids, self.owner.compute_dtype)


class CausalLM(nn.Cell):
    """Base of every family's model: the language-model call with an explicit KV cache (see the module doc).

    Subclasses build their Cells in `__init__` (after `super().__init__(compute_dtype)`) and define `decoder`,
    `lm_head`, `llm_config` and, when they take extras, `step_inputs` and `per_token_extras`.
    """

    per_token_extras: Tuple[str, ...] = ()
    prefill_chunk: int = PREFILL_CHUNK  # rows per compiled-step call; an instance may set its own

    def __init__(self, compute_dtype=None):
        super().__init__()
        self.compute_dtype = compute_dtype if compute_dtype is not None else runtime.compute_dtype()
        self._pieces: Dict[tuple, GraphPiece] = {}  # compiled pieces, keyed by their constant flags

    # ---- what a family provides ------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Cell:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Cell:
        raise NotImplementedError

    @property
    def llm_config(self) -> LLMConfig:
        raise NotImplementedError

    def step_inputs(self, extras: Mapping[str, object], batch: int, seq: int) -> Tuple[Optional[np.ndarray], tuple]:
        """(per-token mask [B, S] or None, compile-time flags) from the family's extras. The base takes none."""
        if extras:
            raise TypeError(f"{type(self).__name__} takes no extra arguments, got {sorted(extras)}")
        return None, ()

    # ---- pieces ----------------------------------------------------------------------------------------
    def _piece(self, key: tuple, make) -> GraphPiece:
        if key not in self._pieces:
            self._pieces[key] = make()
        return self._pieces[key]

    def compiled_graphs(self) -> int:
        """How many graphs MindSpore has compiled for this model so far (0 in PyNative mode)."""
        return sum(len(p.compile_cache) for p in self._pieces.values())

    def embed_tokens(self, input_ids) -> Tensor:
        """[B, S] token ids -> [B, S, hidden] embeddings in the compute dtype."""
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids, dtype=np.int32))
        return self._piece(("embed",), lambda: EmbedTokens(self))(ids.astype(ms.int32))

    # ---- the language-model call -----------------------------------------------------------------------
    def __call__(self, input_ids=None, inputs_embeds=None, past_key_values: Optional[KVCache] = None,
                 use_cache: bool = False, last_logits_only: bool = False, output_hidden_states: bool = False,
                 cache_capacity: Optional[int] = None, positions=None, **extras) -> CausalLMOutput:
        """Run the language model on new tokens, continuing `past_key_values` when given.

        input_ids [B, S] or inputs_embeds [B, S, hidden]; `extras`: the family's per-call arguments (see
        `step_inputs`). Returns CausalLMOutput (logits float32 [B, S, vocab], or [B, 1, vocab] with
        last_logits_only). `cache_capacity` reserves room for later tokens in the returned cache.
        `positions` [B, S]: each new token's position in its row (-1: padding; see `row_positions`); default
        cache length + 0..S-1 for every row. The returned cache's `length` is the longest row's.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else _as_tensor(inputs_embeds, self.compute_dtype)
        batch, seq = int(embeds.shape[0]), int(embeds.shape[1])
        mask, flags = self.step_inputs(extras, batch, seq)
        if mask is None:
            mask = np.zeros((batch, seq), np.float32)

        llm = self.llm_config
        cache = past_key_values
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + seq), (batch, seq))
        slots, cos, sin, ends = row_positions(llm, positions, batch, seq)
        total = int(slots.max()) + 1
        want = max(total, cache_capacity or 0)
        if cache is None:
            cache = KVCache.allocate(llm, batch, round_capacity(want) if use_cache else total, self.compute_dtype)
        elif cache.batch != batch:
            raise ValueError(f"past_key_values holds batch {cache.batch}, inputs have batch {batch}")
        elif cache.capacity < total:
            cache = cache.grow(round_capacity(want))

        step = self._piece(("llm", flags, last_logits_only, output_hidden_states),
                           lambda: DecoderStep(self, flags, last_logits_only, output_hidden_states))
        keys, values = cache.keys, cache.values
        cache = None  # a cache allocated here is dropped as soon as the first chunk has written its copy
        logits, keys, values, hidden = self._run_in_chunks(step, embeds, mask, cos, sin, slots, keys, values,
                                                           last_logits_only, output_hidden_states)
        length = max(start, int(ends.max()))
        return CausalLMOutput(
            logits=logits,
            past_key_values=KVCache(tuple(keys), tuple(values), length) if use_cache else None,
            hidden_states=hidden,
        )

    def _run_in_chunks(self, step: DecoderStep, embeds: Tensor, mask: np.ndarray, cos: np.ndarray,
                       sin: np.ndarray, slots: np.ndarray, keys, values, last_only: bool, hidden_states: bool):
        """The new rows through `step` in chunks of `prefill_chunk` rows, each attending to the cache written
        so far and itself (`attention_span` slots), so the [heads, rows, span] scores of one call stay
        chunk-sized (linear memory in the prompt length). Every chunk uses the same compiled graph (the
        sequence and slot dimensions are dynamic).

        Returns (logits: every chunk's, or the last chunk's last row with `last_only`; keys; values; the hidden
        states of every layer concatenated over the chunks, or None).
        """
        seq, dt = int(embeds.shape[1]), self.compute_dtype
        capacity = int(keys[0].shape[2])
        size = max(1, int(self.prefill_chunk))
        logits_parts, hidden_parts = [], []
        for a in range(0, seq, size):
            b = min(seq, a + size)
            rows = embeds if (a, b) == (0, seq) else embeds[:, a:b]
            chunk_slots = np.ascontiguousarray(slots[:, a:b])
            logits, keys, values, hidden = step(
                rows, Tensor(mask[:, a:b, None]).astype(dt), Tensor(cos[:, a:b]).astype(dt),
                Tensor(sin[:, a:b]).astype(dt), Tensor(chunk_slots),
                Tensor(attention_bias(chunk_slots, attention_span(chunk_slots, capacity))),
                ms.mutable(tuple(keys)), ms.mutable(tuple(values)))
            if not last_only:
                logits_parts.append(logits)
            if hidden_states:
                hidden_parts.append(hidden)
        if not last_only and len(logits_parts) > 1:
            logits = ops.cat(logits_parts, 1)
        hidden = None
        if hidden_states:
            hidden = tuple(parts[0] if len(parts) == 1 else ops.cat(parts, 1) for parts in zip(*hidden_parts))
        return logits, keys, values, hidden

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[Union[str, ms.dtype]] = None,
                        compute_dtype: Optional[str] = None,
                        progress: Optional[Callable[[int, int], None]] = None) -> "CausalLM":
        """Load a converted MindSpore directory (or an HF directory: .bin or safetensors shards) of this class's
        family.

        dtype: the weights' storage dtype, "float32"/"float16"/"bfloat16". None keeps each weight's stored
        dtype (cast to the compute dtype per call), except bf16 weights on CPU, which are upcast once at load
        (exactly) because CPU kernels cannot compute in bf16. compute_dtype: None = the device default.
        progress(bytes just loaded, total bytes): called as the weights are loaded.
        """
        from ms_xcomposer.conversion.readers import open_checkpoint
        from ms_xcomposer.generation import GenerationConfig
        from ms_xcomposer.weights import load_weights, renamed_source

        with open_checkpoint(path) as reader:
            family = reader.family
            if family.model_class() is not cls and cls is not CausalLM:
                raise ValueError(f"{path} holds a {family.name} model, not a {cls.__name__}")
            compute = runtime.compute_dtype(compute_dtype)
            target = runtime.DTYPES[dtype] if isinstance(dtype, str) else dtype
            if target is None and runtime.current_device() == "CPU" and any(
                    reader.dtype(k) == "bfloat16" for k in reader.keys()):
                target = compute
            model = family.model_class()(reader.config, dtype=target or ms.float32, compute_dtype=compute)
            # an HF directory read directly: its names through the family's key table, as conversion renames them
            source = reader if reader.kind == "ms" else renamed_source(
                reader, family.keys, {n: tuple(p.shape) for n, p in model.parameters_and_names()})
            load_weights(model, source, dtype=target, skip=family.keys.is_dropped, progress=progress)
        model.generation_config = GenerationConfig.from_pretrained(path)
        return model


def row_positions(llm: LLMConfig, positions, batch: int, seq: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(slots int32 [B, S], cos, sin float32 [B, S, head_dim], ends [B]) of new tokens at `positions` [B, S].

    A real token's slot is its position; padding tokens (position -1) take the slots right after their row's
    last real token, distinct, so they never overwrite a real key. `ends[b]` is row b's length after the call,
    the length dynamic NTK RoPE scales its base by (each row by its own, as if it ran alone).
    """
    pos = np.asarray(positions)
    if pos.shape != (batch, seq) or pos.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers of shape {(batch, seq)}, got {pos.dtype} {pos.shape}")
    real = pos >= 0
    if not real.any(axis=1).all():
        raise ValueError(f"every row needs at least one real (non-negative) position; rows "
                         f"{np.flatnonzero(~real.any(axis=1)).tolist()} have none")
    ends = np.where(real, pos, -1).max(axis=1) + 1
    pad_slots = ends[:, None] + np.cumsum(~real, axis=1) - 1
    slots = np.where(real, pos, pad_slots).astype(np.int32)
    cos = np.empty((batch, seq, llm.head_dim), np.float32)
    sin = np.empty_like(cos)
    for row in range(batch):
        cos[row], sin[row] = rope.cos_sin_at(llm, slots[row], int(ends[row]))
    return slots, cos, sin, ends


def mask_positions(attention_mask, seq: int, past: int = 0, left_only: bool = False) -> np.ndarray:
    """int64 [B, seq]: the positions (see `row_positions`) of the last `seq` tokens under transformers'
    `attention_mask` [B, W] (1 real, 0 padding; W covers the `past` cached tokens and the new ones): each real
    token's position is the number of real tokens before it in its row (transformers' generate: cumsum - 1),
    padding -1.

    Each row's real tokens must be one run (left or right padding; `left_only`: left padding only, as generation
    needs): for a run, these positions differ from transformers' forward ones (0..W-1) by one shift per row,
    which RoPE's relative attention does not see, so the logits of real tokens are the same.
    """
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.ndim != 2 or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"attention_mask must be 0/1 of shape [batch, length], got {mask.dtype} {list(mask.shape)}")
    if mask.shape[1] < past + seq:
        raise ValueError(f"attention_mask has {mask.shape[1]} columns; it must cover the {past} cached and {seq} "
                         "new tokens, as in transformers")
    real = mask.astype(bool)
    for row, m in enumerate(real):
        runs = np.count_nonzero(np.diff(np.concatenate(([0], m.astype(np.int8), [0]))) == 1)
        if runs > 1:
            raise ValueError(f"attention_mask row {row} has padding between real tokens: only left or right "
                             "padding is supported")
        if left_only and runs and not m[-1]:
            raise ValueError(f"attention_mask row {row} ends with padding: generation needs left padding "
                             "(transformers warns that right padding gives wrong results)")
    positions = np.cumsum(real, axis=1) - 1
    return np.where(real, positions, -1)[:, mask.shape[1] - seq:].astype(np.int64)


def attention_span(slots: np.ndarray, capacity: int) -> int:
    """Cache slots a call's tokens attend over: up to the last slot any of them sees, rounded up like capacities
    (`round_capacity`), at most `capacity`. The attention reads only these (the bias's last dimension says how
    many): an early chunk of a long prompt no longer scores the empty rest of the cache. The slot dimension is
    dynamic, so this adds no compiled graph."""
    return min(capacity, round_capacity(int(slots.max()) + 1))


def attention_bias(slots: np.ndarray, span: int) -> np.ndarray:
    """[B, S, span] float32: 0 where a token at slot `slots[b, s]` sees cache slot k (k <= its slot), else
    MASKED (later and empty slots)."""
    return np.where(np.arange(span)[None, None, :] <= slots[:, :, None], 0.0, MASKED).astype(np.float32)


def _as_tensor(x, dtype) -> Tensor:
    t = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
    return t.astype(dtype) if t.dtype != dtype else t
