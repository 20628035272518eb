"""`ms-xcomposer serve MODEL_DIR`: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

Loads the model, starts the engine thread (`ms_xcomposer.scheduler`) and runs the FastAPI app
(`ms_xcomposer.server.app`) with uvicorn. SIGTERM or Ctrl-C: new connections are refused, the requests in flight
finish, then the process exits (130, as every interrupted command).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

from ms_xcomposer.commands.chat import add_runtime_arguments, load_model, positive_int
from ms_xcomposer.images import MAX_IMAGE_PIXELS
from ms_xcomposer.config import MAX_PREFILL_TOKENS

EXAMPLES = """examples:
  ms-xcomposer serve ./ixc25-ms
  ms-xcomposer serve ./ixc25-ms --port 8080 --max-batch 16 --api-key secret --allowed-local-media /data/images
  ms-xcomposer serve ./ixc25-ms --mode graph        # compiles on the first requests, then faster

Then, for example:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "ixc25-ms", "messages": [{"role": "user", "content": "Hello"}]}'
The model id is MODEL_DIR's last path component unless --served-model-name is given. Needs the serve extra:
pip install 'ms-xcomposer[serve]' (fastapi, uvicorn). See docs/serving.md.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (chat completions, continuous batching)",
        description="Serve a converted model (any registered family) over HTTP: POST /v1/chat/completions "
                    "(streaming or not), GET /v1/models, GET /health. Requests are batched continuously.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="converted MindSpore directory (or an HF directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model id requests name (default: MODEL_DIR's last path component)")
    parser.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                        help="most requests decoding together (default 8)")
    parser.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                        help="most requests waiting for a batch row; more are answered 429 (default 64)")
    parser.add_argument("--max-tokens-in-flight", type=positive_int, metavar="N",
                        help="most tokens (prompt + max_tokens, summed over the running requests) held in the KV "
                             "cache; requests wait until it fits (default: no limit)")
    parser.add_argument("--max-prefill-tokens", type=positive_int, default=MAX_PREFILL_TOKENS, metavar="N",
                        help="most prompt tokens prefilled between two decode steps: short prompts arriving "
                             "together share a prefill up to N tokens, longer ones are prefilled in chunks of N, "
                             f"the running requests decoding a token between chunks (default {MAX_PREFILL_TOKENS})")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require `Authorization: Bearer KEY` (default: no key; also $MS_XCOMPOSER_API_KEY)")
    parser.add_argument("--allowed-local-media", metavar="DIR",
                        help="allow image_url values naming local files under DIR (default: data: URLs only)")
    parser.add_argument("--max-images", type=positive_int, default=8, metavar="N",
                        help="most images per request (default 8)")
    parser.add_argument("--max-body-mb", type=positive_int, default=32, metavar="MB",
                        help="largest request body; larger ones are answered 413 (default 32)")
    parser.add_argument("--max-pixels", type=positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help=f"largest image accepted, in pixels (default {MAX_IMAGE_PIXELS:,})")
    add_runtime_arguments(parser)
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not os.path.isdir(args.model_dir):
        raise FileNotFoundError(f"model directory {args.model_dir!r} not found")
    if args.allowed_local_media is not None and not os.path.isdir(args.allowed_local_media):
        raise FileNotFoundError(f"--allowed-local-media {args.allowed_local_media!r} is not a directory")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise ValueError(f"`serve` needs {e.name}: pip install 'ms-xcomposer[serve]'") from None


def _url(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    import uvicorn

    from ms_xcomposer.scheduler import BatchingEngine
    from ms_xcomposer.server.app import create_app

    model, processor = load_model(args.model_dir, args.device, args.mode, args.dtype)
    model_id = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    engine = BatchingEngine(model, processor, args.max_batch, args.max_queue, args.max_tokens_in_flight,
                            args.max_prefill_tokens).start()
    api_key = args.api_key or os.environ.get("MS_XCOMPOSER_API_KEY") or None
    app = create_app(engine, model_id, api_key=api_key, allowed_local_media=args.allowed_local_media,
                     max_body_bytes=args.max_body_mb << 20, max_images=args.max_images, max_pixels=args.max_pixels)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)

    def announce() -> None:
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        url = _url(args.host, port)
        auth = " -H 'Authorization: Bearer $KEY'" if api_key else ""
        print(f"serving {model_id!r} at {url} (max batch {args.max_batch}, queue {args.max_queue}); Ctrl-C or "
              f"SIGTERM stops after the requests in flight\n"
              f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d "
              f"'{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
              file=sys.stderr, flush=True)

    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        if server.started:
            announce()

    server.startup = startup
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again: a KeyboardInterrupt ends the command
    # with the CLI's "interrupted" exit code instead of a bare termination by the default SIGTERM handler.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
    if not server.started:
        engine.stop(drain=False)
        raise OSError(f"could not listen on {args.host}:{args.port} (in use, or not an address of this machine)")
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt
