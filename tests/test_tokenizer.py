"""InternLM2Tokenizer against the golden ids/response and against transformers' slow-tokenizer machinery.

Two independent references run on the golden tokenizer directory:
- `LlamaTokenizer(legacy=True, add_prefix_space=False)`: transformers' own SentencePiece tokenizer with the
  same splitting rules (added tokens cut out by its trie, each other piece through spm), used for encoding.
- `_OfficialLike`: transformers' `PreTrainedTokenizer` (its trie, added-token bookkeeping and `_decode`) with
  the official InternLM2Tokenizer's five spm hooks as that remote code defines them, used for encode+decode.
  LlamaTokenizer's decode differs from the official one (it drops the leading space of the first piece and
  places spaces around special tokens differently), so it is not a decode reference.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from transformers import LlamaTokenizer, PreTrainedTokenizer

from ms_xcomposer.tokenizer import InternLM2Tokenizer, TokenizerError, clean_up_tokenization

DATA = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
HF_DIR = os.path.join(DATA, "hf")


class _OfficialLike(PreTrainedTokenizer):
    """The official InternLM2Tokenizer's behaviour on top of transformers' slow-tokenizer base class."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 add_bos_token=True, clean_up_tokenization_spaces=False, **kwargs):
        self.add_bos_token = add_bos_token
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self):
        return self.sp.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        pending, out, prev_special = [], "", False
        for tok in tokens:
            if tok in self.all_special_tokens:
                out += "" if prev_special else " "
                out += self.sp.decode(pending) + tok
                pending, prev_special = [], True
            else:
                pending.append(tok)
                prev_special = False
        out = self.clean_up_tokenization(out + self.sp.decode(pending))
        # The official `_maybe_add_prefix_space` tests a token string against a set of ids: always true.
        return (" " + out)[1:]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        out = ([self.bos_token_id] if self.add_bos_token else []) + token_ids_0
        return out + (token_ids_1 or [])


TEXTS = [
    "Hello world, describe the red circle.",
    "你好，浦语·灵笔！请比较这两张图片。",
    "Mixed 中英文 text: the cat 在桌子上 sits.",
    "emoji 😀👍🏽 and 🇨🇳 flags",
    "  leading, trailing   and\t\ttabs\n\n\nnewlines   ",
    "byte fallback: ǅ Ωμέγα Ελληνικά ภาษาไทย 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x07",
    "[UNUSED_TOKEN_146]user\nDescribe this image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n",
    "<s>[UNUSED_TOKEN_146]system\nhi</s><unk>",
    "<|im_start|>user\n hi <|im_end|>\n<|action_start|><|plugin|> x<|interpreter|><|action_end|>",
    "<|im_start|<|im_start|>>  <s> </s>",
    "spaces before punctuation . , ? ! don 't it 's we 're",
    "digits 1234567890 3.14159",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained(HF_DIR)


@pytest.fixture(scope="module")
def official():
    return _OfficialLike.from_pretrained(HF_DIR)


@pytest.fixture(scope="module")
def llama():
    return LlamaTokenizer.from_pretrained(HF_DIR, legacy=True, add_prefix_space=False)


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(DATA, "golden.json"), encoding="utf-8") as f:
        js = json.load(f)
    return js, np.load(os.path.join(DATA, "golden.npz"))


def test_golden_text_ids(tok, golden):
    js, npz = golden
    # golden text_ids = BOS + ids of the source string, then 16 random ids
    expected = npz["text_ids"][0, :-16].tolist()
    assert expected == js["text"]["ids"][:-16]
    assert tok.encode(js["text"]["source_string"]) == expected
    assert tok.encode(js["text"]["source_string"], add_bos=False) == expected[1:]


def test_golden_chat_part_ids(tok, golden):
    _, npz = golden
    part1 = "[UNUSED_TOKEN_146]user\nDescribe this image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    assert tok.encode(part1, add_bos=False) == npz["chat_part1_ids"].tolist()
    assert tok.encode("", add_bos=True) == npz["chat_part0_ids"].tolist()


def test_golden_chat_response(tok, golden):
    js, npz = golden
    ids = npz["gen_greedy_ids"]
    # the official chat: decode the new ids skipping special tokens, keep the text before [UNUSED_TOKEN_145]
    response = tok.decode(ids, skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0]
    assert response == str(npz["gen_greedy_response"]) == js["gen_greedy"]["response"]


def test_chat_response_stops_at_end_of_turn(tok):
    ids = tok.encode("The answer.[UNUSED_TOKEN_145]\n<|im_end|>tail", add_bos=False) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0] == "The answer."


def test_special_ids_and_sizes(tok, golden):
    js, _ = golden
    info = js["tokenizer"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert (info["bos"], info["eos"], info["pad"]) == (1, 2, 2)
    assert tok.vocab_size == info["vocab_size(spm)"] == 1000
    assert len(tok) == info["len(tokenizer)"] == 1006
    assert tok.convert_tokens_to_ids("[UNUSED_TOKEN_146]") == info["[UNUSED_TOKEN_146]"] == 3
    assert tok.convert_tokens_to_ids(["[UNUSED_TOKEN_145]"]) == [info["[UNUSED_TOKEN_145]"]]
    for name, idx in info["added"].items():
        assert tok.convert_tokens_to_ids(name) == idx
        assert tok.convert_ids_to_tokens(idx) == name
    assert tok.convert_tokens_to_ids("no-such-piece-xyz") == tok.unk_token_id
    assert [tok.eos_token_id, tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]")] == info["chat_eos_token_id"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_references(tok, official, llama, text):
    for add_bos in (True, False):
        ours = tok.encode(text, add_bos=add_bos)
        assert ours == official(text, add_special_tokens=add_bos)["input_ids"]
        assert ours == llama(text, add_special_tokens=add_bos)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_official(tok, official, text):
    ids = tok.encode(text)
    for skip in (True, False):
        for spaces in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces) == \
                official.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)


