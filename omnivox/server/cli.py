"""The `omnivox` command: `omnivox serve` runs the server (more subcommands join as doors grow)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from omnivox.server.auth import is_loopback
from omnivox.server.config import Config, ConfigError, load_config

log = logging.getLogger("omnivox")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.engine is not None:
        overrides.setdefault("engine", {})["name"] = args.engine
    if args.model is not None:
        overrides.setdefault("engine", {})["model"] = args.model
    if args.engine_urls:
        overrides.setdefault("engine", {})["urls"] = args.engine_urls
    return overrides


def uvicorn_options(config: Config) -> dict[str, Any]:
    """Where uvicorn listens, and the bounds on its connections (`lifecycle.uvicorn_settings`)."""
    from omnivox.server.lifecycle import uvicorn_settings

    server = config.server
    return {"host": server.host, "port": server.port, "log_level": server.log_level, **uvicorn_settings(config)}


def serve(config: Config, workers: int = 1) -> int:
    import uvicorn

    warn_if_exposed(config)
    if workers > 1:
        from omnivox.server.workers import serve_workers

        serve_workers(config, workers, uvicorn_options(config))
        return 0
    from omnivox.server.app import create_app
    from omnivox.server.lifecycle import DrainingServer

    try:
        app = create_app(config)
    except (ValueError, OSError) as exc:  # an engine or voice the configuration names cannot be set up
        print(f"omnivox: {exc}", file=sys.stderr)
        return 2
    settings = uvicorn.Config(app, **uvicorn_options(config))
    DrainingServer(settings, app.state.omnivox.lifecycle, config.connections.drain_timeout_s).run()
    return 0


def warn_if_exposed(config: Config) -> None:
    """A server reachable from other machines without a key serves anyone who finds it: say so, loudly."""
    server = config.server
    if server.api_keys or is_loopback(server.host):
        return
    log.warning(
        "NO API KEY: listening on %s:%d with server.api_keys empty, so ANYONE who can reach this port can use the "
        "engine. Set keys (OMNIVOX_SERVER__API_KEYS='[sk-...]') or listen on 127.0.0.1.",
        server.host,
        server.port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the voice agent server")
    serve_cmd.add_argument("--config", help="YAML file merged over configs/default.yaml")
    serve_cmd.add_argument("--host", help="address to listen on (server.host)")
    serve_cmd.add_argument("--port", type=int, help="port to listen on (server.port)")
    serve_cmd.add_argument(
        "--engine", help="auto | qwen2.5-omni | qwen3-omni | cascade | scripted | remote (engine.name)"
    )
    serve_cmd.add_argument("--model", help="hub id or local path of the model (engine.model)")
    serve_cmd.add_argument(
        "--engine-url", dest="engine_urls", action="append", help="an engine host of the remote engine (engine.urls)"
    )
    serve_cmd.add_argument(
        "--workers", type=int, default=1, help="front processes on one port (only with the remote engine)"
    )
    call_cmd = commands.add_parser("call", help="simulate a phone call into a Twilio Media Streams server")
    call_cmd.add_argument("--url", default="ws://127.0.0.1:8000/telephony/twilio", help="the Media Streams WebSocket")
    call_cmd.add_argument("--say", dest="turns", action="append", type=lambda text: ("say", text), help="a caller turn")
    call_cmd.add_argument(
        "--wav", dest="turns", action="append", type=lambda path: ("wav", path), help="a turn from a file"
    )
    call_cmd.add_argument("--pause", type=float, default=0.5, help="seconds between an answer and the next turn")
    call_cmd.add_argument("--barge-in-after", type=float, help="talk over the agent this many seconds into an answer")
    call_cmd.add_argument("--record", help="write the call here as a stereo 8 kHz WAV (caller left, agent right)")
    call_cmd.add_argument("--turns-timeout", type=float, default=15.0, help="seconds to wait for an answer")
    call_cmd.add_argument("--param", action="append", default=[], help="a start customParameter, NAME=VALUE")
    return parser


def call(args: argparse.Namespace) -> int:
    import asyncio

    import websockets

    from omnivox.server.phone_sim import CallOptions, Utterance, format_report, run_call

    turns = args.turns or [("say", "Hello, what can you do for me?")]
    utterances = [Utterance.say(value) if kind == "say" else Utterance.from_wav(value) for kind, value in turns]
    options = CallOptions(
        url=args.url,
        utterances=utterances,
        pause_s=args.pause,
        barge_in_after_s=args.barge_in_after,
        turns_timeout_s=args.turns_timeout,
        custom_parameters=dict(param.partition("=")[::2] for param in args.param),
    )
    try:
        result = asyncio.run(run_call(options, args.record))
    except (OSError, websockets.WebSocketException) as exc:
        print(f"omnivox call: cannot call {args.url}: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = load_config(args.config, _serve_overrides(args))
        except ConfigError as exc:
            print(f"omnivox: {exc}", file=sys.stderr)
            return 2
        from omnivox.server.workers import WorkersRefused, check_workers

        try:
            check_workers(config, args.workers)
        except WorkersRefused as exc:
            print(f"omnivox: {exc}", file=sys.stderr)
            return 2
        logging.basicConfig(level=config.server.log_level.upper(), format=LOG_FORMAT)
        return serve(config, args.workers)
    elif args.command == "call":
        logging.basicConfig(level="WARNING", format=LOG_FORMAT)
        return call(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
