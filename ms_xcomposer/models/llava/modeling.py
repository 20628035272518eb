"""LlavaForConditionalGeneration: CLIP tower + two-layer GELU projector + LLaMA decoder, on the generic engine.

Module tree (= the published llava-hf keys): `vision_tower.vision_model.*` (the shared CLIP tower,
`models/clip.py`, with LLaVA's feature layer and select strategy), `multi_modal_projector.linear_{1,2}`,
`language_model.model.*` (the shared `LlamaModel`), `language_model.lm_head` (shares the token embedding when
`tie_word_embeddings`: no parameter of its own).

The language model takes no per-token extras: image features are spliced into the prompt's embeddings before the
engine runs (`inputs_embeds`), as transformers' `masked_scatter` does, so `step_inputs` is the engine's default.
The image side's compiled piece is `_ImageFeatures`: tower up to the feature layer, select, projector; one graph
per number of images.

The transformers-style API: `from_pretrained`, `model(input_ids=..., pixel_values=..., attention_mask=...)` ->
logits, `generate(input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=..., do_sample=False)` ->
prompt + new ids; batches padded as the processor pads them (left), each row computed at its own positions.
"""
from __future__ import annotations

from typing import List

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_xcomposer.engine import CausalLM, CausalLMOutput, GraphPiece, mask_positions
from ms_xcomposer.models.clip import CLIPVisionModel
from ms_xcomposer.models.layers import Linear, linear
from ms_xcomposer.models.projector import MLPProjector
from ms_xcomposer.models.llama import LlamaModel
from ms_xcomposer.models.llava.config import LlavaConfig


class TiedLMHead(nn.Cell):
    """The output projection with the token embedding's table as its weight (shared, not copied: the table is
    not a child, so it is one parameter, `language_model.model.embed_tokens.weight`)."""

    def __init__(self, embedding: nn.Cell):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)

    def construct(self, x):
        return linear(x, self.embedding.weight)


class LlavaLanguageModel(nn.Cell):
    """HF's LlamaForCausalLM tree: `model` (LlamaModel) and `lm_head` (a Linear, or the tied embedding)."""

    def __init__(self, config: LlavaConfig, dtype=ms.float32):
        super().__init__()
        self.model = LlamaModel(config.llm, dtype)
        if config.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.model.embed_tokens)
        else:
            self.lm_head = Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False, dtype=dtype)


class _ImageFeatures(GraphPiece):
    """pixel_values [N, 3, H, W] -> projected image features [N, T, hidden]."""

    def construct(self, pixel_values):
        features, _ = self.owner.vision_tower(pixel_values)
        return self.owner.multi_modal_projector(features)


