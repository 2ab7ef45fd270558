"""kagent-ctl: call any agent RPC from the host (or a shell) by its name.

  kagent-ctl --addr unix:///run/kagent.sock Check
  kagent-ctl --addr ADDR CreateContainer @request.json
  kagent-ctl --addr ADDR WaitProcess '{"container_id": "c1", "exec_id": "c1"}'
  kagent-ctl --addr ADDR list

The request is the protobuf JSON mapping of the RPC's request message (field
names as in the .proto or lowerCamelCase).  The response is printed as JSON.
Errors exit non-zero with the status code and message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kagent-ctl", description="Call kagent (or any Kata agent) RPCs by name.")
    p.add_argument("--addr", "-a", default=os.environ.get("KAGENT_ADDR"),
                   help="agent address: unix:///path, unix://@name, vsock://CID:PORT, hvsock://PATH:PORT "
                        "(default $KAGENT_ADDR)")
    p.add_argument("--timeout", "-t", type=float, default=60.0,
                   help="per-call deadline in seconds, sent to the agent (0 = none; default 60)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="how long to retry connecting (s)")
    p.add_argument("--repeat", "-n", type=int, default=1, help="make the call N times (prints each response)")
    p.add_argument("--compact", action="store_true", help="one line of JSON per response")
    p.add_argument("--raw", action="store_true",
                   help="write a response's bytes field (ReadStdout/ReadStderr data) as is, not as JSON")
    p.add_argument("call", help="RPC name (e.g. Check, CreateContainer), or 'list'")
    p.add_argument("request", nargs="?", default="{}", help="request as JSON, or @FILE (default {})")
    return p


def _load_request(text: str) -> str:
    if text.startswith("@"):
        path = text[1:]
        if path == "-":
            return sys.stdin.read()
        with open(path) as f:
            return f.read()
    return text


def _to_json(message, compact: bool) -> str:
    from google.protobuf import json_format

    obj = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)


def _write_raw(message) -> bool:
    """Write the message's only bytes field to stdout; False when it has none."""
    fields = [f for f in message.DESCRIPTOR.fields if f.type == f.TYPE_BYTES]
    if len(fields) != 1:
        return False
    sys.stdout.buffer.write(getattr(message, fields[0].name))
    sys.stdout.buffer.flush()
    return True


async def _run(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from kagent import protocols
    from kagent.ttrpc.client import Client
    from kagent.ttrpc.status import RpcError

    if args.call == "list":
        for m in sorted(protocols.methods().values(), key=lambda m: (m.service, m.name)):
            print(f"{m.name:34} {m.service:18} {m.request.DESCRIPTOR.name} -> {m.response.DESCRIPTOR.name}")
        return 0
    try:
        method = protocols.find(args.call)
    except KeyError:
        print(f"kagent-ctl: unknown RPC {args.call!r} (try 'list')", file=sys.stderr)
        return EXIT_USAGE
    try:
        request = json_format.Parse(_load_request(args.request), method.request())
    except (OSError, json_format.ParseError, ValueError) as exc:
        print(f"kagent-ctl: bad request for {method.name} ({method.request.DESCRIPTOR.name}): {exc}",
              file=sys.stderr)
        return EXIT_USAGE
    if not args.addr:
        print("kagent-ctl: --addr is required (or set KAGENT_ADDR)", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = await Client.connect(args.addr, timeout=args.connect_timeout)
    except (ConnectionError, ValueError, OSError) as exc:
        print(f"kagent-ctl: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    rc = 0
    durations = []
    try:
        for _ in range(max(1, args.repeat)):
            started = time.perf_counter()
            try:
                response = await client.call(method.service, method.name, request, method.response,
                                             timeout=args.timeout or None)
            except RpcError as exc:
                print(f"kagent-ctl: {method.name} failed: {exc}", file=sys.stderr)
                rc = EXIT_RPC_ERROR
                continue
            durations.append(time.perf_counter() - started)
            if args.raw and _write_raw(response):
                continue
            print(_to_json(response, args.compact), flush=True)
    finally:
        await client.close()
    if args.repeat > 1 and durations:
        durations.sort()
        p50 = durations[len(durations) // 2] * 1e3
        print(f"kagent-ctl: {len(durations)}/{args.repeat} ok, p50 {p50:.3f} ms, max {durations[-1] * 1e3:.3f} ms",
              file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    from kagent.cli import console

    argv = sys.argv[1:] if argv is None else list(argv)
    if console.wants(argv):  # kagent-ctl console --addr ...: an interactive session, not an RPC
        return console.main(argv)
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
