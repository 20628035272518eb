"""InternVLChatModel: InternViT + pixel shuffle + mlp1 + InternLM2 (PLoRA off), for InternVL-1.5 checkpoints.

Module tree (= HF state-dict keys): `vision_model.*` (InternViT), `mlp1.{0,1,3}` (the projector),
`language_model.model.*` (the shared InternLM2 decoder, every linear plain) and `language_model.output`.

The language model runs on the generic engine (`ms_xcomposer.engine.CausalLM`); this family has no extras
(the decoder layers always get the flags (use_plora False, infer_mode "base")). Images enter as the official
code does: the prompt holds `<IMG_CONTEXT>` x 256 per tile, and `splice` overwrites those rows of the token
embeddings, in order, with `extract_feature(pixel_values)` flattened tile-major. Its compiled piece is
`_ExtractFeature` (ViT -> pixel shuffle -> mlp1), one graph for every tile count of a tile size.

The official methods are here with their signatures: `chat`, `multi_image_chat`, `batch_chat` (rows in a
`batching.DecodeBatch`) and the forward `model(pixel_values=..., input_ids=..., image_flags=...)`.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_xcomposer.engine import CausalLM, CausalLMOutput, GraphPiece
from ms_xcomposer.models.internlm2 import InternLM2Model
from ms_xcomposer.models.internvl.config import InternVLConfig
from ms_xcomposer.models.internvl.encoder import ImageEncoder
from ms_xcomposer.models.internvl.prompt import (
    IMG_CONTEXT_TOKEN, PromptError, chat_prompt, image_block, multi_image_block,
)
from ms_xcomposer.models.layers import Linear


class InternLM2ForCausalLM(nn.Cell):
    """The official `InternLM2ForCausalLM` tree under `language_model.`: `model` (the decoder, no PLoRA) and
    `output` (the untied LM head, no bias). Run through the engine, never called itself."""

    def __init__(self, config: InternVLConfig, dtype=ms.float32):
        super().__init__()
        self.model = InternLM2Model(config.llm, dtype=dtype)
        self.output = Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False, dtype=dtype)


class _ExtractFeature(GraphPiece):
    """pixel_values [T, 3, S, S] -> vit_embeds [T, (S/14)^2 / 4, hidden]; T is dynamic (one graph per S)."""

    def __init__(self, owner: "InternVLChatModel", side: int):
        super().__init__(owner)
        object.__setattr__(self, "encoder", owner.image_encoder)
        self.set_inputs(Tensor(shape=[None, 3, side, side], dtype=owner.compute_dtype))

    def construct(self, pixel_values):
        return self.encoder(pixel_values)


class _ExtractFeatureResized(GraphPiece):
    """`_ExtractFeature` for tiles of another size than the stored position grid (the grid is resized)."""

    def __init__(self, owner: "InternVLChatModel"):
        super().__init__(owner)
        object.__setattr__(self, "encoder", owner.image_encoder)

    def construct(self, pixel_values, pos_resize):
        return self.encoder(pixel_values, pos_resize)


class InternVLChatModel(CausalLM):
    """The InternVL-1.5 chat model. Build with `from_pretrained` (or `ms_xcomposer.load`), or from a config.

    Args:
        config: the whole-model config (`InternVLConfig`).
        dtype: storage dtype of the weights (kept as loaded by default; float32 when built empty).
        compute_dtype: activation dtype; None picks the device default (CPU: float32, Ascend/GPU: bfloat16).
    """

    def __init__(self, config: InternVLConfig, dtype=ms.float32, compute_dtype=None):
        super().__init__(compute_dtype)
        self.config = config
        encoder = ImageEncoder(config, dtype)
        # The encoder's two children become this model's own (names vision_model.*, mlp1.*, as the HF keys);
        # the encoder itself is kept outside the Cell tree, for its construct (ViT -> pixel shuffle -> mlp1).
        self.vision_model = encoder.vision_model
        self.mlp1 = encoder.mlp1
        object.__setattr__(self, "image_encoder", encoder)
        self.language_model = InternLM2ForCausalLM(config, dtype)
        self.num_image_token = config.num_image_token
        # The id of <IMG_CONTEXT>: `from_pretrained` reads it from the directory's tokenizer; the official
        # `chat` sets it from the tokenizer it is given.
        self.img_context_token_id: Optional[int] = None

    # ---- the engine's view -----------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Cell:
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Cell:
        return self.language_model.output

    @property
    def llm_config(self):
        return self.config.llm

    def step_inputs(self, extras: Mapping[str, object], batch: int, seq: int) -> Tuple[None, tuple]:
        super().step_inputs(extras, batch, seq)  # refuses extras: this family has none
        return None, (False, "base")  # the InternLM2 layers' flags: no PLoRA, no task adapter

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, compute_dtype: Optional[str] = None,
                        progress=None) -> "InternVLChatModel":
        """`CausalLM.from_pretrained`, plus `img_context_token_id` from the directory's tokenizer (when it has one)."""
        model = super().from_pretrained(path, dtype, compute_dtype, progress)
        model.img_context_token_id = _img_context_id(path)
        return model

    # ---- image side ------------------------------------------------------------------------------------
    def extract_feature(self, pixel_values) -> Tensor:
        """The official `extract_feature`: pixel_values [T, 3, S, S] (numpy or Tensor, normalised as
        `InternVLProcessor.load_image` makes them) -> vit_embeds [T, (S/14)^2 / 4, hidden] in the compute dtype.
        """
        pixels = _pixels(pixel_values).astype(self.compute_dtype)
        side = int(pixels.shape[2])
        pos_resize = self.vision_model.pos_resize(side, int(pixels.shape[3]))
        if pos_resize is None:
            return self._piece(("vision", side), lambda: _ExtractFeature(self, side))(pixels)
        return self._piece(("vision", "resized"), lambda: _ExtractFeatureResized(self))(pixels, pos_resize)

    def splice(self, input_ids, vit_embeds: Optional[Tensor] = None) -> Tensor:
        """Token embeddings of input_ids [B, S] with the `<IMG_CONTEXT>` rows replaced, in sequence order, by
        vit_embeds [T, N, hidden] flattened tile-major (the official `generate` / `forward`) -> [B, S, hidden].

        The number of `<IMG_CONTEXT>` ids must equal T * N (PromptError otherwise: the official forward would
        warn and use the first rows, its generate fails an assertion or misplaces rows).
        """
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {list(ids.shape)}")
        embeds = self.embed_tokens(ids.astype(np.int32))
        if vit_embeds is None:
            return embeds
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set: set model.img_context_token_id = "
                             f"tokenizer.convert_tokens_to_ids('{IMG_CONTEXT_TOKEN}') (the official chat sets it)")
        rows = np.flatnonzero(ids.reshape(-1) == self.img_context_token_id)
        hidden = int(embeds.shape[-1])
        n_vit = int(np.prod(vit_embeds.shape[:-1]))
        if rows.size != n_vit:
            raise PromptError(f"the prompt holds {rows.size} {IMG_CONTEXT_TOKEN} tokens but the images give "
                              f"{n_vit} embedding rows ({vit_embeds.shape[0]} tiles x {vit_embeds.shape[1]})")
        flat = ops.tensor_scatter_update(embeds.reshape(-1, hidden), Tensor(rows.astype(np.int32)[:, None]),
                                         vit_embeds.reshape(-1, hidden).astype(embeds.dtype))
        return flat.reshape(embeds.shape)

    # ---- the official forward ----------------------------------------------------------------------------
    def __call__(self, input_ids=None, inputs_embeds=None, pixel_values=None, image_flags=None,
                 **kwargs) -> CausalLMOutput:
        """The language-model call (`CausalLM.__call__`), or with `pixel_values` the official forward:
        `model(pixel_values=[T,3,S,S], input_ids=[B,S], image_flags=[T] or [T,1])` -> logits of the prompt with
        its `<IMG_CONTEXT>` rows replaced by the image features of the tiles whose flag is 1 (all by default).
        """
        if pixel_values is None:
            if image_flags is not None:
                raise ValueError("image_flags needs pixel_values")
            return super().__call__(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("pixel_values needs input_ids (the prompt with its <IMG_CONTEXT> tokens), "
                             "not inputs_embeds")
        vit = self.extract_feature(pixel_values)
        if image_flags is not None:
            flags = np.asarray(image_flags.asnumpy() if isinstance(image_flags, Tensor) else image_flags).reshape(-1)
            if flags.shape[0] != vit.shape[0]:
                raise ValueError(f"image_flags has {flags.shape[0]} entries for {vit.shape[0]} tiles")
            vit = ops.gather(vit, Tensor(np.flatnonzero(flags == 1).astype(np.int32)), 0)
        return super().__call__(inputs_embeds=self.splice(input_ids, vit), **kwargs)

    # ---- the official chat methods -------------------------------------------------------------------------
    def chat(self, tokenizer, pixel_values, question: str, generation_config: Mapping[str, object],
             history: Optional[Sequence[Tuple[str, str]]] = None, return_history: bool = False):
        """The official `model.chat`: `pixel_values` [T, 3, 448, 448] (numpy or Tensor) or None (text-only);
        `generation_config` a dict of decoding options (e.g. `dict(num_beams=1, max_new_tokens=512,
        do_sample=False)`); `history` None (first turn: the image block goes before the question) or the
        (question, response) pairs a previous call returned (their first question holds the image block).
        Returns the response, or (response, history) with return_history.

        As the official code: stops at `<|im_end|>` only; the recorded question carries the image block.
        Differences: text-only works (v1.5.1 crashes); history given with return_history False works (v1.5.1
        raises UnboundLocalError); the caller's history list is not modified (a new one is returned); nothing
        is printed.
        """
        if history is None and pixel_values is not None:
            question = image_block(int(_shape(pixel_values)[0]), self.num_image_token) + "\n" + question
        return self._official_chat(tokenizer, pixel_values, question, generation_config, history, return_history)

    def multi_image_chat(self, tokenizer, pixel_values, image_counts: Sequence[int], question: str,
                         generation_config: Mapping[str, object], history: Optional[Sequence[Tuple[str, str]]] = None,
                         return_history: bool = False):
        """The official `model.multi_image_chat`: the tiles of several images concatenated in pixel_values,
        `image_counts[k]` tiles for image k+1; the first question gets `<image k> (图k):<img>...</img>` per image,
        then a newline. Otherwise as `chat`."""
        counts = [int(c) for c in image_counts]
        if sum(counts) != int(_shape(pixel_values)[0]):
            raise PromptError(f"image_counts {counts} add up to {sum(counts)} tiles, pixel_values has "
                              f"{int(_shape(pixel_values)[0])}")
        if history is None:
            question = multi_image_block(counts, self.num_image_token) + "\n" + question
        return self._official_chat(tokenizer, pixel_values, question, generation_config, history, return_history)

    def batch_chat(self, tokenizer, pixel_values, image_counts: Optional[Sequence[int]], questions: Sequence[str],
                   generation_config: Mapping[str, object], history=None, return_history: bool = False) -> List[str]:
        """The official `model.batch_chat` (v1.5 remote code): one first-turn chat per question, generated
        together -> the responses, in order (strings only, no history).

        pixel_values: every row's tiles concatenated in row order ([T, 3, 448, 448], numpy or Tensor), or None
        (every row text-only: no image block, where the official v1.5 code crashes); image_counts[k]: the tiles of
        row k (sum = T; a count of 0 gives that row the empty block `<img></img>`, as the official code writes
        it). Decoding as `chat`: stops at `<|im_end|>` only.

        The official code left-pads the prompts (tokenizer padding side left) and generates them as one batch
        with an attention mask and positions counted from each row's first real token, so each row's numbers
        are those of the row alone; here each row keeps its own positions and RoPE tables in a `DecodeBatch`,
        with the same result: every row's ids equal `chat` on its prompt alone. One difference, past the
        context limit only: the official dynamic-NTK base follows the padded batch length (and then sticks,
        quirk 12), here each row's own length. Beam search (num_beams > 1) runs the rows one after the other.
        history / return_history raise NotImplementedError, as the official code does.
        """
        from ms_xcomposer.batching import Row, run_to_completion
        from ms_xcomposer.conversation import PreparedInputs
        from ms_xcomposer.generation import generate
        from ms_xcomposer.models.internvl.prompt import batch_chat_prompt

        if history is not None or return_history:
            raise NotImplementedError("multi-turn chat is not supported in batch_chat (as in the official code)")
        questions = list(questions)
        if image_counts is None and pixel_values is not None:
            raise PromptError("batch_chat: pixel_values needs image_counts (the tiles of each question's image)")
        if image_counts is not None and len(image_counts) != len(questions):
            raise PromptError(f"batch_chat: {len(questions)} questions but {len(image_counts)} image_counts")
        if pixel_values is None:
            counts = [None] * len(questions)
            if image_counts is not None and any(int(c) for c in image_counts):
                raise PromptError(f"image_counts {list(image_counts)} without pixel_values")
        else:
            counts = [int(c) for c in image_counts]
            tiles = int(_shape(pixel_values)[0])
            if sum(counts) != tiles:
                raise PromptError(f"image_counts {counts} add up to {sum(counts)} tiles, pixel_values has {tiles}")
        processor, cfg = self._official_setup(tokenizer, generation_config)
        prompts = [batch_chat_prompt(q, n, self.num_image_token, self.config.template)
                   for q, n in zip(questions, counts)]  # every prompt checked before the images are encoded
        vit = None if pixel_values is None else self.extract_feature(pixel_values)
        embeds, start = [], 0
        for prompt, n in zip(prompts, counts):
            embeds.append(self.splice([tokenizer.encode(prompt, add_bos=True)], vit[start:start + n] if n else None))
            start += n or 0
        if cfg.num_beams > 1:  # beam search is not batched: each row alone (the same beams as in a padded batch)
            return [processor.decode(generate(self, e, cfg).ids) for e in embeds]
        rows = [Row(PreparedInputs(e, {}), cfg) for e in embeds]
        run_to_completion(self, rows)
        return [processor.decode(row.output.ids) for row in rows]

    def _official_setup(self, tokenizer, generation_config):
        """(processor, GenerationConfig) of the official chat methods: `img_context_token_id` set from the
        tokenizer, the caller's options with eos = `<|im_end|>` only (the official code overwrites it)."""
        from ms_xcomposer.conversation import OptionError
        from ms_xcomposer.generation import GenerationConfig
        from ms_xcomposer.models.internvl.processor import InternVLProcessor

        processor = InternVLProcessor(tokenizer, self.config)
        self.img_context_token_id = processor.img_context_token_id
        options = dict(generation_config or {})
        options.pop("eos_token_id", None)
        base = getattr(self, "generation_config", None) or GenerationConfig()
        try:
            return processor, base.updated(**options, eos_token_id=(processor.turn_end_id,))
        except TypeError as e:
            raise OptionError(str(e)) from None

    def _official_chat(self, tokenizer, pixel_values, question, generation_config, history, return_history):
        from ms_xcomposer.generation import generate

        processor, cfg = self._official_setup(tokenizer, generation_config)
        prompt = chat_prompt(question, None, history=None if history is None else list(history),
                             template=self.config.template)
        embeds = self.splice([tokenizer.encode(prompt, add_bos=True)],
                             None if pixel_values is None else self.extract_feature(pixel_values))
        out = generate(self, embeds, cfg)  # an embeddings prompt: the repetition penalty counts new ids only
        response = processor.decode(out.ids)
        new_history: List[Tuple[str, str]] = list(history or ()) + [(question, response)]
        return (response, new_history) if return_history else response


_FLOATS = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


def _shape(pixel_values) -> Tuple[int, ...]:
    return tuple(int(d) for d in pixel_values.shape)


def _pixels(pixel_values) -> Tensor:
    """pixel_values as a float Tensor [T, 3, H, W]; ValueError naming the shape otherwise."""
    t = pixel_values if isinstance(pixel_values, Tensor) else Tensor(np.asarray(pixel_values, dtype=np.float32))
    if t.ndim != 4 or int(t.shape[1]) != 3 or t.dtype not in _FLOATS:
        raise ValueError(f"pixel_values must be float [tiles, 3, H, W], got {t.dtype} {list(t.shape)}")
    return t


def _img_context_id(path: str) -> Optional[int]:
    """The id of `<IMG_CONTEXT>` in the tokenizer of `path`, or None without one."""
    import os

    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        return None
    tokenizer = InternLM2Tokenizer.from_pretrained(path)
    token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return None if token_id == tokenizer.unk_token_id else token_id
