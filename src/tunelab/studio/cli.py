"""``tunelab studio [--host 127.0.0.1] [--port N] [--workspace DIR] [--token TOKEN|auto]``."""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from tunelab.errors import TunelabError

DEFAULT_PORT = 8600
TOKEN_ENV = "TUNELAB_STUDIO_TOKEN"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> str | None:
    """The token to require, or ``TunelabError`` for a non-loopback bind without one.

    ``auto`` generates a token. On the loopback a token is optional.
    """
    if token == "auto":
        token = secrets.token_urlsafe(24)
    if not is_loopback(host) and not token:
        raise TunelabError(f"studio: --host {host} would let other machines start jobs and read the workspace; "
                           "give --token TOKEN (or --token auto to generate one), or keep the default 127.0.0.1")
    return token or None


def run_studio(workspace: str = ".", host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
               stall_after: float = 300.0, stop_timeout: float = 60.0) -> None:
    """Serve the studio for ``workspace`` until Ctrl-C; jobs it started keep running after it."""
    from tunelab.studio.workspace import Workspace

    token = check_bind(host, token if token is not None else os.environ.get(TOKEN_ENV))  # before any slow import
    root = Workspace(workspace).root
    import uvicorn

    from tunelab.studio.app import create_app

    os.chdir(root)  # recipes name paths relative to the workspace, as `tunelab train` run there does
    app = create_app(root, token=token, loopback=is_loopback(host), stall_after=stall_after, stop_timeout=stop_timeout)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"tunelab studio: workspace {root}", file=sys.stderr)
    print(f"tunelab studio: open {url}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "studio", help="web app: configure, launch, watch, compare and chat with runs",
        description="Serve tunelab studio: a local web app over the runs in a workspace folder. Jobs run as "
                    "detached `tunelab train` / `tunelab eval` processes and survive the browser and the studio.")
    parser.add_argument("--workspace", default=".", help="folder holding data, models and runs (default: here)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; any other needs --token)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token", help=f"require this token (auto: generate one; default ${TOKEN_ENV})")
    parser.add_argument("--stall-after", type=float, default=300.0, metavar="S",
                        help="flag a running job that logged no step for S seconds (default 300)")
    parser.add_argument("--stop-timeout", type=float, default=60.0, metavar="S",
                        help="after Stop, end the job's process group if it has not exited in S seconds (default 60)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise TunelabError(f"studio: --port {args.port} is not a port number")
    run_studio(args.workspace, args.host, args.port, args.token, args.stall_after, args.stop_timeout)
    return 0
