"""InternVL-1.5 chat prompts: the `internlm2-chat` conversation template and the image blocks (pure Python).

As the official `chat` / `multi_image_chat` / `batch_chat` build them (v1.5.1):

- Template (MPT style): `<|im_start|>system\\n{system_message}<|im_end|>`, then per message `role + text +
  <|im_end|>`, the open assistant turn as the bare role `<|im_start|>assistant\\n`. No newline after
  `<|im_end|>` in this version. An empty message is rendered like None (role only). BOS is not part of the
  text: the tokenizer adds it once at the start.
- Image block of one image: `<img>` + `<IMG_CONTEXT>` x (num_image_token x tiles) + `</img>`, put in front of
  the first question followed by `\\n`; `multi_image_chat` writes `<image k> (图k):` before each image's block,
  blocks back to back. With a history the new question gets no image block (the first turn of the history
  already holds it).
- Generation stops at `<|im_end|>` (the template's `sep`; id 92542), not at `</s>`.

`batch_chat` (the official signature of the v1.5 remote code, `batch_chat(tokenizer, pixel_values, image_counts,
questions, generation_config)`): every row is a first turn with its own image block of image_counts[k] tiles;
a count of 0 gives the empty block `<img></img>` (the official code does not leave the block out).

Text-only chat (`n_tiles=None`): the official v1.5.1 `chat` crashes without pixel_values; here the question
goes into the template as is, with no image block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ms_xcomposer.prompt_checks import History, PromptError, check_history, check_text

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


@dataclass(frozen=True)
class Template:
    """A conversation template of the official `conversation.py` (MPT separator style)."""

    name: str
    system_template: str
    system_message: str
    roles: Tuple[str, str]  # (user, assistant)
    sep: str  # ends every message; also the chat's stop token
    stop_token_ids: Tuple[int, ...]  # declared by the template; the official chat() stops at `sep` only

    def render(self, messages: Sequence[Tuple[str, Optional[str]]], system_message: Optional[str] = None) -> str:
        """The prompt of (role, text) messages; a None or empty text renders the bare role (an open turn)."""
        message = self.system_message if system_message is None else system_message
        out = self.system_template.format(system_message=message) + self.sep
        for role, text in messages:
            out += role + text + self.sep if text else role
        return out


TEMPLATES = {
    "internlm2-chat": Template(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        system_message="You are an AI assistant whose name is InternLM (书生·浦语).",
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep="<|im_end|>",
        stop_token_ids=(2, 92543, 92542),
    ),
}


def get_template(name: str) -> Template:
    """The template called `name`; PromptError names the known ones."""
    if name not in TEMPLATES:
        raise PromptError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def image_block(n_tiles: int, num_image_token: int = 256) -> str:
    """`<img>` + `<IMG_CONTEXT>` x (num_image_token * n_tiles) + `</img>` for one image of n_tiles tiles."""
    if n_tiles < 1 or num_image_token < 1:
        raise PromptError(f"an image block needs n_tiles >= 1 and num_image_token >= 1, got {n_tiles}, "
                          f"{num_image_token}")
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * n_tiles) + IMG_END_TOKEN


def multi_image_block(image_counts: Sequence[int], num_image_token: int = 256) -> str:
    """`<image k> (图k):` + the image block of image k (image_counts[k-1] tiles), for k = 1..len, back to back."""
    if not image_counts:
        raise PromptError("multi-image prompts need at least one image count")
    return "".join(f"<image {k}> (图{k}):" + image_block(count, num_image_token)
                   for k, count in enumerate(image_counts, 1))


def chat_prompt(question: str, n_tiles: Optional[int], num_image_token: int = 256, history: Optional[History] = None,
                template: str = "internlm2-chat", system_message: Optional[str] = None) -> str:
    """The prompt text of the official `chat(tokenizer, pixel_values, question, ..., history)`.

    n_tiles: pixel_values.shape[0] (all tiles of the image(s)), or None for a text-only chat.
    history: None for a first turn (the image block goes before the question), or the (question, answer)
    pairs of earlier turns, replayed as they are (the new question gets no image block).
    """
    check_text(question, "question")
    if history is None:
        if n_tiles is not None:
            question = image_block(n_tiles, num_image_token) + "\n" + question
        return _render(template, (), question, system_message)
    return _render(template, check_history(history), question, system_message)


def multi_image_chat_prompt(question: str, image_counts: Sequence[int], num_image_token: int = 256,
                            history: Optional[History] = None, template: str = "internlm2-chat",
                            system_message: Optional[str] = None) -> str:
    """The prompt text of the official `multi_image_chat`: numbered image blocks, `\\n`, the question."""
    check_text(question, "question")
    if history is None:
        return _render(template, (), multi_image_block(image_counts, num_image_token) + "\n" + question,
                       system_message)
    return _render(template, check_history(history), question, system_message)


def batch_chat_prompt(question: str, n_tiles: Optional[int], num_image_token: int = 256,
                      template: str = "internlm2-chat") -> str:
    """The prompt of one row of the official `batch_chat`: `<img>` + `<IMG_CONTEXT>` x (num_image_token x
    n_tiles) + `</img>\\n` + question, in the template's first user turn (no history). n_tiles 0 gives the
    empty block `<img></img>\\n` as the official code writes it; None (no pixel_values at all) gives no block."""
    check_text(question, "question")
    if n_tiles is None:
        return _render(template, (), question, None)
    if n_tiles < 0:
        raise PromptError(f"an image count must be >= 0, got {n_tiles}")
    return _render(template, (), IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * n_tiles) + IMG_END_TOKEN
                   + "\n" + question, None)


def _render(template: str, turns: Sequence[Tuple[str, str]], question: str, system_message: Optional[str]) -> str:
    t = get_template(template)
    user, assistant = t.roles
    messages = [m for q, a in turns for m in ((user, q), (assistant, a))]
    return t.render(messages + [(user, question), (assistant, None)], system_message)


__all__ = ["IMG_START_TOKEN", "IMG_END_TOKEN", "IMG_CONTEXT_TOKEN", "Template", "TEMPLATES", "get_template",
           "image_block", "multi_image_block", "chat_prompt", "multi_image_chat_prompt", "batch_chat_prompt",
           "PromptError"]
