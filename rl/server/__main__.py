"""`python -m rl.server [--flag value ...]` serves; `python -m rl.server keys ...` manages keys.

python -m rl.server --port 8000 --models SmolLM2-135M-Instruct
python -m rl.server keys add alice       # prints alice's new key, once
python -m rl.server keys list
python -m rl.server keys revoke alice
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import typing
from collections.abc import Sequence

from rl.cli import describe, parse_config
from rl.errors import EngineRoomError
from rl.server.config import ServerConfig
from rl.server.keys import KeyStore


def settings(argv: Sequence[str]) -> list[str]:
    """`--key value`, `--key=value` and a bare `--flag` (a true boolean) as key=value."""
    hints = typing.get_type_hints(ServerConfig)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.lstrip("-")
        if "=" in key or not arg.startswith("--"):
            out.append(key)
        elif (
            hints.get(key.replace("-", "_")) is bool
            or i + 1 == len(argv)
            or argv[i + 1].startswith("--")
        ):
            out.append(f"{key}=true")
        else:
            out.append(f"{key}={argv[i + 1]}")
            i += 1
        i += 1
    return out


def _keys(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.server keys")
    parser.add_argument("action", choices=["add", "list", "revoke"])
    parser.add_argument("name", nargs="?")
    parser.add_argument(
        "--keys-file", default="", help="default: $ENGINEROOM_HOME/server/keys.json"
    )
    args = parser.parse_args(argv)
    store = KeyStore(ServerConfig(keys_file=args.keys_file).resolved_keys_file())
    if args.action == "list":
        for entry in store.entries():
            print(entry.name)
        return 0
    if not args.name:
        parser.error(f"keys {args.action} needs a NAME")
    if args.action == "add":
        print(store.add(args.name))
        return 0
    if not store.revoke(args.name):
        print(f"no key named {args.name!r}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["keys"]:
            return _keys(argv[1:])
        if any(a in ("-h", "--help", "help") for a in argv):
            print("python -m rl.server [--key value ...]  (keys: python -m rl.server keys)\n")
            print(re.sub(r"\n  (?=[\w.*]+[=:])", "\n  --", describe(ServerConfig)))
            sys.exit(0)
        return serve(parse_config(ServerConfig, settings(argv)))
    except EngineRoomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def serve(config: ServerConfig) -> int:
    """Starts the engine (Ray, on first use the trainer and samplers) and serves until ^C."""
    from rl.console import link_ray_logs, route_logs
    from rl.server import build_service, start_in_thread

    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING)
    # Library logs (Ray, vLLM, transformers) go to <home>/logs unless --verbose.
    route = route_logs(config.resolved_home(), verbose=config.verbose)
    keys = KeyStore(config.resolved_keys_file())
    first_key = keys.add("default") if not keys.entries() else None
    service = build_service(config)
    running = start_in_thread(config, service)
    link_ray_logs(config.resolved_home())
    print(f"engineroom Tinker server on {running.url} (models: {config.models})")
    print(f"  export TINKER_BASE_URL={running.url}")
    if first_key:
        print(f"  export TINKER_API_KEY={first_key}   # tenant 'default'; shown only now")
    print(f"  keys: {config.resolved_keys_file()} (python -m rl.server keys add NAME)")
    print(f"  logs: {route.logs_dir}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()
    service.close()
    route.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
