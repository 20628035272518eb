"""The pieces of `ms-xcomposer demo`: a tiny random checkpoint in the real HF layout, and timed chats.

`DEMOS` holds one `DemoSpec` per family the demo covers: "xcomposer2" (the default), "llava"
(`models.llava.synthetic`: safetensors shards, llava-hf config and processor files, a LLaMA-structured
tokenizer) and "internvl" (`models.internvl.synthetic`: safetensors shards, the InternVLChatModel config.json,
an InternLM2-structured tokenizer with the InternVL tokens). `ensure_checkpoint(cache_dir, family=...)` writes
(or reuses) the family's HF directory. For xcomposer2, `cache_dir/hf`: config.json as the released repos write it,
random bf16 weights of the `tiny-ixc2.5` preset as two pickled `.bin` shards with their index (written without
torch), `generation_config.json`, and a SentencePiece tokenizer trained on the spot whose vocabulary matches
the model's 1000 embedding rows (`ms_xcomposer.synthetic_tokenizer`). A manifest with every file's size and
SHA-256 is written last; the directory is reused only when the manifest matches this version, the preset and
the files. The model is random: what it generates is meaningless text.

`timed_chat` runs one chat turn and measures the time to the first token (image encoding + prefill) and the
decoding rate after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ms_xcomposer.models.xcomposer2.config import preset

PRESET = "tiny-ixc2.5"
SEED = 0
MANIFEST = "demo_manifest.json"
MANIFEST_VERSION = 1
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
IMAGE = os.path.join(ASSETS, "demo.png")
# generation_config.json of the released repos (eos 2, pad 2, max_length 16384).
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "max_length": 16384,
                     "pad_token_id": 2, "transformers_version": "4.33.1", "use_cache": False}


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/ms-xcomposer/demo`, by default `~/.cache/ms-xcomposer/demo`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ms-xcomposer", "demo")


@dataclass
class DemoCheckpoint:
    """The demo's HF directory; status: "created", "reused" or "rebuilt" (with the reason the cache was not valid)."""

    hf_dir: str
    status: str
    reason: str = ""
    seconds: float = 0.0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_xcomposer2(dst: str) -> List[str]:
    """The tiny-ixc2.5 checkpoint's files into `dst` (see the module doc); returns their names."""
    from ms_xcomposer.conversion import layout
    from ms_xcomposer.conversion.synthetic import write_random_hf_checkpoint
    from ms_xcomposer.synthetic_tokenizer import write_tokenizer_files

    config = preset(PRESET)
    files = write_random_hf_checkpoint(dst, config, fmt="bin", shards=2, seed=SEED)
    names = [os.path.basename(f) for f in files] + [layout.HF_BIN_INDEX, layout.CONFIG]
    names += write_tokenizer_files(dst, config.llm.vocab_size, seed=SEED)
    with open(os.path.join(dst, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    return names + ["generation_config.json"]


def _write_llava(dst: str) -> List[str]:
    from ms_xcomposer.models.llava.synthetic import write_random_checkpoint

    return write_random_checkpoint(dst, seed=SEED)


def _llava_config() -> Dict[str, object]:
    from ms_xcomposer.models.llava.synthetic import config

    return config().to_dict()


def _write_internvl(dst: str) -> List[str]:
    from ms_xcomposer.models.internvl.synthetic import write_random_checkpoint

    return write_random_checkpoint(dst, seed=SEED)


def _internvl_config() -> Dict[str, object]:
    from ms_xcomposer.models.internvl.synthetic import config

    return config().to_dict()


@dataclass(frozen=True)
class DemoSpec:
    """One family's demo: its tiny model in words, the checkpoint's files in words, the PyTorch side of its
    parity, where it is cached (under the cache directory), the chat options the demo passes (`hd_num`), and
    how to write it (`write(dst) -> file names`) and describe it for the manifest (`manifest()`)."""

    family: str
    model: str
    files: str
    torch_side: str
    subdir: str
    options: Tuple[str, ...]
    write: Callable[[str], List[str]]
    manifest: Callable[[], Dict[str, object]]


DEMOS: Dict[str, DemoSpec] = {
    "xcomposer2": DemoSpec(
        "xcomposer2", f"a tiny RANDOM IXC-2.5 model (preset {PRESET})",
        "bf16 weights in 2 pickled .bin shards + index, config.json, SentencePiece tokenizer trained on the spot",
        "the PyTorch reference", "", ("hd_num",), _write_xcomposer2,
        lambda: {"preset": PRESET, "seed": SEED, "config": preset(PRESET).to_dict()}),
    "llava": DemoSpec(
        "llava", "a tiny RANDOM LLaVA-1.5 model (preset tiny-llava: CLIP 3 layers at 112 px, LLaMA 2 layers)",
        "bf16 weights in 2 safetensors shards + index, llava-hf config / processor files, LLaMA SentencePiece "
        "tokenizer trained on the spot", "transformers' LlavaForConditionalGeneration", "llava", (), _write_llava,
        lambda: {"family": "llava", "preset": "tiny-llava", "seed": SEED, "config": _llava_config()}),
    "internvl": DemoSpec(
        "internvl", "a tiny RANDOM InternVL-1.5 model (preset tiny-internvl: InternViT 2 layers at 448-px tiles, "
        "InternLM2 2 layers)",
        "bf16 weights in 2 safetensors shards + index, InternVLChatModel config.json, InternLM2 SentencePiece "
        "tokenizer trained on the spot with the InternVL tokens", "the project's PyTorch reference of InternVL-1.5",
        "internvl", (), _write_internvl,
        lambda: {"family": "internvl", "preset": "tiny-internvl", "seed": SEED, "config": _internvl_config()}),
}


def _expected_manifest(family: str = "xcomposer2") -> Dict[str, object]:
    return {"version": MANIFEST_VERSION, **DEMOS[family].manifest()}


def cache_problem(hf_dir: str, family: str = "xcomposer2") -> Optional[str]:
    """None when `hf_dir` holds a complete demo checkpoint of this version, else why not (one phrase)."""
    path = os.path.join(hf_dir, MANIFEST)
    if not os.path.isdir(hf_dir):
        return "no cached checkpoint"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return f"{MANIFEST} is missing or unreadable"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is malformed"
    for key, value in _expected_manifest(family).items():
        if manifest.get(key) != value:
            return f"it was made with another {key}"
    for name, entry in manifest["files"].items():
        file = os.path.join(hf_dir, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            return f"{name} was modified"
    return None


def checkpoint_dir(cache_dir: str, family: str = "xcomposer2") -> str:
    """Where the family's demo HF directory is kept under `cache_dir`."""
    return os.path.join(os.path.abspath(cache_dir), DEMOS[family].subdir, "hf")


def ensure_checkpoint(cache_dir: str, rebuild: bool = False, family: str = "xcomposer2") -> DemoCheckpoint:
    """The family's demo HF checkpoint (`checkpoint_dir`): reused when valid, otherwise (re)built atomically."""
    from ms_xcomposer.conversion.writers import AtomicDirectory

    start = time.perf_counter()
    hf_dir = checkpoint_dir(cache_dir, family)
    problem = "--rebuild requested" if rebuild else cache_problem(hf_dir, family)
    if problem is None:
        return DemoCheckpoint(hf_dir, "reused", seconds=time.perf_counter() - start)
    existed = os.path.exists(hf_dir)
    os.makedirs(os.path.dirname(hf_dir), exist_ok=True)
    with AtomicDirectory(hf_dir, overwrite=True, markers=(MANIFEST,)) as out:  # replaces only a demo checkpoint
        names = DEMOS[family].write(out.tmp)
        manifest = {**_expected_manifest(family), "files": {
            n: {"bytes": os.path.getsize(os.path.join(out.tmp, n)), "sha256": _sha256(os.path.join(out.tmp, n))}
            for n in names}}
        with open(os.path.join(out.tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    status = "rebuilt" if existed else "created"
    return DemoCheckpoint(hf_dir, status, "" if status == "created" else problem, time.perf_counter() - start)


@dataclass
class TurnStats:
    """One timed chat turn. first_token_s: image encoding + prefill + first token; decode_tokens_per_s: the
    tokens after the first over the time they took (None with fewer than 2 tokens)."""

    response: str
    ids: List[int]
    history: List[Tuple[str, str]]
    seconds: float
    first_token_s: float
    decode_tokens_per_s: Optional[float]
    graphs: int


@dataclass
class _Clock:
    """A streamer recording when each new token arrives."""

    start: float
    times: List[float] = field(default_factory=list)

    def put(self, ids: List[int]) -> None:
        self.times.extend([time.perf_counter()] * len(ids))

    def end(self) -> None:
        pass


def timed_chat(model, processor, query: str, images: Sequence[str], hd_num: Optional[int], max_new_tokens: int,
               history: Sequence[Tuple[str, str]] = ()) -> TurnStats:
    """One greedy chat turn (repetition penalty 1.0, so both modes and PyTorch can be compared), timed.
    hd_num: XComposer2's tile budget (None: not passed, for families without the option)."""
    from ms_xcomposer.conversation import chat_with_ids

    clock = _Clock(time.perf_counter())
    options = {} if hd_num is None else {"hd_num": hd_num}
    result = chat_with_ids(model, processor, query, list(images), history, streamer=clock,
                           max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0, **options)
    end = time.perf_counter()
    first = clock.times[0] - clock.start if clock.times else end - clock.start
    rate = None
    if len(clock.times) > 1 and clock.times[-1] > clock.times[0]:
        rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return TurnStats(result.response, result.ids, result.history, end - clock.start, first, rate,
                     model.compiled_graphs())
