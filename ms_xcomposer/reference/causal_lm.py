"""The InternLM2 causal LM of the references (XComposer2's, with PLoRA; InternVL's `language_model`, without):
a `transformers.PreTrainedModel` with `GenerationMixin`, so greedy / sampling / beam search (KV cache, beam
reordering, logits processors) come from transformers' own `generate`, an implementation independent of ours.

Subclasses build `self.model` (`InternLM2Model`) and `self.output` (the LM head); this class runs them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ms_xcomposer.config import LLMConfig
from ms_xcomposer.reference.internlm2 import attention_bias


def generation_fields(llm: LLMConfig, kwargs: Dict[str, object]) -> None:
    """Set in a `PretrainedConfig`'s kwargs (unless given) the token ids transformers' generation reads."""
    for key, value in (("bos_token_id", llm.bos_token_id), ("eos_token_id", llm.eos_token_id),
                       ("pad_token_id", llm.pad_token_id), ("tie_word_embeddings", False), ("use_cache", True)):
        kwargs.setdefault(key, value)


def llm_shape_fields(config, llm: LLMConfig) -> None:
    """The size fields transformers' generation and DynamicCache read, copied from `llm` onto `config`."""
    config.hidden_size = llm.hidden_size
    config.num_hidden_layers = llm.num_hidden_layers
    config.num_attention_heads = llm.num_attention_heads
    config.num_key_value_heads = llm.num_key_value_heads
    config.vocab_size = llm.vocab_size
    config.max_position_embeddings = llm.max_position_embeddings


class InternLM2CausalLM(PreTrainedModel, GenerationMixin):
    """InternLM2 decoder (`model`) + LM head (`output`) behind transformers' generation; subclasses build both."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["InternLM2DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """No initialisation: every parameter comes from a checkpoint (`from_pretrained`)."""

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