def test_decode_random_ids_matches_official(tok, official):
    rng = random.Random(0)
    specials = [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004, 1005]
    for _ in range(200):
        n = rng.randrange(1, 25)
        ids = [rng.choice(specials) if rng.random() < 0.25 else rng.randrange(1000) for _ in range(n)]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == official.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("text", [t for t in TEXTS if clean_up_tokenization(t) == t])
def test_round_trip(tok, text):
    specials = re.compile("|".join(re.escape(t) for t in tok.all_special_tokens))
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == specials.sub("", text)


def test_decode_quirks_of_official(tok):
    # spaces between added tokens and text, a space in front of the text decoded before a special token,
    # clean-up of " ." even with clean_up_tokenization_spaces false: all as the official tokenizer
    ids = tok.encode("a .<s>b<|im_start|>c", add_bos=False)
    assert tok.decode(ids) == " a.<s>b <|im_start|> c"
    assert tok.decode(ids, spaces_between_special_tokens=False) == " a.<s>b<|im_start|>c"
    assert tok.decode(ids, skip_special_tokens=True) == "a.bc"


def test_call_like_transformers(tok):
    enc = tok("Hello world")
    assert enc.input_ids == enc["input_ids"] == tok.encode("Hello world")
    assert enc.attention_mask == [1] * len(enc.input_ids)
    batch = tok(["a", "Hello world"], add_special_tokens=False)
    assert batch.input_ids == [tok.encode("a", add_bos=False), tok.encode("Hello world", add_bos=False)]


def _copy_dir(tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(HF_DIR, d, ignore=shutil.ignore_patterns("*.bin", "*.index.json", "config.json",
                                                             "generation_config.json"))
    return d


def test_lstrip_rstrip_added_tokens_match_transformers(tmp_path):
    d = _copy_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["1000"].update(lstrip=True, rstrip=True)  # <|im_start|>
    cfg["added_tokens_decoder"]["1001"].update(rstrip=True)  # <|im_end|>
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = InternLM2Tokenizer.from_pretrained(str(d))
    ref = _OfficialLike.from_pretrained(str(d))
    for text in ["a  <|im_start|>  b <|im_end|>  c", "<|im_start|> x", "y\n<|im_start|>\n<|im_end|>\n z"]:
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode("a  <|im_start|>  b", add_bos=False) != InternLM2Tokenizer.from_pretrained(HF_DIR).encode(
        "a  <|im_start|>  b", add_bos=False)


def _legacy_dir(tmp_path):
    """The golden tokenizer in the legacy layout: no added_tokens_decoder, so added_tokens.json counts."""
    d = _copy_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"], cfg["additional_special_tokens"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_legacy_layout_matches_transformers(tmp_path):
    d = _legacy_dir(tmp_path)
    added = json.loads((d / "added_tokens.json").read_text())
    added.update({"<x>": 1006, "<x><y>": 1007, "<y>": 1008})  # overlapping: the longest match wins
    (d / "added_tokens.json").write_text(json.dumps(added))
    ours = InternLM2Tokenizer.from_pretrained(str(d))
    ref = _OfficialLike.from_pretrained(str(d))
    assert len(ours) == len(ref) == 1009
    assert ours.all_special_ids == ref.all_special_ids
    for text in ["a<x><y>b", "<x><x><y><y>", "<x>y><y>", TEXTS[8]]:
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode("<x><y>", add_bos=False) == [1007]
    ids = ours.encode("a<x><y>b<y><|im_start|>c<s>")
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_added_tokens_json_ignored_with_added_tokens_decoder(tmp_path):
    d = _copy_dir(tmp_path)
    (d / "added_tokens.json").write_text(json.dumps({"<x>": 1006}))
    assert InternLM2Tokenizer.from_pretrained(str(d)).encode("<x>") == \
        _OfficialLike.from_pretrained(str(d))("<x>")["input_ids"] != [1, 1006]


def test_without_optional_json_files(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(os.path.join(HF_DIR, "tokenizer.model"), d / "tokenizer.model")
    bare = InternLM2Tokenizer.from_pretrained(str(d))
    assert len(bare) == 1000
    assert bare.encode("<s>hi</s>") == [1, 1] + bare.encode("hi", add_bos=False) + [2]
    assert bare.encode("<|im_start|>", add_bos=False) != [1000]


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        InternLM2Tokenizer.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        InternLM2Tokenizer.from_pretrained(str(tmp_path))
    d = _copy_dir(tmp_path)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        InternLM2Tokenizer.from_pretrained(str(d))
    d = _legacy_dir(tmp_path / "legacy")
    (d / "added_tokens.json").write_text(json.dumps({"<|im_start|>": "x"}))
    with pytest.raises(TokenizerError, match="not an integer"):
        InternLM2Tokenizer.from_pretrained(str(d))
    (d / "added_tokens.json").unlink()
    (d / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        InternLM2Tokenizer.from_pretrained(str(d))


def test_unknown_special_token_is_an_error(tmp_path):
    d = _copy_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"].append("<|not_in_vocab|>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="not_in_vocab"):
        InternLM2Tokenizer.from_pretrained(str(d))


def test_bad_ids_and_inputs(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, 1006])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")
