"""Shared pieces of the chat tests: the golden case's paths, the chat stop ids, a model that records calls."""
import os

DATA = os.path.join(os.path.dirname(__file__), "data", "ixc25_tiny")
WIDE, SMALL = (os.path.join(DATA, f"image_{n}.png") for n in ("wide", "small"))
EOS = [2, 4]


class RecordingModel:
    """The model, recording each call's logits, image mask and sequence length (call 0 is the prefill)."""

    def __init__(self, model):
        self._model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, **kwargs):
        out = self._model(**kwargs)
        source = kwargs["inputs_embeds"] if kwargs.get("input_ids") is None else kwargs["input_ids"]
        self.calls.append({"logits": out.logits.asnumpy(), "im_mask": kwargs.get("im_mask"),
                           "seq": int(source.shape[1])})
        return out


def official_chat_with_ids(model, processor, query, images, history=(), **kwargs):
    """A chat turn as the official `model.chat` takes it (images as given: [] is the interleaved path, None
    the text-only one; the official decoding defaults), returning the `ChatResult` with the new ids."""
    from ms_xcomposer.conversation import prepare_turn, run_turn
    from ms_xcomposer.models.xcomposer2.modeling import OFFICIAL_CHAT_GENERATION

    turn = prepare_turn(model, processor, query, images, history, OFFICIAL_CHAT_GENERATION, **kwargs)
    return run_turn(model, processor, query, history, turn)
