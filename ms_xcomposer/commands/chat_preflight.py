"""Everything `ms-xcomposer chat` checks before it loads the model: bad input fails in seconds, not after a load.

`preflight(args)` checks, in order: the model directory, its family and config (headers only, no weights), the
decoding options (warning about sampling options that greedy decoding ignores), the device / mode / dtype (the
device is selected here), `--max-new-tokens` against the context length, and then, through the family's request
check (`Family.request_check`; XComposer2: `models/xcomposer2/preflight.py`), every image, the prompt and the
memory the request needs against the available memory. Families without a request check (LLaVA, InternVL) get
the files checked and the estimate of their `vision_memory` hook (`hook_estimate`). It returns a `ChatPlan`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

SAMPLING_OPTIONS = (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"))


class MemoryRequestError(ValueError):
    """The request is estimated to need more memory than is available."""


@dataclass
class ChatPlan:
    """What preflight established: the family, decoding overrides, the family's options, the request check
    (None when the family has none: images are then passed as paths), images of a --query turn, the estimate."""

    family: object
    generation: dict
    options: dict
    check: Optional[object]
    images: Optional[list]
    estimate: Optional[object]
    weight_bytes: int

    def turn_images(self, paths):
        """The images of an interactive turn, checked (and preprocessed when the family checks requests)."""
        if not paths:
            return None
        if self.check is None:
            for path in paths:
                _check_exists(path)
            return list(paths)
        return self.check.pixels([self.check.check_path(p) for p in paths])

    def check_path(self, path: str) -> None:
        """Refuse an unreadable `/image` file now, not in the middle of the next turn."""
        if self.check is None:
            _check_exists(path)
        else:
            self.check.check_path(path)


def _check_exists(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"image {path} is a directory, not an image file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line (unset ones are left to the model's GenerationConfig),
    checked now against the directory's generation_config.json; warns (stderr) about sampling options that
    greedy decoding or beam search without --do-sample ignore."""
    from ms_xcomposer.generation import GenerationConfig

    base = GenerationConfig.from_pretrained(args.model_dir)
    ignored = [flag for name, flag in SAMPLING_OPTIONS if getattr(args, name) is not None]
    if ignored and not (args.do_sample or base.do_sample):
        decoding = "beam search" if (args.num_beams or base.num_beams) > 1 else "greedy decoding"
        print(f"warning: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored without --do-sample "
              f"({decoding}); add --do-sample to sample", file=sys.stderr)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample or None, num_beams=args.num_beams,
                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    base.updated(**kwargs)  # raises ValueError naming a bad value
    return kwargs


def family_options(args: argparse.Namespace) -> dict:
    """The family options the command line sets (only those given: a family refuses options it does not take).
    --meta-instruction implies sending it (--use-meta)."""
    options = {"hd_num": args.hd_num, "infer_mode": args.infer_mode, "max_pixels": args.max_pixels,
               "max_num": args.max_num}
    if args.use_meta or args.meta_instruction is not None:
        options["use_meta"] = True
    if args.meta_instruction is not None:
        options["meta_instruction"] = args.meta_instruction
    return {k: v for k, v in options.items() if v is not None}


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
        "use a smaller --hd-num / --max-num, smaller or fewer images, or a smaller --max-new-tokens "
        "(--force tries anyway)")


def hook_estimate(family, config, query: Optional[str], n_images: int, options: dict, max_new_tokens: int,
                  compute: str, weight_dtype: str, weight_bytes: int, num_beams: int = 1):
    """The estimate of a family without a request check, from its `vision_memory` hook (None without one): every
    image at the largest layout the family's image option allows (sizes are not read), and the query's UTF-8
    bytes (at least one byte per token) plus `TEXT_ALLOWANCE` rows of template and history as its text."""
    from ms_xcomposer import memory

    hook = family.vision_memory_hook()
    if hook is None:
        return None
    images = hook.worst(config, n_images, options.get(hook.option) if hook.option else None,
                        memory.dtype_bytes(compute))
    rows = images.rows + memory.TEXT_ALLOWANCE + len((query or "").encode("utf-8"))
    limit = hook.prompt_limit(config)
    return memory.estimate(config, prompt_rows=rows if limit is None else min(rows, limit),
                           max_new_tokens=max_new_tokens, compute_dtype=compute, weight_dtype=weight_dtype,
                           weight_bytes=weight_bytes, vision_activation=images.activation, num_beams=num_beams)


def preflight(args: argparse.Namespace) -> ChatPlan:
    """Check the whole request before any weight is read; see the module docstring. Raises ValueError / OSError."""
    from ms_xcomposer import runtime
    from ms_xcomposer.conversion.readers import open_checkpoint
    from ms_xcomposer.memory import dtype_bytes, parameter_bytes

    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir} does not exist")
    with open_checkpoint(args.model_dir) as reader:
        family, config = reader.family, reader.config
        stored = {reader.dtype(k) for k in reader.keys()}
    generation = generation_kwargs(args)
    options = family_options(args)
    runtime.setup(args.device, args.mode)
    compute = next(n for n, dt in runtime.DTYPES.items() if dt == runtime.compute_dtype(args.dtype))
    # from_pretrained keeps the stored dtype, except bf16 on CPU, upcast to the compute dtype
    weight_dtype = compute if runtime.current_device() == "CPU" and "bfloat16" in stored else max(
        stored & {"float32", "float16", "bfloat16"}, key=dtype_bytes, default=compute)
    weight_bytes = parameter_bytes(family.parameter_shapes(config), weight_dtype)
    context = config.llm.max_position_embeddings
    max_new = generation.get("max_new_tokens") or 1024
    if max_new > context:
        raise ValueError(f"--max-new-tokens {max_new} exceeds the model's context length of {context} "
                         "positions (max_position_embeddings)")
    if family.request_check is None:
        plan = ChatPlan(family, generation, options, None, None, None, weight_bytes)
        if args.image:
            plan.images = plan.turn_images(args.image) if args.query is not None else None
        plan.estimate = hook_estimate(family, config, args.query, len(args.image or ()), options, max_new, compute,
                                      weight_dtype, weight_bytes, generation.get("num_beams", 1))
        if plan.estimate is not None and runtime.current_device() == "CPU":
            _check_memory(plan.estimate, args.force)
        return plan

    check = family.request_check_class()(args.model_dir, config, options)
    images = [check.check_path(path) for path in args.image or ()]
    estimate, pixels = check.estimate(args.query, images, max_new, compute, weight_dtype, weight_bytes,
                                      generation.get("num_beams", 1))
    if runtime.current_device() == "CPU":  # device memory of GPU / Ascend is not queried
        _check_memory(estimate, args.force)
    return ChatPlan(family, generation, options, check, pixels, estimate, weight_bytes)
