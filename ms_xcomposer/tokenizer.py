"""The InternLM2 tokenizer of the XComposer2 checkpoints, without transformers' remote code.

The official `InternLM2Tokenizer` (Hugging Face remote code) is a thin SentencePiece wrapper run by the slow
`PreTrainedTokenizer` machinery. This module reproduces what that combination does:

- Encoding: the text is first cut at every added or special token (`<s>`, `</s>`, `<unk>`, `<|im_start|>`, ...;
  leftmost match, longest token first), each token becomes its id, and every other non-empty piece goes through
  `SentencePieceProcessor.encode` on its own (the "legacy" behaviour: no dummy prefix is invented between
  pieces; the spm model's own normaliser settings apply to each piece). Tokens such as `[UNUSED_TOKEN_146]`
  are user-defined pieces of the spm model itself, so spm keeps them whole. BOS is prepended on request.
- Decoding: as transformers' `_decode` with the official `convert_tokens_to_string`: special ids are dropped
  with `skip_special_tokens`; added tokens past the spm vocabulary are emitted literally and joined to the
  surrounding text with single spaces; inside a run, special tokens are emitted literally with one space
  inserted in front of the pieces decoded before them (a quirk of the official code, kept for parity); each
  run gets transformers' `clean_up_tokenization` (" ." -> "." etc.), which the official code applies
  unconditionally. Its "prefix space" step is a no-op (it compares token strings with a set of ids).

`tokenizer_config.json` is read when present; as in transformers, `special_tokens_map.json` and
`added_tokens.json` are read only when the config has no `added_tokens_decoder` (the legacy layout).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import sentencepiece as spm

VOCAB_FILE = "tokenizer.model"
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer directory or an id/token given to the tokenizer is not usable."""


