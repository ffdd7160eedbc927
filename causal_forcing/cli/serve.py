"""`causal-forcing serve`: the real-time streaming web page and its WebSocket server.

Binds to 127.0.0.1 unless ``--host`` says otherwise. With a loopback host, requests must name a loopback host
(DNS-rebinding protection); browsers may open sockets only from the page's own origin and ``--allow-origin``s.
"""
from __future__ import annotations

import argparse
import ipaddress

from ..errors import InputError
from .generate import add_model_arguments, pipeline_from_args

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command."""
    p = subparsers.add_parser(
        "serve", help="serve the real-time streaming page (WebSocket)",
        description="Serve a web page that streams video from a prompt as it is generated: switch the prompt live, "
                    "start from an image, download what was generated. Several sessions share one model.")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-sessions", type=int, default=2, metavar="N",
                   help="concurrent viewers; the next one is told the server is busy (default 2)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="another page origin (scheme://host[:port]) allowed to open sockets; repeatable")
    p.add_argument("--window-frames", type=int, default=None, metavar="N",
                   help="rolling KV cache in latent frames (default: the model's window, else its video length)")
    p.add_argument("--sink-frames", type=int, default=None, metavar="N",
                   help="first latent frames kept in the window as attention sink (default: the model's, else "
                        "one block)")
    p.add_argument("--recache-frames", type=int, default=None, metavar="N",
                   help="frames re-cached under the new prompt on a switch (default: the whole window)")
    p.add_argument("--max-frames", type=int, default=16 * 600 + 1, metavar="N",
                   help="pixel frames after which a run stops (default 9601, 10 minutes at 16 fps)")
    p.add_argument("--realtime", action=argparse.BooleanOptionalAction, default=True,
                   help="pace generation to playback (default); --no-realtime generates as fast as possible")
    add_model_arguments(p)
    p.set_defaults(func=run)


def allowed_hosts(host: str) -> tuple[str, ...] | None:
    """Host header names to accept: loopback names for a loopback bind, anything for a wildcard bind."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK_NAMES + (host,) if host == "localhost" else (host,)
    if address.is_unspecified:
        return None
    return LOOPBACK_NAMES if address.is_loopback else (host,)


def run(args: argparse.Namespace) -> int:
    """Check the options, load the model, serve until interrupted."""
    try:
        import uvicorn

        from ..serving.app import ServerConfig, create_app
    except ImportError as e:
        raise InputError(f"serving needs fastapi, uvicorn and websockets ({e.name} is missing): "
                         "pip install fastapi uvicorn websockets") from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    config = ServerConfig(max_sessions=args.max_sessions, allowed_origins=tuple(args.allow_origin),
                          allowed_hosts=allowed_hosts(args.host), window_frames=args.window_frames,
                          sink_frames=args.sink_frames, recache_frames=args.recache_frames,
                          max_frames=args.max_frames, realtime=args.realtime)
    pipeline = pipeline_from_args(args)
    app = create_app(pipeline, config)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"model: {pipeline.description}; {pipeline.device}; open http://{shown}:{args.port}/")
    # Messages up to twice the image limit reach the app, which answers with an error; larger ones close the
    # socket (code 1009) before they are buffered.
    uvicorn.run(app, host=args.host, port=args.port, ws_max_size=2 * config.max_image_bytes, log_level="info")
    return 0
