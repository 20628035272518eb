"""`ms-xcomposer chat MODEL_DIR`: one answer with --query, or an interactive multi-turn session without it.

The session streams each answer as it is generated. Lines starting with `/` are commands: `/image PATH` adds an
image to the next message, `/reset` starts a new conversation, `/exit` (or Ctrl-D) quits, `/help` lists them.
Ctrl-C while an answer is streaming stops that answer; at the prompt it quits (exit 130).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence, Tuple

from ms_xcomposer.cli import EXIT_OK
from ms_xcomposer.commands.chat_preflight import ChatPlan, preflight
from ms_xcomposer.images import MAX_IMAGE_PIXELS

EXAMPLES = """examples:
  ms-xcomposer chat ./ixc25-ms --image photo.jpg --query "Describe this image."
  ms-xcomposer chat ./ixc25-ms --image a.jpg --image b.jpg --query "Image1 <ImageHere>; Image2 <ImageHere>; Compare them."
  ms-xcomposer chat ./ixc25-ms --image photo.jpg --do-sample --temperature 0.8 --top-p 0.8 --seed 0
  ms-xcomposer chat ./ixc25-ms --num-beams 3 --use-meta --query "Write a poem about the sea."
  ms-xcomposer chat ./ixc25-ms --infer-mode write --meta-instruction "You are a poet." --query "A poem, please."
  ms-xcomposer chat ./ixc25-ms --mode graph            # interactive session; the first answer compiles the graphs
  ms-xcomposer chat ./ixc25-ms --device Ascend --dtype bfloat16 --image photo.jpg   # never run by the developers
  ms-xcomposer chat ./internvl15-ms --image a.jpg --image b.jpg --max-num 12 --query "Compare the two images."

MODEL_DIR is a converted directory (`ms-xcomposer convert`) or a Hugging Face directory (read directly).
Without --query an interactive session starts; --image files are attached to its first message. In a session:
  /image PATH   attach an image to the next message (IXC-2.5 places a single image first; otherwise each new
                image goes at the start of the message unless the message has its own <ImageHere> marks)
  /reset        forget the conversation and its images
  /exit         quit (also Ctrl-D); Ctrl-C stops the answer being streamed
