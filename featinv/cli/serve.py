"""``featinv serve``: the interactive web app's command (the app itself is :mod:`featinv.web.app`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from featinv.choices import SERVE_BACKENDS
from featinv.cli.options import add_guidance_on_arg, add_twin_encoder_arg, fast_options
from featinv.errors import FeatInvError
from featinv.limits import arg


def cmd_serve(args: argparse.Namespace) -> int:
    """The interactive web app (FastAPI + one HTML page) on the demo models or --model DIR
    (and --pooled-model DIR)."""
    try:
        from featinv.web.app import serve
    except ImportError as error:
        raise FeatInvError(f"featinv serve needs the web extra: pip install 'featinv[web]' ({error})") from error
    for flag, folder in (("--model", args.model), ("--pooled-model", args.pooled_model), ("--examples", args.examples)):
        if folder is not None and not Path(folder).is_dir():
            raise FeatInvError(f"{flag} folder not found: {folder}")
    if args.realtime and args.model is not None:
        from featinv.models.model_config import read_model_config

        if read_model_config(args.model).get("distillation") is None:
            raise FeatInvError(
                f"--realtime needs a distilled model (featinv train --model M --distill); {args.model} is not"
            )
    _check_listen_address(args.host, args.port)
    fast = fast_options(args.twin_encoder, args.backend)
    print("loading and warming up the model(s)...", flush=True)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        backend=args.backend,
        fast_options=fast,
        pooled_model_dir=args.pooled_model,
        examples=args.examples,
        api_docs=args.api_docs,
        max_images=args.max_images,
        batching=not args.no_batching,
        realtime=args.realtime,
        steps=args.steps,
        guidance=args.guidance_on,
        trust_code=args.trust_code,
    )
    return 0


def _check_listen_address(host: str, port: int) -> None:
    """Fail before loading any model when ``host:port`` cannot be listened on (a bad port, a port in
    use, an address not of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.bind(infos[0][4])
    except OSError as error:
        raise FeatInvError(
            f"cannot listen on --host {host} --port {port}: {error.strerror or error} (choose another --port or --host)"
        ) from error


def add_serve_command(commands) -> None:
    """Add ``serve`` to the CLI's subcommands."""
    serve = commands.add_parser("serve", help="the interactive web app")
    serve.add_argument("--model", help="FeatInv model folder (default: the shipped demo models, spatial and pooled)")
    serve.add_argument(
        "--pooled-model", help="a model of the same classifier trained on pooled maps: the page offers a switch"
    )
    serve.add_argument("--examples", help="a folder of images for the page's example picker (e.g. ImageNet layout)")
    serve.add_argument("--api-docs", action="store_true", help="also serve FastAPI's /docs and /openapi.json")
    serve.add_argument(
        "--max-images",
        type=arg("max_images"),
        default=256,
        help="uploaded images whose feature maps the server keeps (LRU)",
    )
    serve.add_argument(
        "--no-batching", action="store_true", help="one request at a time (default: queued clients share a batch)"
    )
    serve.add_argument(
        "--realtime",
        action="store_true",
        help="the real-time mode: the distilled demo model (or --model, if distilled), 4 steps of its sampler",
    )
    serve.add_argument("--steps", type=arg("steps"), help="steps per reconstruction (default 10 dpmpp; realtime: 4)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=arg("port"), default=8000)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--backend", choices=SERVE_BACKENDS, default="eager", help="denoiser backend (fast: CUDA only)")
    add_twin_encoder_arg(serve)
    add_guidance_on_arg(serve)
    serve.set_defaults(func=cmd_serve)
