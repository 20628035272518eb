"""Everything `ms-xcomposer chat` checks before it loads the model: bad input fails in seconds, not after a load.

`preflight(args)` checks, in order: the model directory and its config (headers only, no weights), the decoding
options (warning about sampling options that greedy decoding ignores), the device / mode / dtype (the device
is selected here), `--infer-mode` against the checkpoint's task adapters, `--max-new-tokens` against the
context length, every image (a file, not a directory; decodable; not over `--max-pixels`), the `<ImageHere>`
count (the library's prompt rules), and the memory the request needs (`ms_xcomposer.memory`) against the
available memory. It returns a `ChatPlan` with the decoded, preprocessed images, so the chat itself does no
file work.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ms_xcomposer.config import DEFAULT_META_INSTRUCTION, XComposerConfig

SAMPLING_OPTIONS = (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"))
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 1.0, 0.8


class MemoryRequestError(ValueError):
    """The request is estimated to need more memory than is available."""


@dataclass
class ChatPlan:
    """What preflight established: the checkpoint's config, decoding options, prompt options, the estimate."""

    config: XComposerConfig
    generation: dict
    prompt: dict  # use_meta, meta_instruction, infer_mode
    weight_dtype: str
    compute_dtype: str
    images: Optional[list]  # normalised pixels of the --image files, for --query (None: no image)
    estimate: object  # memory.MemoryEstimate


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The decoding options of `ms_xcomposer.chat.chat`, checked now; warns (stderr) about sampling options that
    greedy decoding or beam search without --do-sample ignore."""
    from ms_xcomposer.generation import GenerationConfig

    ignored = [flag for name, flag in SAMPLING_OPTIONS if getattr(args, name) is not None]
    if ignored and not args.do_sample:
        decoding = "beam search" if args.num_beams > 1 else "greedy decoding"
        print(f"warning: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored without --do-sample "
              f"({decoding}); add --do-sample to sample", file=sys.stderr)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                  temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                  top_p=DEFAULT_TOP_P if args.top_p is None else args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    GenerationConfig(**kwargs)  # raises ValueError naming a bad value
    return kwargs


def prompt_kwargs(args: argparse.Namespace) -> dict:
    """use_meta / meta_instruction / infer_mode of the chat: --meta-instruction implies sending it."""
    meta = args.meta_instruction
    return dict(use_meta=args.use_meta or meta is not None,
                meta_instruction=DEFAULT_META_INSTRUCTION if meta is None else meta, infer_mode=args.infer_mode)


def check_image_path(path: str, config: XComposerConfig, max_pixels: int):
    """A decoded RGB PIL image of `path` (or the path itself for a video), or a one-line error naming it."""
    from ms_xcomposer.processing import VIDEO_EXTENSIONS, ImageError, load_image

    if os.path.isdir(path):
        raise IsADirectoryError(f"image {path} is a directory, not an image file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")
    if path.lower().endswith(VIDEO_EXTENSIONS):
        if not config.spec.accepts_video:
            raise ImageError(f"{path}: {config.variant} does not take videos (only IXC-2.5 does)")
        return path
    return load_image(path, max_pixels=max_pixels)


def turn_pixels(images: Sequence, config: XComposerConfig, hd_num: Optional[int], max_pixels: int) -> List[np.ndarray]:
    """Normalised pixels of each image of one turn (decoded images or video paths, as `check_image_path` gives),
    at the turn's tile budget (IXC-2.5 uses 6 with several images)."""
    from ms_xcomposer.processing import preprocess
    from ms_xcomposer.prompt import effective_hd_num

    hd = effective_hd_num(config.spec, len(images), hd_num)
    return [preprocess(image, config.spec, hd, max_pixels=max_pixels) for image in images]


def _image_grid(image, config: XComposerConfig, hd: int, max_pixels: int):
    """(grid, pixels or None): the HD grid from the size alone for images; videos must be decoded for it."""
    from ms_xcomposer.processing import hd_grid, preprocess, tile_grid

    if isinstance(image, str):  # a video: its canvas size is known only after decoding the frames
        pixels = preprocess(image, config.spec, max_pixels=max_pixels)
        return tile_grid(pixels, config.tile_size), pixels
    if not config.spec.hd_tiles:
        return None, None
    return hd_grid(image.size, hd, config.tile_size, config.spec.image_transform), None