Decoding defaults: GenerationConfig's (greedy, no repetition penalty, at most 1024 new tokens), overridden by
the model directory's generation_config.json, then by these options (the library's `chat` uses the same).
Every input is checked before the model is loaded, including the memory the request needs (refused above the
available memory unless --force; see `ms-xcomposer info DIR --estimate`).
The answer goes to stdout; loading, memory and timing lines go to stderr.
"""
SESSION_HELP = ("commands: /image PATH (attach an image to the next message), /reset (new conversation), "
                "/exit (quit; also Ctrl-D), /help")


class Session:
    """The conversation state of the interactive chat: history, the images sent so far, images for the next turn.

    Images are re-sent with every turn (the model sees the whole conversation each time), as the official
    multi-turn usage does; `<ImageHere>` marks in the history place them.
    """

    def __init__(self, placeholder: str, auto_image_placeholder: bool) -> None:
        self.placeholder, self.auto_image_placeholder = placeholder, auto_image_placeholder
        self.history: List[Tuple[str, str]] = []
        self.images: List[str] = []
        self.pending: List[str] = []

    def reset(self) -> None:
        self.history, self.images, self.pending = [], [], []

    def turn(self, query: str) -> Tuple[str, Optional[List[str]], List[Tuple[str, str]]]:
        """(query text with placeholders, all images or None, history) for the next message."""
        images = self.images + self.pending
        history = list(self.history)
        mark = self.placeholder
        placed = sum(q.count(mark) for q, _ in history)
        if self.pending and mark not in query:
            if self.auto_image_placeholder and len(images) == 1:
                pass  # the variant puts a lone image first, as the official chat does
            else:
                if placed < len(self.images):  # an earlier lone image was placed implicitly: make it explicit
                    q0, a0 = history[0]
                    history[0] = (mark * (len(self.images) - placed) + q0, a0)
                query = mark * len(self.pending) + query
        return query, (images or None), history

    def commit(self, history: Sequence[Tuple[str, str]]) -> None:
        """Record a finished turn: the history returned by the chat, and the images it sent."""
        self.history = list(history)
        self.images += self.pending
        self.pending = []


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--device / --mode / --dtype, validated by `ms_xcomposer.runtime` (which imports MindSpore: not here)."""
    parser.add_argument("--device", default="CPU", help="MindSpore device: CPU (default), GPU or Ascend")
    parser.add_argument("--mode", default="pynative", type=str.lower,
                        help="MindSpore mode: pynative (default) or graph (compiles once, then faster)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="compute dtype (default: the device's; CPU: float32, GPU/Ascend: bfloat16)")


def load_model(model_dir: str, device: str, mode: str, dtype: Optional[str], weights_bytes: int = 0):
    """(model, processor) of MODEL_DIR's family after selecting the device and mode; prints a line to stderr before
    loading (it can take a minute on a 7B) and one after."""
    from ms_xcomposer import runtime
    from ms_xcomposer.api import load
    from ms_xcomposer.commands.convert import progress_bar

    runtime.setup(device, mode)
    size = f" ({weights_bytes / 1e9:.2f} GB of weights)" if weights_bytes else ""
    print(f"loading {model_dir}{size} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with progress_bar(False, "load") as progress:  # a bar on a terminal, plain lines otherwise
        model, processor = load(model_dir, dtype=dtype, progress=progress)
    compute = next(name for name, dt in runtime.DTYPES.items() if dt == model.compute_dtype)
    print(f"loaded {type(model).__name__} from {model_dir} in {time.perf_counter() - start:.1f} s "
          f"({runtime.current_device()}, {mode} mode, {compute} compute)", file=sys.stderr)
    return model, processor


def _answer(model, processor, query: str, images, history, plan: ChatPlan):
    """Stream one answer to stdout and return its ChatResult; Ctrl-C stops the generation and propagates.

    images: as `ChatPlan.turn_images` gives them (XComposer2: normalised pixels), or None."""
    from ms_xcomposer.conversation import stream_chat

    start = time.perf_counter()
    stream = stream_chat(model, processor, query, images, history, **plan.options, **plan.generation)
    with stream:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(stream.result.ids)
    print(f"[{n} tokens in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return stream.result


def _interactive(model, processor, args: argparse.Namespace, plan: ChatPlan) -> int:
    session = Session(processor.image_placeholder, processor.auto_image_placeholder)
    session.pending = list(args.image or [])
    print(f"interactive chat with {type(model).__name__}. {SESSION_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command == "/exit":
                return EXIT_OK
            if command == "/reset":
                session.reset()
                print("[conversation reset]")
            elif command == "/image":
                path = rest.strip()
                try:  # refuse unreadable files now, not in the middle of the next turn
                    plan.check_path(path)
                except (ValueError, OSError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    continue
                session.pending.append(path)
                print(f"[image {path} attached to the next message]")
            elif command == "/help":
                print(SESSION_HELP)
            else:
                print(f"error: unknown command {command!r}; {SESSION_HELP}", file=sys.stderr)
            continue
        query, paths, history = session.turn(line)
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        try:
            result = _answer(model, processor, query, plan.turn_images(paths), history, plan)
        except KeyboardInterrupt:
            print("\n[stopped]")
            continue
        except (ValueError, OSError) as e:  # prompt or image problems: the session goes on
            print()
            print(f"error: {e}", file=sys.stderr)
            continue
        session.commit(result.history)


def run(args: argparse.Namespace) -> int:
    plan = preflight(args)  # every input checked before the weights are read
    model, processor = load_model(args.model_dir, args.device, args.mode, args.dtype, plan.weight_bytes)
    if args.query is None:
        return _interactive(model, processor, args, plan)
    _answer(model, processor, args.query, plan.images, (), plan)
    return EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat about images with a converted (or HF) model: one answer, or an interactive session",
        description="Chat with a converted model of any registered family (IXC2-VL / IXC2-4KHD / IXC-2.5): one "
                    "answer with --query, otherwise an interactive multi-turn session with streamed answers.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="converted MindSpore directory (or an HF directory)")
    parser.add_argument("--image", metavar="PATH", action="append",
                        help="image file (repeat for several; a video file for IXC-2.5 needs PyAV)")
    parser.add_argument("--query", help="the message; without it an interactive session starts")
    parser.add_argument("--hd-num", type=positive_int, metavar="N",
                        help="HD tile budget per image (default: the variant's: 24 for IXC-2.5, 25 for 4KHD; "
                             "IXC-2.5 uses 6 with several images)")
    parser.add_argument("--max-num", type=positive_int, metavar="N",
                        help="InternVL: most tiles per image (default 6, the model card's; plus a thumbnail)")
    parser.add_argument("--use-meta", action="store_true",
                        help="IXC-2.5: send the default system prompt (IXC2-VL / 4KHD always send it)")
    parser.add_argument("--meta-instruction", metavar="TEXT",
                        help="the system prompt to send instead of the default (implies --use-meta; '' sends none)")
    parser.add_argument("--infer-mode", choices=("base", "web", "write"),
                        help="IXC-2.5 task adapters: base (default), web (lora_web) or write (lora_sft + lora_dpo)")
    parser.add_argument("--max-pixels", type=positive_int, metavar="N",
                        help=f"largest image accepted, in pixels (default: {MAX_IMAGE_PIXELS:,}, PIL's "
                             "decompression-bomb threshold; PIL refuses more than twice that in any case)")
    parser.add_argument("--force", action="store_true",
                        help="go on when the request is estimated to need more memory than is available")
    gen = parser.add_argument_group(
        "decoding", "defaults: the model directory's generation_config.json, else GenerationConfig's (greedy, "
                    "no repetition penalty, at most 1024 new tokens)")
    gen.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                     help="most new tokens per answer (at most the model's context length)")
    gen.add_argument("--num-beams", type=positive_int, metavar="N", help="beam search width")
    gen.add_argument("--do-sample", action="store_true",
                     help="sample instead of greedy decoding (with --num-beams: beam sampling)")
    gen.add_argument("--temperature", type=float, help="sampling temperature (needs --do-sample)")
    gen.add_argument("--top-p", type=float, help="sampling nucleus (needs --do-sample)")
    gen.add_argument("--top-k", type=int, help="sampling top-k (50 when sampling and unset; needs --do-sample)")
    gen.add_argument("--seed", type=int, help="random seed of sampling")
    gen.add_argument("--repetition-penalty", type=float, help="repetition penalty (1.0 disables it; the official "
                                                              "chat uses 1.005)")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)
