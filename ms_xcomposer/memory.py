"""Memory a chat request needs, estimated from the config alone (no weights loaded).

Used by `ms-xcomposer chat` before it loads the model (refuse, or warn with --force, when the estimate exceeds
the available memory) and by `ms-xcomposer info DIR --estimate`. Pure arithmetic on the config.

The formula follows the code as it is (bytes; B = batch, S = prompt rows, C = KV cache capacity =
`cache.round_capacity(S + max_new_tokens)`, c = bytes of the compute dtype, w = bytes of the weights' dtype):

- weights = parameters of the model the config describes (task adapters included when it has them) x w.
- KV cache = 2 (keys, values) x layers x B x beams x kv_heads x C x head_dim x c. Each compiled step returns
  a new cache while the old one is still referenced, so for a moment there are two: the peak counts it twice.
- prefill activation (one decoder layer and one chunk at a time: the engine runs a prompt in chunks of
  K = min(S, `config.PREFILL_CHUNK`) rows, `engine.CausalLM.prefill_chunk`) = ATTENTION_COPIES x B x heads x K
  x C x 4 (a chunk's attention scores over the whole capacity in float32: scores, bias-added scores, softmax,
  and their casts; see `models/attention.py`), plus B x K x (3 x ffn + qkv_out + 4 x hidden) x c (feed-forward
  and projections), plus the prompt embeddings B x S x hidden x c and the last logits B x vocab x 4.
  Linear in S (through C and the embeddings).
- vision activation: the family's hook (`Family.vision_memory`, a `VisionLoad` of the images) on the shared
  ViT formula `vit_activation` = VIT_ATTENTION_COPIES x G x vit_heads x T x T x 4 + G x T x (vit_ffn +
  4 x vit_width) x c, T = patches + 1 tokens per view, G the views of one tower call (all of them unless the family
  encodes them in groups; then + 2 x views x T x vit_width x c for the groups' features and their concatenation).
  XComposer2 encodes images one after the other (the largest counts), views = 1 + HD tiles, in groups of
  G = min(views, `config.VISION_GROUP`); LLaVA encodes a turn's images together, one view each, T = 577 at 336
  px; InternVL encodes every tile of a turn together, views = all tiles (thumbnails included), T = 1025 at 448
  px, with 4 score copies (InternViT measured 2.5-2.7 PyNative, 4.5-4.6 GRAPH; its projector, on 256 tokens of
  4 x vit_width per tile, runs after the ViT and needs less).
- activation = max(vision, prefill): the vision tower finishes before the prefill starts.
- loading = weights x LOADING_PEAK_RATIO: `from_pretrained` builds the model unallocated, then hands each tensor
  over as it is read (no second copy).
- peak = max(loading, weights + 2 x KV cache + activation).

The two copy factors were measured on this CPU (MindSpore 2.10, tiny IXC-2.5, PyNative and GRAPH, peak RSS of
one call above the RSS before it): the attention at S = 2048 and 4096 took 4.2 (PyNative) to 6.3 (GRAPH,
S = 2048) score-sized copies; the vision tower 2 to 3 (5 and 9 views). Issue 10 measured 3.4 to 5 copies at
full width. Vision at full width (CLIP-L/560, hd_num 24 = 25 views, fp32, GRAPH, 2 tower layers): 13.3 GB with
all views at once (this formula without groups: 13.6 GB), 2.05 GB in groups of 4 (this formula: 2.51 GB); with
all 24 layers, in groups of 4: 4.97 GB (GRAPH keeps more as layers are added): this term undercounts it ~2x.
`tests/test_memory.py` checks the estimate against a measured peak RSS (measured / estimated between 1/2 and
1.5; PyNative measures below the estimate, GRAPH above it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

from ms_xcomposer.cache import round_capacity
from ms_xcomposer.config import PREFILL_CHUNK

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ATTENTION_COPIES = 4.5  # float32 [heads, S, C] tensors alive at the attention's peak (4.2 PyNative, up to 6.3 GRAPH)
VIT_ATTENTION_COPIES = 3  # float32 [views, heads, T, T] tensors alive at the vision attention's peak (2-3)
LOADING_PEAK_RATIO = 1.1  # peak RSS while loading / weight bytes: 1.07 (fp32) to 1.13 (bf16) on a 3.4 GB
# checkpoint, runtime included (benchmarks/bench_load.py); 1.6 before tensors were handed over without a copy
# RSS of a CPU process with MindSpore imported and a tiny model loaded (0.54-0.59 GB measured): what the
# chat pre-check adds to the estimate; `info --estimate` leaves it out (it depends on the host, not the model).
RUNTIME_OVERHEAD = 600_000_000
TEXT_ALLOWANCE = 256  # text rows assumed when the prompt is not known (`info --estimate`, interactive chat)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a chat request needs; `peak` is what must fit."""

    weights: int
    kv_cache: int
    activation: int
    loading: int
    prompt_rows: int
    capacity: int

    @property
    def running(self) -> int:
        """Weights + two KV caches (a step's input and output) + the activation peak."""
        return self.weights + 2 * self.kv_cache + self.activation

    @property
    def peak(self) -> int:
        return max(self.loading, self.running)

    def lines(self) -> Sequence[str]:
        """Human-readable breakdown, one item per line."""
        return [
            f"weights          {gb(self.weights)}",
            f"KV cache         {gb(self.kv_cache)} ({self.capacity} positions; a step briefly holds two copies)",
            f"peak activation  {gb(self.activation)} (prompt of {self.prompt_rows} rows)",
            f"loading peak     {gb(self.loading)}",
            f"total            {gb(self.peak)} (max of loading, and weights + 2 x KV cache + activation)",
        ]

    def to_dict(self) -> Dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "activation": self.activation,
                "loading": self.loading, "total": self.peak, "prompt_rows": self.prompt_rows,
                "capacity": self.capacity}


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def parameter_bytes(shapes: Dict[str, Sequence[int]], dtype: str) -> int:
    """Bytes of the parameters `shapes` lists (`Family.parameter_shapes(config)`), stored in `dtype`."""
    count = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= int(s)
        count += n
    return count * dtype_bytes(dtype)


