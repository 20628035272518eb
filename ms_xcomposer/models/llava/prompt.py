"""The llava-1.5 conversation format of llava-hf checkpoints, and the image-token expansion of `LlavaProcessor`.

Template: the `chat_template.json` of llava-hf/llava-1.5-7b-hf (the revision with `{% generation %}` tags,
https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/chat_template.json, found through the docs index):
every non-system message starts with its role in capitals and ": ", then one "<image>\\n" per image of the
message, then each text followed by one space (system messages: only the text and the space); the generation
prompt is "ASSISTANT:". So one turn is "USER: <image>\\n{query} ASSISTANT:" and a conversation
"USER: <image>\\n{q1} ASSISTANT: {a1} USER: {q2} ASSISTANT:". The original LLaVA repository's `conv_vicuna_v1`
closed each answer with "</s>" ("... ASSISTANT: {a1}</s>USER: ..."); the llava-hf template does not, and this
module follows llava-hf (parity with transformers is the point). Generation stops at `</s>` (STOP_TOKEN, the
eos id 2).

Image tokens: `LlavaProcessor` replaces every "<image>" in the text by N copies before tokenizing, with
N = (crop_h // patch) * (crop_w // patch) + num_additional_image_tokens, minus 1 under the "default"
vision_feature_select_strategy (llava-hf's processor_config.json: patch_size 14, num_additional_image_tokens 1,
"default": 24 * 24 + 1 - 1 = 576; "full" keeps the class token: 577). See `num_image_tokens`.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence, Tuple, Union

IMAGE_TOKEN = "<image>"
STOP_TOKEN = "</s>"
GENERATION_PROMPT = "ASSISTANT:"
ROLES = ("system", "user", "assistant")

History = Sequence[Tuple[str, str]]
Message = Mapping[str, object]


class PromptError(ValueError):
    """The messages, query or images cannot form a llava prompt."""


def render_messages(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The llava-hf chat template applied to transformers-style messages:
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...].

    A plain-string content is refused: the llava-hf template renders nothing for it (it looks for typed items).
    """
    out = ""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise PromptError(f"messages[{i}] must be a dict with role one of {list(ROLES)}, got {message!r:.80}")
        role, items = message["role"], message.get("content", [])
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) \
                or not all(isinstance(c, Mapping) for c in items):
            raise PromptError(f"messages[{i}] content must be a list of {{'type': 'image' | 'text', ...}} items "
                              "(the llava-hf template renders nothing for a plain string)")
        if role != "system":
            out += role.upper() + ": "
        out += "<image>\n" * sum(1 for c in items if c.get("type") == "image")
        for c in items:
            if c.get("type") == "text":
                if not isinstance(c.get("text"), str):
                    raise PromptError(f"messages[{i}]: a text item needs a 'text' string, got {c!r:.80}")
                out += c["text"] + " "
    return out + (GENERATION_PROMPT if add_generation_prompt else "")


def conversation_messages(query: str, history: History = (), n_images: int = 1, system: str = "") -> List[Message]:
    """Messages of a chat: an optional system text, the history turns, the query. The `n_images` images belong
    to the first user turn (where they were given); later turns are text only."""
    if not isinstance(query, str):
        raise PromptError(f"query must be a str, got {type(query).__name__}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise PromptError(f"n_images must be a non-negative integer, got {n_images!r}")
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise PromptError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    if not isinstance(system, str):
        raise PromptError(f"system must be a str, got {type(system).__name__}")
    messages: List[Message] = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for i, turn in enumerate(list(history) + [(query, None)]):
        if i < len(history) and (isinstance(turn, (str, bytes)) or len(turn) != 2
                                 or not all(isinstance(t, str) for t in turn)):
            raise PromptError(f"history[{i}] must be a (query, response) pair of str, got {turn!r:.80}")
        images = [{"type": "image"}] * (n_images if i == 0 else 0)
        messages.append({"role": "user", "content": images + [{"type": "text", "text": turn[0]}]})
        if turn[1] is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn[1]}]})
    return messages


def conversation_text(query: str, history: History = (), n_images: int = 1, system: str = "") -> str:
    """The prompt text of a chat, ending in the generation prompt "ASSISTANT:" (see `conversation_messages`)."""
    return render_messages(conversation_messages(query, history, n_images, system))


def num_image_tokens(crop_size: Union[int, Tuple[int, int]] = 336, patch_size: int = 14,
                     num_additional_image_tokens: int = 1, vision_feature_select_strategy: str = "default") -> int:
    """Positions one image fills in the prompt, by LlavaProcessor's formula (576 for llava-1.5)."""
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    if vision_feature_select_strategy not in ("default", "full"):
        raise PromptError(f"vision_feature_select_strategy {vision_feature_select_strategy!r}: expected 'default' "
                          "or 'full'")
    n = (crop_h // patch_size) * (crop_w // patch_size) + num_additional_image_tokens
    return n - 1 if vision_feature_select_strategy == "default" else n


def expand_image_tokens(text: str, n_images: int, tokens_per_image: int) -> str:
    """`text` with each "<image>" repeated `tokens_per_image` times, as LlavaProcessor does before tokenizing.

    The text must hold exactly one "<image>" per image (transformers fails later, in the model, otherwise).
    """
    count = text.count(IMAGE_TOKEN)
    if count != n_images:
        raise PromptError(f"the prompt has {count} {IMAGE_TOKEN} token(s) but {n_images} image(s) were given; "
                          "they must match")
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * tokens_per_image) if n_images else text


def prompt_ids(tokenizer, text: str, n_images: int, tokens_per_image: int) -> List[int]:
    """Input ids of a prompt text (BOS first) with the image tokens expanded: LlavaProcessor's input_ids."""
    return tokenizer.encode(expand_image_tokens(text, n_images, tokens_per_image))