def _prompt_rows(args, config, tokenizer, image_rows: List[int], prompt: dict) -> int:
    from ms_xcomposer.memory import TEXT_ALLOWANCE
    from ms_xcomposer.prompt import DEFAULT_MAX_LENGTH, TextPiece, build_chat_prompt

    n_images = len(image_rows) if args.image else None
    if args.query is None:  # interactive: the first turn's images and some text
        return sum(image_rows) + TEXT_ALLOWANCE
    pieces = build_chat_prompt(args.query, (), config.spec, n_images, prompt["use_meta"], prompt["meta_instruction"])
    text = sum(len(tokenizer.encode(p.text, add_bos=p.add_bos)) for p in pieces if isinstance(p, TextPiece))
    rows = text + sum(image_rows)
    return rows if n_images is None else min(rows, DEFAULT_MAX_LENGTH[config.variant])  # the official cut


def _check_memory(estimate, force: bool) -> None:
    """Compare the estimate plus the process's own overhead with the available memory: refuse, or warn with force."""
    import psutil

    from ms_xcomposer.memory import RUNTIME_OVERHEAD, gb

    need = estimate.peak + RUNTIME_OVERHEAD
    available = psutil.virtual_memory().available
    summary = (f"weights {gb(estimate.weights)} + KV cache 2 x {gb(estimate.kv_cache)} + activation "
               f"{gb(estimate.activation)} (a prompt of {estimate.prompt_rows} rows) + runtime {gb(RUNTIME_OVERHEAD)}")
    if estimate.loading > estimate.running:
        summary += f"; loading peaks at {gb(estimate.loading)}"
    print(f"memory: about {gb(need)} needed ({summary}); {gb(available)} available", file=sys.stderr)
    if need <= available:
        return
    if force:
        print(f"warning: this request may need {gb(need)}, more than the {gb(available)} available; going on "
              "(--force)", file=sys.stderr)
        return
    raise MemoryRequestError(
        f"this request needs about {gb(need)} of memory ({summary}), more than the {gb(available)} available; "
        "use a smaller --hd-num, smaller or fewer images, or a smaller --max-new-tokens (--force tries anyway)")


def preflight(args: argparse.Namespace) -> ChatPlan:
    """Check the whole request before any weight is read; see the module docstring. Raises ValueError / OSError."""
    from ms_xcomposer import memory, runtime
    from ms_xcomposer.conversion.readers import open_checkpoint
    from ms_xcomposer.processing import preprocess
    from ms_xcomposer.prompt import effective_hd_num
    from ms_xcomposer.tokenizer import InternLM2Tokenizer

    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir} does not exist")
    with open_checkpoint(args.model_dir) as reader:
        config, stored = reader.config, reader.dtype("output.weight")
    generation = generation_kwargs(args)
    prompt = prompt_kwargs(args)
    runtime.setup(args.device, args.mode)
    compute = next(n for n, dt in runtime.DTYPES.items() if dt == runtime.compute_dtype(args.dtype))
    # from_pretrained keeps the stored dtype, except bf16 on CPU, upcast to the compute dtype
    weight_dtype = compute if runtime.current_device() == "CPU" and stored == "bfloat16" else stored
    _check_infer_mode(args.infer_mode, config)
    context = config.llm.max_position_embeddings
    if args.max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context length of {context} "
                         "positions (max_position_embeddings)")

    images = [check_image_path(path, config, args.max_pixels) for path in args.image or ()]
    hd = effective_hd_num(config.spec, len(images), args.hd_num)
    grids = [_image_grid(image, config, hd, args.max_pixels) for image in images]
    tokenizer = InternLM2Tokenizer.from_pretrained(args.model_dir)
    rows = _prompt_rows(args, config, tokenizer, [memory.image_rows(config, g) for g, _ in grids], prompt)
    estimate = memory.estimate(config, prompt_rows=rows, max_new_tokens=args.max_new_tokens, compute_dtype=compute,
                               weight_dtype=weight_dtype, image_grids=[g for g, _ in grids],
                               num_beams=args.num_beams)
    if runtime.current_device() == "CPU":  # device memory of GPU / Ascend is not queried
        _check_memory(estimate, args.force)
    pixels = None
    if args.query is not None and images:  # videos were decoded for their grid already
        pixels = [p if p is not None else preprocess(image, config.spec, hd, max_pixels=args.max_pixels)
                  for image, (_, p) in zip(images, grids)]
    return ChatPlan(config, generation, prompt, weight_dtype, compute, pixels, estimate)


def _check_infer_mode(infer_mode: str, config: XComposerConfig) -> None:
    from ms_xcomposer.models.plora import INFER_MODES

    missing = [t for t in INFER_MODES[infer_mode] if t not in config.task_adapters]
    if missing:
        raise ValueError(f"--infer-mode {infer_mode} needs the task adapters lora_{'/'.join(missing)}, which this "
                         "checkpoint does not have (converted with --task-lora drop, or not IXC-2.5)")