@dataclass(frozen=True)
class AddedToken:
    """An added token as transformers' `AddedToken`: content, id and whitespace stripping."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class Encoding(dict):
    """Result of calling the tokenizer: `{"input_ids": [...], "attention_mask": [...]}` with attribute access."""

    @property
    def input_ids(self) -> Union[List[int], List[List[int]]]:
        return self["input_ids"]

    @property
    def attention_mask(self) -> Union[List[int], List[List[int]]]:
        return self["attention_mask"]


class InternLM2Tokenizer:
    """SentencePiece tokenizer with InternLM2's added/special tokens; ids equal the official tokenizer's.

    Ids are Python ints; `encode` returns `list[int]`, `decode` accepts any iterable of ints (a numpy array too).
    """

    def __init__(
        self,
        vocab_file: str,
        added_tokens: Sequence[AddedToken] = (),
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: Optional[str] = "</s>",
        additional_special_tokens: Sequence[str] = (),
        add_bos_token: bool = True,
    ) -> None:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece model {vocab_file!r} not found")
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.Load(vocab_file)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{vocab_file!r} is not a SentencePiece model: {e}") from None
        self.add_bos_token = add_bos_token
        self._added: Dict[str, AddedToken] = {t.content: t for t in added_tokens}
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        self.all_special_tokens: List[str] = []
        for tok in [bos_token, eos_token, unk_token, pad_token, *self.additional_special_tokens]:
            if tok is not None and tok not in self.all_special_tokens:
                self.all_special_tokens.append(tok)
        # Special tokens are split out of the text too, with the id the vocabulary gives them.
        for tok in self.all_special_tokens:
            if tok not in self._added:
                self._added[tok] = AddedToken(tok, self._piece_id(tok))
        self._id_to_added = {t.id: t.content for t in self._added.values()}
        self.all_special_ids = [self._added[t].id for t in self.all_special_tokens]
        # transformers joins these with spaces when decoding, outside the sentencepiece runs.
        self._legacy_added = {c for c in self._added if c not in self.all_special_tokens} | {
            t for t in self.additional_special_tokens if self._added[t].id >= self.vocab_size
        }
        contents = sorted(self._added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str) -> "InternLM2Tokenizer":
        """Load `path/tokenizer.model` plus the optional JSON files of an HF (or converted) directory."""
        vocab_file, config, added, kwargs = read_tokenizer_dir(path)
        return cls(vocab_file, added_tokens=list(added.values()),
                   add_bos_token=bool(config.get("add_bos_token", True)), **kwargs)

    # ---- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Pieces in the SentencePiece model (added tokens past it are not counted, as in transformers)."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return len(set(range(self.vocab_size)) | set(self._id_to_added))

    @property
    def bos_token_id(self) -> int:
        return self._added[self.bos_token].id

    @property
    def eos_token_id(self) -> int:
        return self._added[self.eos_token].id

    @property
    def unk_token_id(self) -> int:
        return self._added[self.unk_token].id

    @property
    def pad_token_id(self) -> Optional[int]:
        return None if self.pad_token is None else self._added[self.pad_token].id

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, List[int]]:
        """Id of a token (added token or spm piece; unknown pieces give the unk id), or a list of ids."""
        if isinstance(tokens, str):
            added = self._added.get(tokens)
            return added.id if added is not None else self.sp_model.piece_to_id(tokens)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[str, List[str]]:
        """Token string of an id (added token content or spm piece), or a list of them."""
        if isinstance(ids, Iterable):
            return [self.convert_ids_to_tokens(i) for i in ids]
        idx = int(ids)
        if idx in self._id_to_added:
            return self._id_to_added[idx]
        self._check_piece_id(idx)
        return self.sp_model.id_to_piece(idx)

    # ---- encoding ------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        """Token ids of `text`, with BOS first when `add_bos` (and the config's add_bos_token) is true."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_bos and self.add_bos_token else []
        for chunk in self._split_text(text):
            added = self._added.get(chunk)
            if added is not None:
                ids.append(added.id)
            elif chunk:
                ids.extend(self.sp_model.encode(chunk))
        return ids

    def __call__(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True) -> Encoding:
        """`{"input_ids", "attention_mask"}` for one text or a list of texts (no padding), like transformers."""
        if isinstance(text, str):
            ids = self.encode(text, add_bos=add_special_tokens)
            return Encoding(input_ids=ids, attention_mask=[1] * len(ids))
        batch = [self.encode(t, add_bos=add_special_tokens) for t in text]
        return Encoding(input_ids=batch, attention_mask=[[1] * len(ids) for ids in batch])

    def _split_text(self, text: str) -> List[str]:
        """Cut text at added tokens; an lstrip/rstrip token eats the whitespace beside it (transformers rule)."""
        if self._split_re is None:
            return [text]
        chunks = self._split_re.split(text)
        for i in range(1, len(chunks), 2):  # odd positions hold the matched tokens
            tok = self._added[chunks[i]]
            if tok.rstrip and chunks[i + 1]:
                chunks[i + 1] = chunks[i + 1].lstrip()
            if tok.lstrip and chunks[i - 1]:
                chunks[i - 1] = chunks[i - 1].rstrip()
        return chunks

    # ---- decoding ------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
               spaces_between_special_tokens: bool = True) -> str:
        """Text of `ids` exactly as the official tokenizer's `decode` gives it (see the module docstring).

        The official chat decodes the new ids with `skip_special_tokens=True` and keeps the text before the
        first `[UNUSED_TOKEN_145]` (an ordinary spm piece, so it is decoded as text).
        """
        id_list = [int(i) for i in ids]
        if skip_special_tokens:
            special_ids = set(self.all_special_ids)
            id_list = [i for i in id_list if i not in special_ids]
        tokens = self.convert_ids_to_tokens(id_list)
        sub_texts: List[str] = []
        run: List[str] = []
        for token in tokens:
            if token in self._legacy_added:
                if run:
                    text = self._tokens_to_string(run)
                    if text:
                        sub_texts.append(text)
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._tokens_to_string(run))
        return (" " if spaces_between_special_tokens else "").join(sub_texts)

    def _tokens_to_string(self, tokens: Sequence[str]) -> str:
        """The official `convert_tokens_to_string`: spm-decode runs, special tokens literal, then clean-up."""
        out = ""
        pieces: List[str] = []
        prev_is_special = False
        for token in tokens:
            if token in self.all_special_tokens:
                if not prev_is_special:
                    out += " "  # lands before the pending pieces, not before the special token
                out += self.sp_model.decode_pieces(pieces) + token
                pieces = []
                prev_is_special = True
            else:
                pieces.append(token)
                prev_is_special = False
        out += self.sp_model.decode_pieces(pieces)
        return clean_up_tokenization(out)

    def _piece_id(self, token: str) -> int:
        idx = self.sp_model.piece_to_id(token)
        if self.sp_model.id_to_piece(idx) != token:
            raise TokenizerError(
                f"special token {token!r} is neither an added token nor a piece of {self.vocab_file!r}"
            )
        return idx

    def _check_piece_id(self, idx: int) -> None:
        if not 0 <= idx < self.vocab_size:
            raise TokenizerError(
                f"token id {idx} is outside the vocabulary (0..{self.vocab_size - 1} and added ids "
                f"{sorted(i for i in self._id_to_added if i >= self.vocab_size)})"
            )


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: drop the space before punctuation and English contractions."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _read_special_tokens(source: Mapping[str, object], kwargs: Dict[str, object]) -> None:
    """Copy bos/eos/unk/pad and additional_special_tokens (strings or AddedToken dicts) into kwargs."""
    for role in _SPECIAL_ROLES:
        if role in source:
            kwargs[role] = _token_content(source[role])
    if "additional_special_tokens" in source:
        kwargs["additional_special_tokens"] = [_token_content(t) for t in source["additional_special_tokens"] or []]



