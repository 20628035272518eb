"""XComposer2ForCausalLM: CLIP tower + projector + PLoRA InternLM2, for IXC2-VL, IXC2-4KHD and IXC-2.5.

Module tree (= HF state-dict keys): `vit.vision_tower.vision_model.*`, `vision_proj.{0,2}`, `model.*`,
`output`, and for the HD variants `plora_glb_GN` [1,1,4C] / `plora_sub_GN` [1,1,1,4C].

Compiled pieces. The model itself is not compiled; it drives small parameter-free Cells that reference its
sub-cells (so parameter names stay the HF keys) and that MindSpore compiles in GRAPH mode:
- `_LLMStep`: embeddings -> decoder layers (KV cache in/out) -> norm -> logits. Sequence and cache capacity
  dimensions are dynamic, so every prefill length and every decode step reuse one graph per flag set
  (PLoRA on/off, task mode, last-position logits, hidden states).
- `_EmbedTokens`: the token-embedding lookup, dynamic batch and sequence (one graph for every prompt and step).
- `_VisionEncode`: ViT over the global view + tiles, 2x2 merge, separator layout, projector. Static shapes,
  one graph per tile grid (h, w).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_xcomposer import runtime
from ms_xcomposer.cache import KVCache, round_capacity
from ms_xcomposer.config import XComposerConfig
from ms_xcomposer.models import rope
from ms_xcomposer.models.clip import VisionTower
from ms_xcomposer.models.internlm2 import InternLM2Model
from ms_xcomposer.models.layers import GELU, Linear, zeros_param
from ms_xcomposer.models.plora import INFER_MODES
from ms_xcomposer.processing import global_view, split_tiles, tile_grid

MASKED = -1e30  # additive attention bias of hidden positions; softmax runs in float32


@dataclass
class CausalLMOutput:
    """logits [B, S or 1, vocab] float32; past_key_values when use_cache; hidden_states when asked
    (the input embeddings, then each decoder layer's output; final norm not applied)."""

    logits: Tensor
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None


class _GraphPiece(nn.Cell):
    """A parameter-free Cell that computes with the sub-cells of `owner`; compiled in GRAPH mode."""

    def __init__(self, owner: "XComposer2ForCausalLM"):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "owner", owner)  # not a child: the owner's parameter names stay as they are


class _LLMStep(_GraphPiece):
    def __init__(self, owner, use_plora: bool, infer_mode: str, last_only: bool, hidden_states: bool):
        super().__init__(owner)
        self.use_plora, self.infer_mode = use_plora, infer_mode
        self.last_only, self.hidden_states = last_only, hidden_states
        llm, dt = owner.config.llm, owner.compute_dtype
        # Batch, sequence and cache capacity are dynamic: one graph serves every prefill and decode step.
        cache = ms.mutable(tuple(Tensor(shape=[None, llm.num_key_value_heads, None, llm.head_dim], dtype=dt)
                                 for _ in range(llm.num_hidden_layers)))
        self.set_inputs(Tensor(shape=[None, None, llm.hidden_size], dtype=dt), Tensor(shape=[None, None, 1], dtype=dt),
                        Tensor(shape=[None, llm.head_dim], dtype=dt), Tensor(shape=[None, llm.head_dim], dtype=dt),
                        Tensor(shape=[None], dtype=ms.int32), Tensor(shape=[None, None], dtype=ms.float32),
                        cache, cache)

    def construct(self, embeds, im_mask, cos, sin, positions, bias, k_caches, v_caches):
        llm = self.owner.model
        x = embeds
        hidden = (x,)
        new_k = ()
        new_v = ()
        for i, layer in enumerate(llm.layers):
            x, k, v = layer(x, im_mask, cos, sin, positions, bias, k_caches[i], v_caches[i],
                            self.use_plora, self.infer_mode)
            new_k = new_k + (k,)
            new_v = new_v + (v,)
            if self.hidden_states:
                hidden = hidden + (x,)
        if self.last_only:
            x = x[:, -1:]
        logits = self.owner.output(llm.norm(x)).astype(ms.float32)
        return logits, new_k, new_v, hidden


