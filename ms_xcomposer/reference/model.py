"""The full XComposer2 reference model: CLIP tower, separators, projector, InternLM2 with PLoRA, LM head.

A `transformers.PreTrainedModel` with `GenerationMixin`, so greedy / sampling / beam search (KV cache, beam
reordering, logits processors) come from transformers' own `generate`, an implementation independent of ours.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ms_xcomposer.models.xcomposer2.config import XComposerConfig
from ms_xcomposer.reference.checkpoint import iter_shards, read_config
from ms_xcomposer.models.xcomposer2.config import INFER_MODES
from ms_xcomposer.reference.internlm2 import InternLM2Model, PLoRALinear, attention_bias
from ms_xcomposer.reference.vision import VisionTower, assemble_hd, merge_2x2, split_views

TextPiece = Union[torch.Tensor, Sequence[int]]


class ReferenceConfig(PretrainedConfig):
    """transformers wrapper of an `XComposerConfig` (kept as a dict under `xcomposer`)."""

    model_type = "ms_xcomposer_reference"

    def __init__(self, xcomposer: Optional[Mapping[str, object]] = None, **kwargs: object) -> None:
        xc = XComposerConfig.from_dict(xcomposer) if xcomposer is not None else XComposerConfig()
        llm = xc.llm
        self.xcomposer = xc.to_dict()
        # The fields transformers' generation and DynamicCache read.
        self.hidden_size = llm.hidden_size
        self.num_hidden_layers = llm.num_hidden_layers
        self.num_attention_heads = llm.num_attention_heads
        self.num_key_value_heads = llm.num_key_value_heads
        self.vocab_size = llm.vocab_size
        self.max_position_embeddings = llm.max_position_embeddings
        for key, value in (("bos_token_id", llm.bos_token_id), ("eos_token_id", llm.eos_token_id),
                           ("pad_token_id", llm.pad_token_id), ("tie_word_embeddings", False),
                           ("use_cache", True)):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    @property
    def xc(self) -> XComposerConfig:
        return XComposerConfig.from_dict(self.xcomposer)


class ReferenceXComposer2(PreTrainedModel, GenerationMixin):
    """IXC2-VL / IXC2-4KHD / IXC-2.5 in PyTorch; parameter names are the HF checkpoint keys.

    Build with `from_pretrained(dir_or_state_dict, config)`; all parameters are frozen and the model is in eval
    mode. Computation follows the weights' dtype (float32 by default).
    """

    config_class = ReferenceConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["InternLM2DecoderLayer"]

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__(config)
        xc = config.xc
        self.xc = xc
        self.model = InternLM2Model(xc)
        self.output = nn.Linear(xc.llm.hidden_size, xc.llm.vocab_size, bias=False)
        self.vit = VisionTower(xc.vision, xc.has_post_layernorm)
        self.vision_proj = nn.Sequential(nn.Linear(xc.proj_in, xc.proj_hidden), nn.GELU(),
                                         nn.Linear(xc.proj_hidden, xc.llm.hidden_size))
        if xc.spec.hd_tiles:
            self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, xc.proj_in))
            self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, xc.proj_in))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """No initialisation: every parameter comes from a checkpoint (`from_pretrained`)."""

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_state: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                        config: Optional[XComposerConfig] = None,
                        dtype: torch.dtype = torch.float32) -> "ReferenceXComposer2":
        """Load an HF directory (config.json + safetensors or `.bin` shards) or a {HF key: tensor} state dict.

        `config` defaults to the directory's (inferred from config.json and the tensor shapes); a state dict
        needs it. Tensors are cast to `dtype` (bf16 checkpoints are upcast to float32 by default). Missing,
        unexpected or wrongly shaped keys raise ValueError; `rotary_emb.inv_freq` buffers are ignored.
        """
        if isinstance(path_or_state, Mapping):
            if config is None:
                raise ValueError("a state dict needs an explicit XComposerConfig")
            shards = iter([dict(path_or_state)])
        else:
            path = os.fspath(path_or_state)
            config = config if config is not None else read_config(path)
            shards = iter_shards(path)
        with torch.device("meta"):
            model = cls(ReferenceConfig(config.to_dict()))
        model._load_shards(shards, dtype)
        return model.eval().requires_grad_(False)

    def _load_shards(self, shards: Iterable[Mapping[str, torch.Tensor]], dtype: torch.dtype) -> None:
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        loaded, unexpected = set(), []
        for shard in shards:
            chunk = {}
            for name, tensor in shard.items():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the config "
                                     f"expects {expected[name]}")
                chunk[name] = tensor.to(dtype=dtype, copy=True)  # the model owns its weights
            self.load_state_dict(chunk, strict=False, assign=True)
            loaded.update(chunk)
        missing = sorted(set(expected) - loaded)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                             f"{sorted(unexpected)[:8]} ({len(unexpected)})")
        for module in self.modules():  # non-persistent buffers built on the meta device
            for name, buf in list(module.named_buffers(recurse=False)):
                if not buf.is_meta:
                    continue
                if name != "position_ids":
                    raise ValueError(f"buffer {name} of {type(module).__name__} is not in the checkpoint")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)

    def set_task(self, mode: str) -> None:
        """IXC-2.5 inference mode: "base" (no task adapter), "web" (lora_web) or "write" (lora_sft + lora_dpo);
        each adapter adds B(A(x)) with no scaling to every PLoRA linear."""
        if mode not in INFER_MODES:
            raise ValueError(f"unknown task mode {mode!r}; expected one of {sorted(INFER_MODES)}")
        absent = [t for t in INFER_MODES[mode] if t not in self.xc.task_adapters]
        if absent:
            raise ValueError(f"mode {mode!r} needs task adapters {absent}, which this checkpoint does not have")
        for module in self.modules():
            if isinstance(module, PLoRALinear):
                module.task = mode

    @classmethod
    def random_state_dict(cls, config: XComposerConfig, seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random float32 weights {HF key: tensor} for `config`, for tests of configs without a golden case.

        Linear weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), embeddings,
        class embedding and separators ~ N(0, 1); Plora_B and the task adapters are non-zero, so PLoRA, the
        separators and each task mode change the outputs.
        """
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in cls(ReferenceConfig(config.to_dict())).named_parameters()}
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for name, shape in shapes.items():
            x = torch.randn(shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or "layrnorm" in name:
                x = 1 + 0.1 * x if leaf == "weight" else 0.1 * x
            elif leaf == "bias":
                x = 0.1 * x
            elif "position_embedding" in name:
                x = 0.1 * x
            elif len(shape) >= 2 and "tok_embeddings" not in name and "_GN" not in name:
                x = x / float(torch.tensor(shape[1:]).prod()) ** 0.5
            state[name] = x
        return state

    # ---- images --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_img_stages(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every stage of one image's encoding. pixels: normalised float [1, 3, H, W] (torch or numpy).

        Returns `vit_input` [T, 3, t, t] (HD: global view then tiles row-major; VL: the image), `vit_features`
        [T, g*g, C] (last encoder layer, CLS dropped), HD only `merged` [T, g/2, g/2, 4C], `assembled` [1, N, D]
        (tokens entering vision_proj: HD separator layout, VL = vit_features) and `img_embeds` [1, N, hidden].
        """
        pixels = torch.as_tensor(pixels).to(self.dtype)
        stages: Dict[str, torch.Tensor] = {}
        if self.xc.spec.hd_tiles:
            glb, tiles, h, w = split_views(pixels, self.xc.tile_size)
            stages["vit_input"] = torch.cat([glb, tiles])
            stages["vit_features"] = self.vit(stages["vit_input"])
            stages["merged"] = merged = merge_2x2(stages["vit_features"])
            stages["assembled"] = assemble_hd(merged[:1], merged[1:], h, w, self.plora_glb_GN, self.plora_sub_GN)
        else:
            if pixels.dim() != 4 or pixels.shape[:2] != (1, 3):
                raise ValueError(f"expected one image [1, 3, H, W], got shape {tuple(pixels.shape)}")
            stages["vit_input"] = pixels
            stages["vit_features"] = stages["assembled"] = self.vit(pixels)
        stages["img_embeds"] = self.vision_proj(stages["assembled"])
        return stages

    def encode_img(self, pixels: torch.Tensor) -> torch.Tensor:
        """One normalised image [1, 3, H, W] -> image embeddings [1, N, hidden] (N = config.image_tokens(h, w))."""
        return self.encode_img_stages(pixels)["img_embeds"]

    def interleave(self, pieces: Sequence[Union[TextPiece, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Concatenate text and image pieces in order into (inputs_embeds [1, L, hidden], im_mask [1, L] bool).

        A text piece is token ids (list, 1-D or [1, n] integer tensor), embedded with `tok_embeddings`, mask 0; an
        image piece is a float tensor [1, N, hidden] from `encode_img`, mask 1. BOS is not added: pass it.
        """
        embeds, masks = [], []
        for i, piece in enumerate(pieces):
            if isinstance(piece, torch.Tensor) and piece.is_floating_point():
                if piece.dim() != 3 or piece.shape[0] != 1 or piece.shape[2] != self.xc.llm.hidden_size:
                    raise ValueError(f"image piece {i} has shape {tuple(piece.shape)}, expected "
                                     f"[1, N, {self.xc.llm.hidden_size}]")
                embeds.append(piece.to(self.dtype))
                masks.append(torch.ones(1, piece.shape[1], dtype=torch.bool))
                continue
            ids = torch.as_tensor(piece, dtype=torch.long).reshape(1, -1)
            embeds.append(self.model.tok_embeddings(ids))
            masks.append(torch.zeros(1, ids.shape[1], dtype=torch.bool))
        if not embeds:
            raise ValueError("interleave needs at least one piece")
        return torch.cat(embeds, dim=1), torch.cat(masks, dim=1)

    # ---- language model ------------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                im_mask: Optional[torch.Tensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: bool = False, output_hidden_states: bool = False,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                return_dict: bool = True) -> CausalLMOutputWithPast:
        """One pass of the LLM over new tokens (all of a prompt, or decode steps after a cached prefix).

        input_ids [B, L] int or inputs_embeds [B, L, hidden] (exactly one); im_mask [B, L] (1 = image row, PLoRA
        on; None = no image rows); past_key_values: a transformers `Cache` holding earlier tokens, updated in place
        (a new DynamicCache when None and use_cache); attention_mask [B, past + L] (1 real, 0 padding);
        position_ids [B, L] (default: past .. past + L - 1, or with attention_mask the count of real tokens before
        each one). `return_dict` is accepted for transformers' generate; the result is always a
        CausalLMOutputWithPast: `.logits` [B, L, vocab] float32, `.past_key_values` (the cache, when one was used)
        and with output_hidden_states `.hidden_states`: the embeddings, each layer's output but the last, then the
        final-normed output (n_layers + 1 tensors [B, L, hidden]).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.tok_embeddings(input_ids)
        batch, length, _ = inputs_embeds.shape
        if im_mask is not None and tuple(im_mask.shape) != (batch, length):
            raise ValueError(f"im_mask has shape {tuple(im_mask.shape)}, expected {(batch, length)}")
        cache = past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None:  # left padding: count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        elif position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)
        position_ids = position_ids.reshape(-1, length).expand(batch, length)
        bias = attention_bias(length, past, attention_mask, batch, inputs_embeds.dtype, inputs_embeds.device)
        hidden, states = self.model(inputs_embeds, im_mask, position_ids, bias, cache, output_hidden_states)
        return CausalLMOutputWithPast(logits=self.output(hidden).float(), past_key_values=cache,
                                      hidden_states=tuple(states) if states is not None else None)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: Optional[Cache] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      inputs_embeds: Optional[torch.Tensor] = None,
                                      im_mask: Optional[torch.Tensor] = None, use_cache: bool = True,
                                      **kwargs: object) -> Dict[str, object]:
        """Inputs of one `generate` step, as the official model feeds them.

        The prompt (ids, or `inputs_embeds` + `im_mask`) goes in once; later steps feed only the tokens the cache
        has not seen, with no image rows (im_mask zero on decode steps). Without a cache every step recomputes the
        prompt plus the generated ids. With `inputs_embeds`, `input_ids` holds only the generated tokens.
        """
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if inputs_embeds is not None and past == 0:
            embeds, mask = inputs_embeds, im_mask
            if input_ids.shape[1]:
                if mask is None:
                    mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
                embeds = torch.cat([embeds, self.model.tok_embeddings(input_ids)], dim=1)
                mask = torch.cat([mask.bool(), torch.zeros_like(input_ids, dtype=torch.bool)], dim=1)
            inputs: Dict[str, object] = {"inputs_embeds": embeds, "im_mask": mask}
        else:
            seen = past - (inputs_embeds.shape[1] if inputs_embeds is not None else 0)
            ids, mask = input_ids[:, seen:], None
            if past == 0 and im_mask is not None:  # an id prompt with image rows; generated ids have none
                pad = torch.zeros(ids.shape[0], ids.shape[1] - im_mask.shape[1], dtype=torch.bool, device=ids.device)
                mask = torch.cat([im_mask.bool(), pad], dim=1)
            inputs = {"input_ids": ids, "im_mask": mask}
        inputs.update(past_key_values=past_key_values, use_cache=use_cache, attention_mask=attention_mask)
        return inputs
