"""``tunelab serve MODEL_OR_RUN``: the OpenAI-compatible API on a local port."""

from __future__ import annotations

import os
import sys

from tunelab.config import DEFAULT_MODEL, ServeConfig
from tunelab.errors import TunelabError
from tunelab.chat import add_generation_options, settings_from_args
from tunelab.generation import GenerationSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_server(
    spec: str,
    adapters: list[str] | None = None,
    settings: GenerationSettings | None = None,
    host: str = ServeConfig.host,
    port: int = ServeConfig.port,
    api_key: str | None = None,
    max_queue: int = ServeConfig.max_queue,
    max_batch: int = ServeConfig.max_batch,
    quantize: str | None = None,
    threads: int | None = None,
) -> None:
    """Load ``spec`` and ``adapters`` and serve them until Ctrl-C (finishing running answers)."""
    import uvicorn

    from tunelab.serve.app import create_app
    from tunelab.serve.models import load_for_serving

    if settings is not None and settings.num_beams > 1:
        raise TunelabError("serve streams answers and batches requests, which beam search cannot do: use num_beams=1")
    api_key = api_key or os.environ.get("TUNELAB_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        print(f"warning: serving on {host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)
    print(f"loading {spec} ...", file=sys.stderr, flush=True)
    served = load_for_serving(spec, adapters, quantize, threads)
    app = create_app(served, settings, api_key=api_key, max_queue=max_queue, max_batch=max_batch)
    print(f"serving {', '.join(served.ids)} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


def register(subparsers) -> None:
    defaults = ServeConfig()
    parser = subparsers.add_parser("serve", help="serve a model (and LoRA adapters) over an OpenAI-compatible API",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"model spec or run folder (default {DEFAULT_MODEL})")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]RUN",
                        help="also serve this LoRA run folder, as NAME or its folder name (repeatable)")
    parser.add_argument("--host", default=defaults.host, help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $TUNELAB_API_KEY)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests beyond this get 503")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests generated together")
    add_generation_options(parser)
    parser.set_defaults(func=_main)


def _main(args) -> int:
    if args.max_queue < 1 or args.max_batch < 1:
        raise TunelabError("serve: --max-queue and --max-batch must be >= 1")
    run_server(args.model, args.adapter, settings_from_args(args), args.host, args.port, args.api_key,
               args.max_queue, args.max_batch, args.quantize, args.threads)
    return 0