class _EmbedTokens(_GraphPiece):
    """[B, S] int32 ids -> [B, S, hidden] embeddings; batch and sequence dynamic, so one graph serves all."""

    def __init__(self, owner):
        super().__init__(owner)
        self.set_inputs(Tensor(shape=[None, None], dtype=ms.int32))

    def construct(self, ids):
        return self.owner.model.tok_embeddings(ids, self.owner.compute_dtype)


class _VisionEncode(_GraphPiece):
    """[1 + h*w, 3, t, t] views -> [1, N, hidden] image embeddings (HD layout when the variant tiles)."""

    def __init__(self, owner, grid_h: int, grid_w: int, project: bool = True):
        super().__init__(owner)
        self.grid_h, self.grid_w, self.project = grid_h, grid_w, project
        self.hd = owner.config.spec.hd_tiles
        self.g = owner.config.vision.grid

    def construct(self, views):
        feats = self.owner.vit(views)  # [n, g*g, C]
        if self.hd:
            feats = self._hd_layout(feats)
        if self.project:
            return self.owner.vision_proj(feats)
        return feats

    def _hd_layout(self, feats):
        n, _, c = feats.shape
        m, h, w = self.g // 2, self.grid_h, self.grid_w
        # 2x2 merge: [n, g, g, C] -> [n, m, m, 4C], channels ordered (row offset, column offset, C).
        merged = feats.reshape(n, m, 2, m, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, m, m, 4 * c)
        sub_gn = self.owner.plora_sub_GN.astype(feats.dtype)
        glb_gn = self.owner.plora_glb_GN.astype(feats.dtype)
        glb = ops.cat((merged[:1], ops.broadcast_to(sub_gn, (1, m, 1, 4 * c))), 2).reshape(1, -1, 4 * c)
        tiles = merged[1:].reshape(1, h, w, m, m, 4 * c).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * m, w * m, 4 * c)
        tiles = ops.cat((tiles, ops.broadcast_to(sub_gn, (1, h * m, 1, 4 * c))), 2).reshape(1, -1, 4 * c)
        return ops.cat((glb, glb_gn, tiles), 1)


