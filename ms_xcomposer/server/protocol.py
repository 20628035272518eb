"""OpenAI chat-completions requests -> the library's chat arguments, and the response / error JSON.

`parse_chat_request(body, ...)` checks a decoded JSON body and returns a `ChatRequest`: the arguments
`conversation.chat` takes, built the way the library builds a chat turn:
- a system message (first, at most one) is kept as `system`: the server turns it into the family's option
  (`processor.system_options(text)`: XComposer2 `use_meta` + `meta_instruction`, LLaVA `system`, InternVL
  `system_message`);
- earlier user/assistant turns (alternating, text only) become the history;
- the last user message's text is the query, unchanged (several text parts are joined with newlines), and its
  images go as `images=[...]` (None when it has none), so the family's processor places them as `chat` does.
Parameters: `max_tokens` / `max_completion_tokens`, `temperature` (0: greedy; absent: the model's default,
greedy), `top_p`, `seed`, `stop`, `stream` (+ `stream_options.include_usage`), `n` (1 only); extensions
`hd_num`, `max_num`, `num_beams`, `repetition_penalty`, `infer_mode`, `top_k` (the family options among them,
`hd_num` / `infer_mode` for XComposer2 and `max_num` for InternVL, are refused by the other families'
processors). `user` is accepted and ignored;
`presence_penalty` / `frequency_penalty` only at 0, `logprobs` only false. Anything else is refused (400).

Every problem raises `ApiError` (status, OpenAI error type and code, the parameter), never a traceback.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

ROLES = ("system", "user", "assistant")
IGNORED_FIELDS = ("user",)
NEUTRAL_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
KNOWN_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                "stream", "stream_options", "n", "hd_num", "max_num", "num_beams", "repetition_penalty", "infer_mode",
                "top_k",
                *IGNORED_FIELDS, *NEUTRAL_FIELDS}
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "internal_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def as_api_error(error: BaseException) -> ApiError:
    """The ApiError answering an exception of the library: bad input (ValueError, TypeError) 400, else 500."""
    if isinstance(error, ApiError):
        return error
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, (ValueError, TypeError)):
        return bad(first)
    return ApiError(500, f"internal error: {type(error).__name__}: {first}", code="internal_error")


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class ChatRequest:
    """A checked request: chat arguments (`options` are GenerationConfig fields and family options), the image
    URLs of the last user message (resolved by the server), and how to answer."""

    model: str
    query: str
    image_urls: List[str]
    history: List[Tuple[str, str]]
    options: Dict[str, Any] = field(default_factory=dict)
    system: Optional[str] = None
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body: Any, model_id: str, max_images: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise bad(f"unsupported field(s) {unknown}", unknown[0])
    for name, neutral in NEUTRAL_FIELDS.items():
        if body.get(name) not in (None, neutral):
            raise bad(f"{name} is not supported (only {neutral!r})", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: a string (see GET /v1/models)", "model")
    if model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_id!r}", "model",
                       "model_not_found")
    if _get(body, "n", int, 1) != 1:
        raise bad("n must be 1 (one choice per request)", "n")
    query, image_urls, history, system = _messages(body.get("messages"))
    if len(image_urls) > max_images:
        raise bad(f"{len(image_urls)} images in the request, over the server's limit of {max_images} "
                  "(--max-images)", "messages")
    stream = _get(body, "stream", bool, False)
    stream_options = body.get("stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict) or not stream):
        raise bad("stream_options must be an object, and only with stream: true", "stream_options")
    include_usage = bool(_get(stream_options or {}, "include_usage", bool, False, "stream_options.include_usage"))
    return ChatRequest(model, query, image_urls, history, _options(body), system, stream, include_usage)


def system_options(processor, text: str) -> Dict[str, Any]:
    """The family's chat options carrying a system message (`processor.system_options(text)`); 400 when the
    family's processor takes none."""
    hook = getattr(processor, "system_options", None)
    if hook is None:
        raise bad(f"this model family ({type(processor).__name__}) takes no system message", "messages")
    return hook(text)


def _options(body: Dict[str, Any]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        options["max_new_tokens"] = _number(max_tokens, int, name, minimum=1)
    temperature = body.get("temperature")
    if temperature is not None:
        temperature = _number(temperature, float, "temperature", minimum=0.0, maximum=2.0)
        options["do_sample"] = temperature > 0
        if temperature > 0:
            options["temperature"] = temperature
    if body.get("top_p") is not None:
        top_p = _number(body["top_p"], float, "top_p", minimum=0.0, maximum=1.0)
        if top_p == 0:
            raise bad("top_p must be > 0", "top_p")
        options["top_p"] = top_p
    for name, kind, minimum in (("seed", int, None), ("top_k", int, 0), ("num_beams", int, 1),
                                ("repetition_penalty", float, None), ("hd_num", int, 1),
                                ("max_num", int, 1)):
        if body.get(name) is not None:
            options[name] = _number(body[name], kind, name, minimum=minimum)
    if options.get("repetition_penalty", 1.0) <= 0:
        raise bad("repetition_penalty must be > 0", "repetition_penalty")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or not stops or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stops)):
            raise bad(f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them", "stop")
        options["stop"] = tuple(stops)
    if body.get("infer_mode") is not None:
        if not isinstance(body["infer_mode"], str):
            raise bad("infer_mode must be a string", "infer_mode")
        options["infer_mode"] = body["infer_mode"]
    return options


def _messages(messages: Any) -> Tuple[str, List[str], List[Tuple[str, str]], Optional[str]]:
    """(query, image URLs of the last user message, history pairs, system text or None)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    system = None
    turns: List[Tuple[str, str, List[str]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
        text, urls = _content(message.get("content"), where)
        if role == "system":
            if i != 0:
                raise bad(f"{where}: a system message is accepted only first", where)
            if urls:
                raise bad(f"{where}: a system message cannot hold images", where)
            system = text
            continue
        turns.append((role, text, urls))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must be a user message", "messages")
    for k, (role, _, urls) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise bad("after the system message, user and assistant messages must alternate, starting with user",
                      "messages")
        if urls and k != len(turns) - 1:
            raise bad("images are accepted only in the last user message (the history is text)", "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return turns[-1][1], turns[-1][2], history, system


def _content(content: Any, where: str) -> Tuple[str, List[str]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts: List[str] = []
    urls: List[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}", at)
            urls.append(url)
        else:
            raise bad(f"{at} must be {{\"type\": \"text\", \"text\": ...}} or {{\"type\": \"image_url\", "
                      "\"image_url\": {\"url\": ...}}", at)
    return "\n".join(texts), urls


def _get(obj: Dict[str, Any], name: str, kind: type, default: Any, param: Optional[str] = None) -> Any:
    value = obj.get(name, default)
    if value is None:
        return default
    if kind is bool and not isinstance(value, bool):
        raise bad(f"{param or name} must be true or false, got {value!r}", param or name)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad(f"{param or name} must be an integer, got {value!r}", param or name)
    return value


def _number(value: Any, kind: Callable, name: str, minimum=None, maximum=None):
    ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
    if not ok:
        raise bad(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    value = kind(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise bad(f"{name} must be {bounds}, got {value!r}", name)
    return value


# ---- responses ---------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> Dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: Optional[Dict[str, Any]], finish_reason: Optional[str] = None,
          usage_: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """A `chat.completion.chunk`; `delta` None makes the usage-only chunk (empty choices), as OpenAI sends."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
