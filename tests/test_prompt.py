"""Prompt building per variant (pure Python): the official template, meta / BOS / placeholder rules, errors.

Expected strings are written out literally from the official `interleav_wrap_chat` / `build_inputs` rules; the
token ids of the golden IXC-2.5 chat prompt come from golden.npz (made by the official code).
"""
import os
import warnings

import numpy as np
import pytest

from ms_xcomposer.config import ConfigError
from ms_xcomposer.models.xcomposer2.config import DEFAULT_META_INSTRUCTION, VARIANTS
from ms_xcomposer.models.xcomposer2.prompt import (
    DEFAULT_MAX_LENGTH, ImageSlot, PromptError, TextPiece, build_chat_prompt, conversation_text, effective_hd_num,
    kept_length,
)
from ms_xcomposer.tokenizer import InternLM2Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
U, A = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
META = DEFAULT_META_INSTRUCTION
SYSTEM = f"{U}system\n{META}{A}\n"


def turn(query: str) -> str:
    return f"{U}user\n{query}{A}\n{U}assistant\n"


@pytest.fixture(scope="module")
def tok():
    return InternLM2Tokenizer.from_pretrained(os.path.join(DATA, "hf"))


@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(DATA, "golden.npz")) as g:
        return {k: g[k] for k in ("chat_part0_ids", "chat_part1_ids")}


# ---- template -------------------------------------------------------------------------------------------
def test_default_meta_instruction_is_the_official_text():
    assert META.count("\n") == 3 and not META.endswith("\n")
    assert META.startswith("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n- ")
    assert META.endswith("is capable of comprehending and articulating responses effectively based on the "
                         "provided image.")


def test_conversation_text_with_meta_and_history():
    text = conversation_text("Q3", [("Q1", "A1"), ("Q2", "A2")], "SYS")
    assert text == (f"{U}system\nSYS{A}\n"
                    f"{U}user\nQ1{A}\n{U}assistant\nA1{A}\n"
                    f"{U}user\nQ2{A}\n{U}assistant\nA2{A}\n"
                    f"{U}user\nQ3{A}\n{U}assistant\n")
    assert conversation_text("Q", [], "") == turn("Q")  # an empty meta instruction sends no system turn


# ---- IXC-2.5 ----------------------------------------------------------------------------------------------
def test_ixc25_single_image_goes_first_with_a_lone_bos(tok, golden):
    pieces = build_chat_prompt("Describe this image.", [], "ixc2.5", n_images=1)
    assert pieces == [TextPiece("", True), ImageSlot(0), TextPiece(turn("Describe this image."), False)]
    ids = [tok.encode(p.text, add_bos=p.add_bos) for p in pieces if isinstance(p, TextPiece)]
    assert ids == [golden["chat_part0_ids"].tolist(), golden["chat_part1_ids"].tolist()]


def test_ixc25_meta_only_with_use_meta():
    assert build_chat_prompt("Q", [], "ixc2.5", 1, use_meta=False)[2] == TextPiece(turn("Q"), False)
    pieces = build_chat_prompt("Q", [], "ixc2.5", 1, use_meta=True)
    assert pieces == [TextPiece("", True), ImageSlot(0), TextPiece(SYSTEM + turn("Q"), False)]


def test_ixc25_placeholder_in_query_and_multi_image():
    pieces = build_chat_prompt("Image1 <ImageHere>; Image2 <ImageHere>; compare", [], "ixc2.5", 2)
    assert pieces == [TextPiece(f"{U}user\nImage1 ", True), ImageSlot(0), TextPiece("; Image2 ", False),
                      ImageSlot(1), TextPiece(f"; compare{A}\n{U}assistant\n", False)]
    assert effective_hd_num("ixc2.5", 2, 24) == 6  # several images: hd_num 6 whatever was asked
    assert effective_hd_num("ixc2.5", 1, 4) == 4
    assert effective_hd_num("ixc2.5", 1) == 24


def test_ixc25_history_placeholders_count_and_images_accumulate():
    history = [("Image1 <ImageHere>; what is it?", "A car.")]
    pieces = build_chat_prompt("Image2 <ImageHere>; and this?", history, "ixc2.5", 2, use_meta=True)
    assert pieces == [TextPiece(SYSTEM + f"{U}user\nImage1 ", True), ImageSlot(0),
                      TextPiece(f"; what is it?{A}\n{U}assistant\nA car.{A}\n{U}user\nImage2 ", False),
                      ImageSlot(1), TextPiece(f"; and this?{A}\n{U}assistant\n", False)]


def test_ixc25_adjacent_placeholders_skip_empty_later_parts():
    pieces = build_chat_prompt("<ImageHere><ImageHere>Q", [], "ixc2.5", 2)
    assert pieces == [TextPiece(f"{U}user\n", True), ImageSlot(0), ImageSlot(1),
                      TextPiece(f"Q{A}\n{U}assistant\n", False)]


def test_ixc25_empty_image_list_is_the_interleaved_path_with_one_bos(tok):
    pieces = build_chat_prompt("Hi", [], "ixc2.5", n_images=0)
    assert pieces == [TextPiece(turn("Hi"), True)]
    assert tok.encode(pieces[0].text, add_bos=True)[:2] == [1, 3]