class XComposer2ForCausalLM(nn.Cell):
    """The XComposer2 vision-language model. Build with `from_pretrained`, or from a config for tests.

    Args:
        config: the whole-model config.
        dtype: storage dtype of the weights (kept as loaded by default; float32 when built empty).
        compute_dtype: activation dtype; None picks the device default (CPU: float32, Ascend/GPU: bfloat16).
    """

    def __init__(self, config: XComposerConfig, dtype=ms.float32, compute_dtype=None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype if compute_dtype is not None else runtime.compute_dtype()
        self.vit = VisionTower(config.vision, dtype=dtype, post_layernorm=config.has_post_layernorm)
        self.vision_proj = nn.SequentialCell([Linear(config.proj_in, config.proj_hidden, dtype=dtype), GELU(),
                                              Linear(config.proj_hidden, config.proj_hidden, dtype=dtype)])
        self.model = InternLM2Model(config.llm, config.plora, config.task_adapters, config.task_adapter_rank, dtype)
        self.output = Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False, dtype=dtype)
        if config.spec.hd_tiles:
            self.plora_glb_GN = zeros_param((1, 1, config.proj_in), dtype, "plora_glb_GN")
            self.plora_sub_GN = zeros_param((1, 1, 1, config.proj_in), dtype, "plora_sub_GN")
        self._pieces: Dict[tuple, _GraphPiece] = {}  # compiled steps, keyed by their constant flags

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[Union[str, ms.dtype]] = None,
                        compute_dtype: Optional[str] = None) -> "XComposer2ForCausalLM":
        """Load a converted MindSpore directory (or an HF directory: .bin or safetensors shards).

        dtype: the weights' storage dtype, "float32"/"float16"/"bfloat16". None keeps each weight's stored
        dtype (cast to the compute dtype per call), except bf16 weights on CPU, which are upcast once at load
        (exactly) because CPU kernels cannot compute in bf16. compute_dtype: None = the device default.
        """
        from ms_xcomposer.conversion.readers import open_checkpoint
        from ms_xcomposer.weights import load_weights

        reader = open_checkpoint(path)
        compute = runtime.compute_dtype(compute_dtype)
        target = runtime.DTYPES[dtype] if isinstance(dtype, str) else dtype
        if target is None and runtime.current_device() == "CPU" and reader.dtype("output.weight") == "bfloat16":
            target = compute
        model = cls(reader.config, dtype=target or ms.float32, compute_dtype=compute)
        load_weights(model, reader, dtype=target)
        return model

    # ---- pieces --------------------------------------------------------------------------------------
    def _piece(self, key: tuple, make) -> _GraphPiece:
        if key not in self._pieces:
            self._pieces[key] = make()
        return self._pieces[key]

    def compiled_graphs(self) -> int:
        """How many graphs MindSpore has compiled for this model so far (0 in PyNative mode)."""
        return sum(len(p.compile_cache) for p in self._pieces.values())

    # ---- text side -----------------------------------------------------------------------------------
    def embed_tokens(self, input_ids) -> Tensor:
        """[B, S] token ids -> [B, S, hidden] embeddings in the compute dtype."""
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids, dtype=np.int32))
        return self._piece(("embed",), lambda: _EmbedTokens(self))(ids.astype(ms.int32))

    def __call__(self, input_ids=None, inputs_embeds=None, im_mask=None, past_key_values: Optional[KVCache] = None,
                 use_cache: bool = False, infer_mode: str = "base", last_logits_only: bool = False,
                 output_hidden_states: bool = False, cache_capacity: Optional[int] = None) -> CausalLMOutput:
        """Run the language model on new tokens, continuing `past_key_values` when given.

        input_ids [B, S] or inputs_embeds [B, S, hidden]; im_mask [B, S] (1/True on image tokens; None =
        no image tokens). Returns CausalLMOutput (logits float32 [B, S, vocab], or [B, 1, vocab] with
        last_logits_only). `cache_capacity` reserves room for later tokens in the returned cache.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if infer_mode not in INFER_MODES:
            raise ValueError(f"infer_mode {infer_mode!r} unknown; expected one of {sorted(INFER_MODES)}")
        missing = [t for t in INFER_MODES[infer_mode] if t not in self.config.task_adapters]
        if missing:
            raise ValueError(f"infer_mode {infer_mode!r} needs the task adapters lora_{'/'.join(missing)}, "
                             "which this checkpoint does not have (converted with --task-lora drop, or not IXC-2.5)")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else _as_tensor(inputs_embeds, self.compute_dtype)
        batch, seq = int(embeds.shape[0]), int(embeds.shape[1])
        mask = np.zeros((batch, seq), np.float32) if im_mask is None else _as_numpy(im_mask).astype(np.float32)
        if mask.shape != (batch, seq):
            raise ValueError(f"im_mask has shape {mask.shape}, expected {(batch, seq)} to match the inputs")

        cache = past_key_values
        start = cache.length if cache is not None else 0
        total = start + seq
        want = max(total, cache_capacity or 0)
        if cache is None:
            cache = KVCache.allocate(self.config.llm, batch, round_capacity(want) if use_cache else total,
                                     self.compute_dtype)
        elif cache.batch != batch:
            raise ValueError(f"past_key_values holds batch {cache.batch}, inputs have batch {batch}")
        elif cache.capacity < total:
            cache = cache.grow(round_capacity(want))

        cos, sin = rope.cos_sin(self.config.llm, start, seq)
        key_pos = np.arange(cache.capacity)
        query_pos = np.arange(start, total)
        bias = np.where(key_pos[None, :] <= query_pos[:, None], 0.0, MASKED).astype(np.float32)
        use_plora = bool(mask.any())
        step = self._piece(("llm", use_plora, infer_mode, last_logits_only, output_hidden_states),
                           lambda: _LLMStep(self, use_plora, infer_mode, last_logits_only, output_hidden_states))
        logits, keys, values, hidden = step(
            embeds, Tensor(mask[..., None]).astype(self.compute_dtype), Tensor(cos).astype(self.compute_dtype),
            Tensor(sin).astype(self.compute_dtype), Tensor(query_pos.astype(np.int32)), Tensor(bias),
            ms.mutable(cache.keys), ms.mutable(cache.values))
        return CausalLMOutput(
            logits=logits,
            past_key_values=KVCache(tuple(keys), tuple(values), total) if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )

    # ---- image side ----------------------------------------------------------------------------------
    def vit_views(self, pixels: np.ndarray) -> Tuple[np.ndarray, int, int]:
        """Normalised pixels [1, 3, H, W] -> the ViT batch (global view + tiles for HD variants) and grid."""
        return split_views(pixels, self.config.tile_size, self.config.spec.hd_tiles)

    def encode_img(self, image, hd_num: Optional[int] = None, project: bool = True) -> Tensor:
        """One image -> [1, N, hidden] embeddings in the compute dtype.

        `image`: normalised pixels [1, 3, H, W] (numpy or Tensor; H, W multiples of the tile size for HD
        variants), or a path / PIL image, preprocessed for this variant with `hd_num` tiles at most.
        project=False returns the assembled image tokens before `vision_proj` ([1, N, proj_in]).
        """
        if isinstance(image, Tensor):
            image = image.asnumpy()
        if not isinstance(image, np.ndarray) or image.dtype.kind != "f":
            from ms_xcomposer.processing import preprocess

            image = preprocess(image, self.config.variant, hd_num or self.config.spec.default_hd_num)
        views, grid_h, grid_w = self.vit_views(image)
        piece = self._piece(("vision", grid_h, grid_w, project), lambda: _VisionEncode(self, grid_h, grid_w, project))
        return piece(Tensor(views).astype(self.compute_dtype))

    # ---- chat (the official methods; the work is in ms_xcomposer.chat) ----------------------------------
    def chat(self, tokenizer, query: str, image=None, **kwargs):
        """`ms_xcomposer.chat.chat(self, tokenizer, query, image, ...)`: one turn -> (response, history)."""
        from ms_xcomposer.chat import chat

        return chat(self, tokenizer, query, image, **kwargs)

    def stream_chat(self, tokenizer, query: str, image=None, **kwargs):
        """`ms_xcomposer.chat.stream_chat(self, ...)`: iterate for the response text as it is produced."""
        from ms_xcomposer.chat import stream_chat

        return stream_chat(self, tokenizer, query, image, **kwargs)


def split_views(pixels: np.ndarray, tile: int, hd_tiles: bool) -> Tuple[np.ndarray, int, int]:
    """[1, 3, H, W] -> (views [n, 3, tile, tile], grid_h, grid_w).

    HD variants: the global view (PyTorch-compatible bicubic resize to one tile) followed by the h x w tiles
    in row-major order; otherwise the image itself, which must be tile x tile.
    """
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise ValueError(f"pixels must have shape [1, 3, H, W], got {list(pixels.shape)}")
    pixels = pixels.astype(np.float32)
    if not hd_tiles:
        if pixels.shape[2:] != (tile, tile):
            raise ValueError(f"this variant takes {tile}x{tile} images, got {pixels.shape[2]}x{pixels.shape[3]}")
        return pixels, 1, 1
    grid_h, grid_w = tile_grid(pixels, tile)
    return np.concatenate([global_view(pixels, tile), split_tiles(pixels, tile)]), grid_h, grid_w


def _as_numpy(x) -> np.ndarray:
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _as_tensor(x, dtype) -> Tensor:
    t = x if isinstance(x, Tensor) else Tensor(np.asarray(x))
    return t.astype(dtype) if t.dtype != dtype else t