def read_tokenizer_dir(path: str) -> Tuple[str, dict, Dict[str, AddedToken], Dict[str, object]]:
    """(vocab file, tokenizer_config.json, added tokens by content, special-token arguments) of an HF (or converted)
    tokenizer directory, read as transformers reads them; errors name the file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} not found")
    vocab_file = os.path.join(path, VOCAB_FILE)
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"{path!r} has no {VOCAB_FILE} (the SentencePiece model)")
    config = _read_json(os.path.join(path, "tokenizer_config.json"))

    # As transformers: a config with `added_tokens_decoder` is complete on its own; otherwise (legacy
    # layout) special_tokens_map.json overrides the config and added_tokens.json lists the added tokens.
    added: Dict[str, AddedToken] = {}
    kwargs: Dict[str, object] = {}
    _read_special_tokens(config, kwargs)
    if "added_tokens_decoder" in config:
        for idx, spec in config["added_tokens_decoder"].items():
            where = f"tokenizer_config.json added_tokens_decoder[{idx!r}]"
            if not isinstance(spec, Mapping) or not isinstance(spec.get("content"), str):
                raise TokenizerError(f"{path}: {where} has no 'content' string")
            if spec.get("single_word"):
                raise TokenizerError(f"{path}: {where}: single_word added tokens are not supported")
            added[spec["content"]] = AddedToken(spec["content"], _as_id(idx, where),
                                                bool(spec.get("lstrip")), bool(spec.get("rstrip")))
    else:
        extra = kwargs.get("additional_special_tokens", [])
        _read_special_tokens(_read_json(os.path.join(path, "special_tokens_map.json")), kwargs)
        kwargs["additional_special_tokens"] = list(extra) + [
            t for t in kwargs.get("additional_special_tokens", []) if t not in extra]
        for content, idx in _read_json(os.path.join(path, "added_tokens.json")).items():
            added[content] = AddedToken(content, _as_id(idx, f"{path}: added_tokens.json[{content!r}]"))
    return vocab_file, config, added, kwargs


def _read_json(path: str) -> Dict[str, object]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _as_id(value: object, where: str) -> int:
    try:
        idx = int(value)
    except (TypeError, ValueError):
        raise TokenizerError(f"{where}: token id {value!r} is not an integer") from None
    if idx < 0:
        raise TokenizerError(f"{where}: token id {idx} is negative")
    return idx


def _token_content(value: object) -> Optional[str]:
    """A special token given as a string or as an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token {value!r} is neither a string nor an object with 'content'")