# ---- text-only chat (no image argument): the official build_inputs path ------------------------------------
@pytest.mark.parametrize("variant,meta", [("ixc2-vl", SYSTEM), ("ixc2-4khd", SYSTEM), ("ixc2.5", "")])
def test_text_only_prompt_starts_with_bos_text_and_gets_a_second_bos(tok, variant, meta):
    pieces = build_chat_prompt("Hi", [("Q", "A")], variant, n_images=None)
    expected = "<s>" + meta + f"{U}user\nQ{A}\n{U}assistant\nA{A}\n" + turn("Hi")
    assert pieces == [TextPiece(expected, True)]
    ids = tok.encode(pieces[0].text, add_bos=True)
    assert ids[:3] == [1, 1, 3]


def test_text_only_ixc25_with_use_meta():
    assert build_chat_prompt("Hi", [], "ixc2.5", None, use_meta=True) == [TextPiece("<s>" + SYSTEM + turn("Hi"), True)]


def test_text_only_rejects_placeholders_without_images():
    with pytest.raises(PromptError, match="1 <ImageHere> placeholder.*no image"):
        build_chat_prompt("and now?", [("<ImageHere>What is it?", "A cat.")], "ixc2.5", None)


# ---- IXC2-VL / IXC2-4KHD -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["ixc2-vl", "ixc2-4khd"])
def test_vl_4khd_always_send_meta_and_bos_every_non_empty_piece(variant):
    pieces = build_chat_prompt("<ImageHere>Describe.", [], variant, 1, use_meta=False)
    assert pieces == [TextPiece(SYSTEM + f"{U}user\n", True), ImageSlot(0),
                      TextPiece(f"Describe.{A}\n{U}assistant\n", True)]


@pytest.mark.parametrize("variant", ["ixc2-vl", "ixc2-4khd"])
def test_vl_4khd_empty_meta_instruction_sends_no_system_turn(variant):
    pieces = build_chat_prompt("Q", [("<ImageHere>What?", "A cat.")], variant, 1, meta_instruction="")
    assert pieces == [TextPiece(f"{U}user\n", True), ImageSlot(0),
                      TextPiece(f"What?{A}\n{U}assistant\nA cat.{A}\n" + turn("Q"), True)]


def test_4khd_second_round_takes_the_position_from_history():
    history = [("<ImageHere>Illustrate the fine details", "An infographic.")]
    pieces = build_chat_prompt("Explain the third part.", history, "ixc2-4khd", 1)
    assert [type(p) for p in pieces] == [TextPiece, ImageSlot, TextPiece]
    assert pieces[2].text.endswith(turn("Explain the third part."))


def test_4khd_rejects_a_prompt_without_placeholder():
    with pytest.raises(PromptError, match="ixc2-4khd needs <ImageHere>"):
        build_chat_prompt("Describe.", [], "ixc2-4khd", 1)


def test_vl_without_placeholder_puts_the_image_after_the_prompt_with_a_warning():
    with pytest.warns(UserWarning, match="image goes after the whole prompt"):
        pieces = build_chat_prompt("Describe.", [], "ixc2-vl", 1)
    assert pieces == [TextPiece(SYSTEM + turn("Describe."), True), ImageSlot(0)]


def test_hd_num_defaults_per_variant():
    assert effective_hd_num("ixc2-4khd", 1) == 25
    assert effective_hd_num(VARIANTS["ixc2-4khd"], 3, 9) == 9  # no multi-image override outside IXC-2.5
    with pytest.raises(PromptError, match="hd_num must be a positive integer"):
        effective_hd_num("ixc2.5", 1, 0)


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,query,n", [
    ("ixc2.5", "<ImageHere> and <ImageHere>", 1),
    ("ixc2.5", "compare them", 2),
    ("ixc2.5", "<ImageHere>", 0),
    ("ixc2-vl", "<ImageHere><ImageHere>", 1),
    ("ixc2-4khd", "<ImageHere>", 3),
])
def test_placeholder_and_image_counts_must_match(variant, query, n):
    with pytest.raises(PromptError, match=r"placeholder\(s\) but \d+ image\(s\) were given"):
        build_chat_prompt(query, [], variant, n)


@pytest.mark.parametrize("history,match", [
    ("not a list", "history must be a list"),
    ([("only one",)], r"history\[0\] must be a \(query, response\) pair"),
    ([("q", 3)], r"history\[0\]\[1\] must be a str"),
])
def test_bad_history_is_rejected(history, match):
    with pytest.raises(PromptError, match=match):
        build_chat_prompt("Q", history, "ixc2.5", 1)


def test_bad_arguments_are_rejected():
    with pytest.raises(PromptError, match="query must be a str"):
        build_chat_prompt(b"bytes", [], "ixc2.5", 1)
    with pytest.raises(ConfigError, match="unknown variant"):
        build_chat_prompt("Q", [], "ixc3", 1)
    with pytest.raises(PromptError, match="n_images must be"):
        build_chat_prompt("Q", [], "ixc2.5", -1)


# ---- max_length ----------------------------------------------------------------------------------------------
def test_max_length_defaults():
    assert DEFAULT_MAX_LENGTH == {"ixc2-vl": 4096, "ixc2-4khd": 16384, "ixc2.5": 16384}


def test_kept_length_cuts_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kept_length([1, 2061, 12], 2074) == 2074  # exactly at the limit: kept, no warning
    with pytest.warns(UserWarning, match="exceeds max_length=2000 embedding rows.*cut to the first 2000"):
        assert kept_length([1, 2061, 12], 2000) == 2000
    with pytest.raises(PromptError, match="max_length must be a positive integer"):
        kept_length([1], 0)