@dataclass(frozen=True)
class VisionLoad:
    """What a request's images cost: the prompt rows they fill, the vision side's activation peak in bytes, and
    their layout in words (`info --estimate`)."""

    rows: int
    activation: int
    layout: str = ""
    option_value: Optional[int] = None  # the value of the family's image option the layout assumes


@dataclass(frozen=True)
class VisionMemory:
    """A family's vision side for the estimate (`Family.vision_memory` names one):

    option: the chat option that bounds an image's size ("hd_num", "max_num"; None: images have one size);
    worst(config, n_images, option_value, c): the `VisionLoad` of n images at the largest layout the option
    (None: the family's default) allows, compute dtype of c bytes; title(config): the model's short name;
    prompt_limit(config): a length the prompt is cut to (None: not cut).
    """

    option: Optional[str]
    worst: Callable[[object, int, Optional[int], int], VisionLoad]
    title: Callable[[object], str]
    prompt_limit: Callable[[object], Optional[int]] = lambda config: None


def vit_activation(views: int, heads: int, tokens: int, ffn: int, width: int, c: int,
                   copies: float = VIT_ATTENTION_COPIES, group: Optional[int] = None) -> int:
    """Peak bytes of one ViT layer on `views` images of `tokens` tokens each (compute dtype of c bytes): the
    attention scores in float32 (`copies` copies alive at the peak, measured per tower) and the feed-forward's
    activations, for the `group` views of one tower call (all of them when None). Views encoded in groups add
    their features twice (the groups' outputs, then their concatenation)."""
    per_call = views if group is None else min(views, group)
    scores = int(copies * per_call * heads * tokens * tokens * 4)
    layer = per_call * tokens * (ffn + 4 * width) * c
    features = 2 * views * tokens * width * c if group is not None else 0
    return scores + layer + features


def estimate(config, *, prompt_rows: int, max_new_tokens: int, compute_dtype: str, weight_dtype: str,
             weight_bytes: int, vision_activation: int = 0, batch: int = 1, num_beams: int = 1) -> MemoryEstimate:
    """The memory of one chat request (see the module docstring for the formula).

    config: any family's config (its `llm` is the decoder's); prompt_rows: embedding rows of the prompt (text ids
    + image rows); max_new_tokens: the generation budget; weight_bytes: the parameters' bytes in `weight_dtype`
    (`parameter_bytes`); vision_activation: the images' vision-side peak (the family's `VisionLoad.activation`).
    """
    if batch < 1 or num_beams < 1 or prompt_rows < 1 or max_new_tokens < 1:
        raise ValueError("batch, num_beams, prompt_rows and max_new_tokens must be positive")
    c = dtype_bytes(compute_dtype)
    llm = config.llm
    capacity = round_capacity(prompt_rows + max_new_tokens)
    kv = 2 * llm.num_hidden_layers * batch * num_beams * llm.num_key_value_heads * capacity * llm.head_dim * c
    activation = max(vision_activation, _llm_prefill_bytes(llm, batch, prompt_rows, capacity, c))
    return MemoryEstimate(weights=weight_bytes, kv_cache=kv, activation=activation,
                          loading=int(weight_bytes * LOADING_PEAK_RATIO), prompt_rows=prompt_rows, capacity=capacity)


def _llm_prefill_bytes(llm, batch: int, rows: int, capacity: int, c: int) -> int:
    chunk = min(rows, PREFILL_CHUNK)
    scores = int(ATTENTION_COPIES * batch * llm.num_attention_heads * chunk * capacity * 4)
    layer = batch * chunk * (3 * llm.intermediate_size + llm.qkv_out + 4 * llm.hidden_size) * c
    embeds = batch * rows * llm.hidden_size * c
    return scores + layer + embeds + batch * llm.vocab_size * 4


# ---- measuring (tests and benchmarks) -------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement of this process (Linux: "5" to /proc/self/clear_refs resets VmHWM).

    `resource.getrusage(...).ru_maxrss` cannot be used for this: it never resets, and Linux carries the
    parent's peak into a child across fork + exec, so a child of a large pytest process reports the parent's
    peak (3 GB seen where the child's own was 0.3 GB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident set size in bytes of this process since it started or `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM line: peak RSS is measured on Linux only")
