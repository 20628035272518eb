"""The toy family's MindSpore side (step 4 and 5 of the checklist): its model on the generic engine, built from
the shared InternLM2 decoder with PLoRA off, and its processor (a plain text prompt)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms

from ms_xcomposer.conversation import OptionError, PreparedInputs
from ms_xcomposer.engine import CausalLM
from ms_xcomposer.models.internlm2 import InternLM2Model
from ms_xcomposer.models.layers import Linear
from ms_xcomposer.tokenizer import InternLM2Tokenizer


class ToyForCausalLM(CausalLM):
    """`model.*` (InternLM2 decoder, no PLoRA) and `output` (the HF checkpoint's `lm_head`)."""

    def __init__(self, config, dtype=ms.float32, compute_dtype=None):
        super().__init__(compute_dtype)
        self.config = config
        self.model = InternLM2Model(config.llm, dtype=dtype)
        self.output = Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False, dtype=dtype)

    @property
    def decoder(self):
        return self.model

    @property
    def lm_head(self):
        return self.output

    @property
    def llm_config(self):
        return self.config.llm

    def step_inputs(self, extras: Mapping[str, object], batch: int, seq: int):
        super().step_inputs(extras, batch, seq)  # refuses extras
        return None, (False, "base")  # the InternLM2 layers' flags: no PLoRA, no task adapter


class ToyProcessor:
    """"User: {query}\\nAssistant:" turns after BOS; stops at EOS; no images."""

    image_placeholder, auto_image_placeholder, stop_text = "<image>", False, None

    def __init__(self, tokenizer: InternLM2Tokenizer, config):
        self.tokenizer, self.config = tokenizer, config
        self.eos_token_ids = (tokenizer.eos_token_id,)

    @classmethod
    def from_pretrained(cls, path: str, config=None) -> "ToyProcessor":
        return cls(InternLM2Tokenizer.from_pretrained(path), config)

    def prompt(self, query: str, history: Sequence[Tuple[str, str]] = ()) -> str:
        turns = "".join(f"User: {q}\nAssistant: {a}\n" for q, a in history)
        return f"{turns}User: {query}\nAssistant:"

    def prepare(self, model, query: str, images: Optional[Sequence[object]] = None,
                history: Sequence[Tuple[str, str]] = (), **options) -> PreparedInputs:
        if options:
            raise OptionError(f"the toy family takes no options, got {sorted(options)}")
        if images:
            raise ValueError("the toy family is text-only")
        ids = self.tokenizer.encode(self.prompt(query, history), add_bos=True)
        return PreparedInputs(model.embed_tokens(np.asarray([ids], np.int32)), {}, [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
