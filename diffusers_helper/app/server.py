"""The app as a server: its flags, logins, what it refuses to serve, and how the page is launched.

`main()` is `python demo_gradio.py`: it checks the flags (a bad device or attention kernel stops
here, before the page opens), warns when the page is reachable from other computers, builds the
page (`ui.build_app`) and launches it. Nothing is loaded until the first job.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


from ..options import (add_lora_dir_argument, add_ray_arguments, add_runtime_arguments, add_settings_arguments,
                       add_source_arguments, cluster_options, sources_from_args)
from ..settings import GenerationSettings
from .ui import CSS, AppConfig, build_app, theme


# ---------------------------------------------------------------------------------------------
# Flags


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python demo_gradio.py`."""
    parser = argparse.ArgumentParser(
        prog="python demo_gradio.py",
        description="FramePack image-to-video in the browser. Models load when the first job starts.",
    )
    parser.add_argument("--server", default="127.0.0.1", metavar="ADDR",
                        help="address to listen on (default 127.0.0.1, this computer only; 0.0.0.0 for your network)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also publish the page through a temporary public gradio.live link")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="require this login to use the page and API (may be repeated); others on the command "
                             "line of this computer can see it, so prefer --auth-file")
    parser.add_argument("--auth-file", metavar="PATH",
                        help="require a login from this file: one USER:PASSWORD per line (# starts a comment)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in the default web browser")
    parser.add_argument("--outputs", default="outputs", metavar="DIR", help="folder for the videos and their settings (default: outputs)")
    add_lora_dir_argument(parser, "folder whose .safetensors LoRAs the page offers")
    add_settings_arguments(parser, ["model"], defaults={"model": "framepack"},
                           help={"model": "model selected when the page opens; --transformer applies to it"})
    add_source_arguments(parser, per_variant=True)
    add_runtime_arguments(parser)
    add_ray_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """The AppConfig for parsed flags; model sources are worked out (and tiny models built) on first use."""
    return AppConfig(
        outputs=Path(args.outputs).expanduser(),
        sources=lambda: sources_from_args(args, args.model),
        device=args.device,
        vram=args.vram,
        attention=args.attention,
        compile=args.compile,
        lora_dir=Path(args.lora_dir).expanduser(),
        defaults=GenerationSettings(model=args.model),
        ray=getattr(args, "cluster", None),
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; a bad --device or --attention stops here, before the page opens."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    from ..attention import resolve_attention
    from ..loading import resolve_device

    try:
        args.cluster = cluster_options(args)
        if args.cluster is None:  # with Ray each worker checks its own device
            resolve_attention(args.attention, resolve_device(args.device))
        if args.compile and args.cluster is None:
            from ..compiled import check_compile

            check_compile(resolve_device(args.device))
        args.credentials = read_credentials(args.auth, args.auth_file)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def read_credentials(pairs: Sequence[str] = (), path: Optional[str] = None) -> list[tuple[str, str]]:
    """(user, password) pairs from --auth values and an --auth-file; ValueError names a malformed one."""

    def split(text: str, where: str) -> tuple[str, str]:
        user, sep, password = text.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{where} must look like USER:PASSWORD (both parts non-empty).")
        return user.strip(), password

    credentials = [split(pair, "--auth") for pair in pairs]
    if path:
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--auth-file {path} can't be read ({getattr(exc, 'strerror', None) or exc}).") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                credentials.append(split(line, f"line {number} of --auth-file {path}"))
        if not credentials:
            raise ValueError(f"--auth-file {path} holds no USER:PASSWORD line.")
    return credentials


LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def exposure_warning(args: argparse.Namespace) -> Optional[str]:
    """A warning when the page is reachable from other computers (--server other than this one, --share)."""
    where = []
    if args.server not in LOCAL_ADDRESSES:
        where.append(f"every computer that can reach this one (listening on {args.server})")
    if args.share:
        where.append("anyone on the internet who has the gradio.live link (--share)")
    if not where:
        return None
    guard = ("Only the logins from --auth/--auth-file are let in" if getattr(args, "credentials", None)
             else "No login is required: add --auth USER:PASSWORD or --auth-file PATH")
    return (f"WARNING: the page and its API are open to {' and '.join(where)}. They can start jobs and "
            f"see every video in the outputs folder. {guard}; traffic to --server is not encrypted.")


# ---------------------------------------------------------------------------------------------
# What is served


# Gradio's file route (/file=URL, /gradio_api/file=URL) fetches public http(s) URLs for any visitor;
# nothing on this page needs that, and on an exposed page it would be an open proxy.
_REMOTE_FILE = re.compile(r"/file=\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


class RefuseRemoteFiles:
    """ASGI middleware: answer 403 to requests that ask the file route for a URL instead of a file."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _REMOTE_FILE.search(scope.get("path", "")):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("This app does not fetch URLs for visitors.", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def server_kwargs() -> dict[str, Any]:
    """Keyword arguments for the FastAPI app Gradio creates (`launch(app_kwargs=...)`)."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(RefuseRemoteFiles)]}


def launch_options(args: argparse.Namespace, config: AppConfig) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` from the flags."""
    credentials = getattr(args, "credentials", None)
    return dict(
        server_name=args.server,
        server_port=args.port,
        share=args.share,
        inbrowser=args.inbrowser,
        auth=list(credentials) if credentials else None,
        # Only the outputs folder; Gradio adds its own upload and cache folders, and nothing else is served.
        allowed_paths=[str(Path(config.outputs).resolve())],
        # but not the queue file in it: it holds every user's prompts and images
        blocked_paths=queue_files(config.outputs),
        app_kwargs=server_kwargs(),
        show_error=True,
        theme=theme(),
        css=CSS,
    )


def queue_files(outputs: Path | str) -> list[str]:
    """The outputs folder's queue file and its journal, which the page never serves."""
    from ..jobstore import FILENAME

    queue = Path(outputs).resolve() / FILENAME
    return [str(queue), f"{queue}-journal"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python demo_gradio.py`: check the flags, warn when the page is exposed, open the page."""
    args = parse_args(argv)
    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = config_from_args(args)
    try:
        demo = build_app(config)
    except ValueError as exc:  # the Ray cluster can't be reached or can't hold the workers
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        demo.launch(**launch_options(args, config))
    finally:
        demo.job_queue.close()
        if demo.cluster is not None:
            demo.cluster.close()
