"""The LLaMA SentencePiece tokenizer of llava-hf checkpoints, equal to transformers' slow `LlamaTokenizer`.

Built on `ms_xcomposer.tokenizer.InternLM2Tokenizer`, which already reproduces the slow `PreTrainedTokenizer`
machinery (cutting the text at added tokens with their lstrip/rstrip, special ids, added tokens decoded apart
and joined with spaces). What LLaMA changes, as transformers 4.57's `LlamaTokenizer` does it:

- `legacy` (tokenizer_config.json; transformers' default, with a warning, is true). legacy=true: each piece of
  text between added tokens is encoded by the SentencePiece model as is (with its dummy-prefix "▁").
  legacy=false (llava-hf): the model is loaded with `add_dummy_prefix` off, the whole text gets one "▁" in front
  (`add_prefix_space`, default true), "▁" in the text becomes a space, and a piece starting with "▁" or a space
  is encoded as `unk_token + piece` with the unk pieces cut off, so no prefix is invented after an added token;
  a lone leading "▁" before a special token is dropped.
- BOS (`add_bos_token`, default true) and EOS (`add_eos_token`, default false) around the ids.
- `padding_side` (tokenizer_config.json; llava-hf's: left): where the processor pads a batch. Without it, left,
  as the LlamaTokenizerFast that AutoTokenizer / AutoProcessor load (the slow class would pad right).
- Decoding: transformers' `LlamaTokenizer.convert_tokens_to_string` (the first piece loses its "▁" when
  add_prefix_space; special tokens are written literally, preceded by a space only in legacy mode) and
  `clean_up_tokenization` only when `clean_up_tokenization_spaces` is true (false for llava-hf). Added tokens that
  are not special are still decoded apart and joined with single spaces (`spaces_between_special_tokens`).
- `extra_special_tokens` of tokenizer_config.json (newer llava-hf: {"image_token": "<image>"}) are special
  tokens (skipped with skip_special_tokens, written literally inside runs) but not additional special tokens.

legacy=false needs the `protobuf` package to edit the model's normaliser, as transformers does.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

from ms_xcomposer.tokenizer import (AddedToken, InternLM2Tokenizer, TokenizerError, clean_up_tokenization,
                                    read_tokenizer_dir)

SPIECE_UNDERLINE = "▁"


class LlamaTokenizer(InternLM2Tokenizer):
    """SentencePiece LLaMA tokenizer; ids and texts equal transformers' slow `LlamaTokenizer` on the same files."""

    def __init__(self, vocab_file: str, added_tokens: Sequence[AddedToken] = (), bos_token: str = "<s>",
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: Optional[str] = None,
                 additional_special_tokens: Sequence[str] = (), add_bos_token: bool = True, *,
                 extra_special_tokens: Sequence[str] = (), add_eos_token: bool = False, legacy: bool = True,
                 add_prefix_space: bool = True, clean_up_tokenization_spaces: bool = False,
                 padding_side: str = "left") -> None:
        super().__init__(vocab_file, added_tokens, bos_token, eos_token, unk_token, pad_token,
                         additional_special_tokens, add_bos_token)
        self.add_eos_token, self.legacy, self.add_prefix_space = add_eos_token, legacy, add_prefix_space
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side {padding_side!r}: expected 'left' or 'right'")
        self.padding_side = padding_side
        for tok in extra_special_tokens:
            if tok not in self._added:
                raise TokenizerError(f"extra special token {tok!r} is not an added token of {vocab_file!r}")
            if tok not in self.all_special_tokens:
                self.all_special_tokens.append(tok)
                self.all_special_ids.append(self._added[tok].id)
            self._legacy_added.discard(tok)  # special tokens are decoded inside the runs
        if not legacy:
            self.sp_model = _without_dummy_prefix(self.sp_model, vocab_file)
        self._unk_length = len(self.sp_model.encode(self.unk_token))

    @classmethod
    def from_pretrained(cls, path: str) -> "LlamaTokenizer":
        """Load `path/tokenizer.model` with tokenizer_config.json (and, in the legacy file layout,
        special_tokens_map.json / added_tokens.json), as transformers' `LlamaTokenizer.from_pretrained`."""
        vocab_file, config, added, kwargs = read_tokenizer_dir(path)
        extra = config.get("extra_special_tokens") or {}
        if not isinstance(extra, (Mapping, list)):
            raise TokenizerError(f"{path}: tokenizer_config.json extra_special_tokens should be an object or a list")
        flags = {}
        for key, default in (("add_bos_token", True), ("add_eos_token", False), ("legacy", True),
                             ("add_prefix_space", True), ("clean_up_tokenization_spaces", False)):
            value = config.get(key)
            if value is not None and not isinstance(value, bool):
                raise TokenizerError(f"{path}: tokenizer_config.json {key} should be true or false, got {value!r}")
            flags[key] = default if value is None else value
        side = config.get("padding_side", "left")
        if side not in ("left", "right"):
            raise TokenizerError(f"{path}: tokenizer_config.json padding_side {side!r}: expected 'left' or 'right'")
        return cls(vocab_file, added_tokens=list(added.values()), padding_side=side,
                   extra_special_tokens=list(extra.values() if isinstance(extra, Mapping) else extra),
                   **flags, **kwargs)

    # ---- encoding ------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[str]:
        """Token strings of `text` (pieces and added tokens), as transformers' `LlamaTokenizer.tokenize`."""
        if not isinstance(text, str):
            raise TokenizerError(f"tokenize expects a str, got {type(text).__name__}")
        if self.legacy or not text:
            return self._tokenize_chunks(text)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = self._tokenize_chunks(text)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        """Token ids of `text`; with `add_bos` (transformers' add_special_tokens) BOS / EOS as the config says."""
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        if add_bos:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def _tokenize_chunks(self, text: str) -> List[str]:
        tokens: List[str] = []
        for chunk in self._split_text(text):
            if chunk in self._added:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._tokenize_piece(chunk))
        return tokens

    def _tokenize_piece(self, text: str) -> List[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        # Without the dummy prefix SentencePiece strips a leading "▁"; encoding after the unk token keeps it.
        tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_length:] if len(tokens) >= self._unk_length else tokens

    # ---- decoding ------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True) -> str:
        """Text of `ids` as transformers' `decode` gives it (see the module docstring)."""
        text = super().decode(ids, skip_special_tokens, spaces_between_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def _tokens_to_string(self, tokens: Sequence[str]) -> str:
        """transformers' `LlamaTokenizer.convert_tokens_to_string`."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]  # the prefix space added when encoding
        out, pieces, prev_is_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                prev_is_special, pieces = True, []
            else:
                if prev_is_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                pieces.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(pieces)


def _without_dummy_prefix(sp_model, vocab_file: str):
    """A copy of the SentencePiece model with `add_dummy_prefix` off (transformers' legacy=false loading)."""
    import sentencepiece as spm

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # the module needs protobuf
        raise TokenizerError(f"{vocab_file!r}: a legacy=false LLaMA tokenizer needs the protobuf package "
                             "(pip install protobuf), as in transformers") from None
    model = sentencepiece_model_pb2.ModelProto.FromString(sp_model.serialized_model_proto())
    model.normalizer_spec.add_dummy_prefix = False
    out = spm.SentencePieceProcessor()
    out.LoadFromSerializedProto(model.SerializeToString())
    return out
