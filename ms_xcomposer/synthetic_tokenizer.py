"""A small InternLM2-style tokenizer trained on the spot with SentencePiece's trainer (the demo's tokenizer).

`write_tokenizer_files(dst, vocab_size)` trains a BPE model on a built-in English + Chinese corpus and writes
the files of a real XComposer2 repository: `tokenizer.model`, `tokenizer_config.json` (with
`added_tokens_decoder`), `special_tokens_map.json` and `added_tokens.json`. It has the real tokenizer's
structure at a small size:

- pieces: unk/bos/eos = 0/1/2 (`<unk>`, `<s>`, `</s>`), then the user-defined pieces `[UNUSED_TOKEN_146]` = 3
  and `[UNUSED_TOKEN_145]` = 4 (the chat template's turn marks), the 256 byte-fallback pieces, then BPE merges
  and characters, `vocab_size` pieces in all;
- no normalisation, no dummy prefix, digits split, byte fallback (so "\\n" is the byte piece `<0x0A>`);
- the six chat tokens `<|im_start|>` .. `<|plugin|>` are added tokens past the SentencePiece vocabulary
  (`vocab_size` .. `vocab_size + 5`), as in the released repos (92544 .. 92549).

The trainer runs single-threaded on a fixed corpus, so the same arguments give the same model.
"""
from __future__ import annotations

import io
import json
import os
import random
from typing import Dict, List, Sequence

from ms_xcomposer.models.xcomposer2.config import DEFAULT_META_INSTRUCTION
from ms_xcomposer.models.xcomposer2.prompt import TURN_END, TURN_START

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}

# SentencePiece trainer options of the released InternLM2 tokenizer's structure (the size aside).
TRAINER_OPTIONS = dict(
    model_type="bpe", character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
    user_defined_symbols=[TURN_START, TURN_END], byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, num_threads=1,
)

_WORDS = """a an the of in on at with and or but this that these those it its they their there is are was were
be has have what where which who how why when can could would should will please tell me about answer question
describe description detail details carefully briefly compare difference similar image images picture photo
photograph scene view window door house home street road car bus train bicycle tree trees flower flowers garden
park river lake sea ocean beach sand mountain hill hills sky cloud clouds sun moon star light shadow colour color
colours red green blue yellow orange purple white black grey brown pink dark bright small large big little tall
short wide narrow round square left right top bottom middle centre front behind near far above below inside
outside person people man woman child children boy girl dog cat bird horse cow sheep fish table chair book cup
bottle plate bowl food fruit apple banana bread cake coffee tea water glass wall floor roof kitchen room bed sofa
lamp clock computer phone screen keyboard paper pen text sign letter number word line shape shapes circle
triangle rectangle pattern stripe dot corner edge background foreground shows showing contains containing
standing sitting walking running looking holding wearing playing reading writing eating drinking smiling happy
quiet busy sunny rainy snowy cloudy morning evening night day summer winter spring autumn first second third
another other each both all some many several few one two three four five six seven eight nine ten""".split()
_CHINESE = ("这是一张图片。", "图中有一只猫和一只狗。", "天空是蓝色的。", "你好，请描述这张图片。", "谁在图中？",
            "请比较这两张图片。", "写两个形状。", "房子是红色的，太阳是黄色的。")


def corpus(seed: int = 0, sentences: int = 3000) -> List[str]:
    """Training sentences (one per item, no newlines): captions and questions built from a fixed word list,
    the chat template's pieces, the default meta instruction and some Chinese."""
    rng = random.Random(seed)
    lines = DEFAULT_META_INSTRUCTION.split("\n") * 3
    lines += [f"{TURN_START}user", f"{TURN_START}assistant", f"Describe this image.{TURN_END}", TURN_END] * 20
    lines += list(_CHINESE) * 10
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(".?!,")
        if rng.random() < 0.2:
            text += f" {rng.randint(0, 2025)}"
        lines.append(text)
    return lines


def train_sentencepiece(vocab_size: int, seed: int = 0, **overrides: object) -> bytes:
    """The serialized SentencePiece model (BPE, `vocab_size` pieces) trained on `corpus(seed)`.

    `overrides` replace entries of TRAINER_OPTIONS, for other tokenizer structures (e.g. LLaMA's: a dummy
    prefix and no user-defined pieces, `add_dummy_prefix=True, user_defined_symbols=[]`).
    """
    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(seed)), model_writer=out, vocab_size=vocab_size,
                                       minloglevel=2, **{**TRAINER_OPTIONS, **overrides})
    except RuntimeError as e:  # e.g. fewer pieces than the 3 specials + 2 marks + 256 bytes + corpus characters
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on the demo corpus: {reason}") from None
    return out.getvalue()


def _token_entry(content: str) -> Dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_json_files(vocab_size: int, extra_tokens: Sequence[str] = ()) -> Dict[str, dict]:
    """{file name: content} of the JSON tokenizer files of the released repos, for a `vocab_size`-piece model;
    `extra_tokens` are special added tokens after the chat tokens (InternVL's `<img>`, `</img>`, ...)."""
    specials = (*CHAT_TOKENS, *extra_tokens)
    added = {tok: vocab_size + i for i, tok in enumerate(specials)}
    decoder = {str(i): {**_token_entry(tok), "special": True} for i, tok in SPECIALS.items()}
    decoder.update({str(i): {**_token_entry(tok), "special": True} for tok, i in added.items()})
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(specials),
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656, "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    special_map = {"additional_special_tokens": list(specials), "bos_token": _token_entry("<s>"),
                   "eos_token": _token_entry("</s>"), "pad_token": _token_entry("</s>"),
                   "unk_token": _token_entry("<unk>")}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map, "added_tokens.json": added}


def write_tokenizer_files(dst: str, vocab_size: int, seed: int = 0, extra_tokens: Sequence[str] = ()) -> List[str]:
    """Train the tokenizer and write its files into the existing directory `dst` (`extra_tokens`: special added
    tokens after the chat tokens); returns the file names."""
    model = train_sentencepiece(vocab_size, seed)
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
        f.write(model)
    names = ["tokenizer.model"]
    for name, content in tokenizer_json_files(vocab_size, extra_tokens).items():
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        names.append(name)
    return names


def write_llama_tokenizer(dst: str, vocab_size: int = 1000, legacy: bool = False,
                          extra_special: bool = False) -> str:
    """A llava-hf-style LLaMA tokenizer directory: LLaMA's SentencePiece structure (BPE, dummy prefix, byte
    fallback, no user-defined pieces) at `vocab_size` pieces, and tokenizer_config.json as llava-1.5-7b-hf's
    (`legacy`, <image> = vocab_size and <pad> = vocab_size + 1 added, as 32000 / 32001 there; pad <pad>, left
    padding). extra_special: also name <image> in `extra_special_tokens` (transformers' `tokenizer.image_token`).
    Returns `dst`."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
        f.write(train_sentencepiece(vocab_size, add_dummy_prefix=True, user_defined_symbols=[]))
    decoder = {str(i): {**_token_entry(tok), "special": True} for i, tok in SPECIALS.items()}
    decoder.update({str(vocab_size): {**_token_entry("<image>"), "special": True},
                    str(vocab_size + 1): {**_token_entry("<pad>"), "special": True}})
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
              "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": legacy,
              "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "left",
              "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
              "unk_token": "<unk>", "use_default_system_prompt": False}
    if extra_special:
        config["extra_special_tokens"] = {"image_token": "<image>"}
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(dst)
