"""ms-xcomposer: vision-language model families on MindSpore (InternLM-XComposer2: IXC2-VL-7B, IXC2-4KHD-7B,
IXC-2.5-7B).

    from ms_xcomposer import load, chat, GenerationConfig
    model, processor = load("ixc25-ms")
    response, history = chat(model, processor, "Describe this image.", images=["photo.jpg"],
                             generation=GenerationConfig(max_new_tokens=256))

The names below are imported on first use, so `import ms_xcomposer` stays light (no MindSpore until needed).
`chat`, `chat_with_ids`, `stream_chat` and `batch_chat` live in `ms_xcomposer.conversation` (a module named `chat` would be
shadowed by the function of the same name here).
"""
__version__ = "0.1.0"

_EXPORTS = {
    "load": "ms_xcomposer.api",
    "chat": "ms_xcomposer.conversation",
    "chat_with_ids": "ms_xcomposer.conversation",
    "stream_chat": "ms_xcomposer.conversation",
    "batch_chat": "ms_xcomposer.conversation",
    "GenerationConfig": "ms_xcomposer.generation",
    "KVCache": "ms_xcomposer.cache",
    "InternLM2Tokenizer": "ms_xcomposer.tokenizer",
    "XComposer2ForCausalLM": "ms_xcomposer.models.xcomposer2.modeling",
    "XComposer2Processor": "ms_xcomposer.models.xcomposer2.processor",
    "Family": "ms_xcomposer.families",
    "register_family": "ms_xcomposer.families",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ms_xcomposer' has no attribute {name!r}")