class LlavaForConditionalGeneration(CausalLM):
    """The LLaVA-1.5 model. Build with `from_pretrained` (or `ms_xcomposer.load`), or from a `LlavaConfig`.

    Args:
        config: the whole-model config.
        dtype: storage dtype of the weights (kept as loaded by default; float32 when built empty).
        compute_dtype: activation dtype; None picks the device default (CPU: float32).
    """

    def __init__(self, config: LlavaConfig, dtype=ms.float32, compute_dtype=None):
        super().__init__(compute_dtype)
        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision, dtype, post_layernorm=True,
                                            feature_layer=config.vision_feature_layer,
                                            keep_class_token=config.vision_feature_select_strategy == "full")
        self.multi_modal_projector = MLPProjector(config.vision.hidden_size, config.llm.hidden_size,
                                                  config.llm.hidden_size, dtype, ("linear_1", "linear_2"),
                                                  config.projector_bias)
        self.language_model = LlavaLanguageModel(config, dtype)

    # ---- the engine's view -----------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Cell:
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Cell:
        return self.language_model.lm_head

    @property
    def llm_config(self):
        return self.config.llm

    # ---- image side ------------------------------------------------------------------------------------
    def get_image_features(self, pixel_values) -> Tensor:
        """Normalised pixels [N, 3, S, S] (S = the tower's image_size) -> [N, image_tokens, hidden] in the compute
        dtype: the tower's hidden state `vision_feature_layer`, the class token kept under "full", projected."""
        pixels = _as_numpy(pixel_values)
        size = self.config.vision.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (size, size) or pixels.dtype.kind != "f":
            raise ValueError(f"pixel_values must be float [N, 3, {size}, {size}] (the processor's output), got "
                             f"{pixels.dtype} {list(pixels.shape)}")
        piece = self._piece(("image",), lambda: _ImageFeatures(self))
        return piece(Tensor(pixels.astype(np.float32)).astype(self.compute_dtype))

    def get_inputs_embeds(self, input_ids, pixel_values=None) -> Tensor:
        """[B, S] ids (image tokens included) -> [B, S, hidden] embeddings with the image-token rows replaced by
        the images' features in order (transformers' `masked_scatter`); no pixel_values: the token embeddings."""
        ids = _ids(input_ids)
        image_token = self.config.image_token_index
        n_tokens = int((ids == image_token).sum())
        if pixel_values is None:  # image tokens, if any, stay token embeddings, as in transformers
            return self.embed_tokens(ids)
        features = self.get_image_features(pixel_values)
        n_images, per_image, hidden = (int(d) for d in features.shape)
        if n_tokens != n_images * per_image:
            raise ValueError(f"Image features and image tokens do not match: {n_tokens} image tokens in input_ids, "
                             f"{n_images} image(s) x {per_image} features")
        embeds = self.embed_tokens(ids)
        flat = features.reshape(n_images * per_image, hidden)
        rows: List[Tensor] = []
        used = 0
        for b in range(ids.shape[0]):
            pieces = []
            for start, end, is_image in _runs(ids[b] == image_token):
                if is_image:
                    pieces.append(flat[used:used + end - start])
                    used += end - start
                else:
                    pieces.append(embeds[b, start:end])
            rows.append(pieces[0] if len(pieces) == 1 else ops.cat(pieces, 0))
        return ops.stack(rows, 0)

    # ---- the transformers-style API --------------------------------------------------------------------
    def __call__(self, input_ids=None, inputs_embeds=None, pixel_values=None, attention_mask=None,
                 past_key_values=None, positions=None, **kwargs) -> CausalLMOutput:
        """The engine's call (see `CausalLM.__call__`), plus transformers' `pixel_values` (image features spliced
        into the embeddings of `input_ids`) and `attention_mask` [B, past + S] (0 = padding; left or right padding,
        see `engine.mask_positions`): each row's logits are those of its tokens alone, as transformers' at the
        real positions (the logits at padded positions mean nothing, there as here)."""
        if attention_mask is not None:
            if positions is not None:
                raise ValueError("pass attention_mask or positions, not both")
            seq = _ids(input_ids).shape[1] if input_ids is not None else int(inputs_embeds.shape[1])
            past = past_key_values.length if past_key_values is not None else 0
            positions = mask_positions(_as_numpy(attention_mask), seq, past)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids (with the image tokens)")
            input_ids, inputs_embeds = None, self.get_inputs_embeds(input_ids, pixel_values)
        return super().__call__(input_ids=input_ids, inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                                positions=positions, **kwargs)

    def generate(self, input_ids=None, pixel_values=None, attention_mask=None, generation_config=None,
                 **kwargs) -> np.ndarray:
        """transformers' `generate`: int64 [B, S + new], each row's prompt ids (padding included) followed by its
        new ids, rows that stopped early filled with the pad id (`pad_token_id` of the generation config, else
        the first EOS), as transformers does.

        A batch is left-padded (`attention_mask` 0 = padding, the processor's `padding=True`); each row's tokens
        are those of its prompt alone (positions counted from its first real token, as transformers derives
        them from the mask). Greedy / sampled rows decode together in one batch (`batching.DecodeBatch`); beam
        search runs row after row, as transformers' rows are independent. kwargs: `GenerationConfig` fields
        (max_new_tokens, do_sample, num_beams, ...) over `generation_config` (default: the checkpoint's
        generation_config.json). The repetition penalty counts each row's ids, padding included, as
        transformers' `input_ids` do.
        """
        from ms_xcomposer.batching import Row, run_to_completion
        from ms_xcomposer.conversation import PreparedInputs
        from ms_xcomposer.generation import GenerationConfig, generate

        ids = _ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else _as_numpy(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask  # a lone prompt's mask, as input_ids may be
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
        starts = (mask_positions(mask, ids.shape[1], left_only=True) < 0).sum(axis=1)
        cfg = (generation_config or getattr(self, "generation_config", None) or GenerationConfig()).updated(**kwargs)
        embeds = self.get_inputs_embeds(ids, pixel_values)
        rows = [PreparedInputs(embeds[b:b + 1, int(start):], {}, ids[b].tolist()) for b, start in enumerate(starts)]
        # beam search is not batched (its rows are independent in transformers too); a lone row runs through
        # generation.generate, which names the stage of a non-finite output
        if cfg.num_beams > 1 or len(rows) == 1:
            new = [generate(self, r.inputs_embeds, cfg, prompt_ids=r.penalty_ids).ids for r in rows]
        else:
            batch_rows = [Row(r, cfg) for r in rows]
            run_to_completion(self, batch_rows)
            new = [row.output.ids for row in batch_rows]
        # without an EOS every row runs to max_new_tokens and nothing is filled
        fill = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id[0] if cfg.eos_token_id else 0)
        width = max(len(n) for n in new)
        out = np.full((ids.shape[0], ids.shape[1] + width), fill, np.int64)
        out[:, :ids.shape[1]] = ids
        for b, n in enumerate(new):
            out[b, ids.shape[1]:ids.shape[1] + len(n)] = n
        return out


def _runs(mask: np.ndarray):
    """(start, end, value) of the maximal runs of equal values of a 1-D bool array."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), mask.shape[0]]
    return [(a, b, bool(mask[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.asnumpy()
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ids(input_ids) -> np.ndarray:
    ids = _as_numpy(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be integer [B, S] with S > 0, got {ids.dtype} {list(ids.shape)}")
    return ids.astype(np.int32)
