"""Real Python clients for keygate's tests; each subcommand prints one JSON document on stdout.

    python clients.py get URL --ca PEM [--http2] [-H 'Name: value']...
    python clients.py sse URL --ca PEM [-H ...]            # each event with its arrival time
    python clients.py ws-echo URL --ca PEM [-H ...] [--messages N] [--size BYTES] [--pause-ms MS]
                                         [--idle-s S]  # then silence (no pings) for up to S s
    python clients.py ws-stream URL --ca PEM [-H ...] [--pause-ms MS] [--max-s S]
        # one message every MS ms; one JSON line per echo ({"echo": i}) as it comes back, then
        # one line when the connection closes ({"closed": {"code", "reason", "by_server"}}) or
        # after S s ({"done": n}, closed normally)

Trust is the keygate test certificate given by --ca (never verification turned off).
"""

import argparse
import asyncio
import json
import ssl
import sys
import time


def headers_of(args):
    out = []
    for h in args.header or []:
        name, value = h.split(":", 1)
        out.append((name.strip(), value.strip()))
    return out


def cmd_get(args):
    import httpx

    ctx = ssl.create_default_context(cafile=args.ca)
    with httpx.Client(verify=ctx, http2=args.http2) as c:
        r = c.get(args.url, headers=headers_of(args))
        print(
            json.dumps(
                {
                    "status": r.status_code,
                    "http_version": r.http_version,
                    "headers": [[k, v] for k, v in r.headers.multi_items()],
                    "body": r.text,
                }
            )
        )


def cmd_sse(args):
    import httpx

    ctx = ssl.create_default_context(cafile=args.ca)
    events = []
    with httpx.Client(verify=ctx, timeout=30) as c:
        with c.stream("GET", args.url, headers=headers_of(args)) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append({"sent": float(line[6:]), "received": time.time()})
    print(json.dumps({"status": status, "events": events}))


async def ws_echo(args):
    import websockets

    ctx = ssl.create_default_context(cafile=args.ca)
    results = {"echoed": 0, "bytes_sent": 0, "bytes_received": 0}
    async with websockets.connect(
        args.url,
        ssl=ctx,
        additional_headers=headers_of(args),
        max_size=None,
        compression=None,  # so the bytes on the wire are the payload's (keygate's log counts them)
        ping_interval=None if args.idle_s else 20,
    ) as ws:
        for i in range(args.messages):
            payload = bytes((i + j) % 256 for j in range(args.size))
            await ws.send(payload)
            back = await ws.recv()
            if back != payload:
                results["mismatch"] = i
                break
            results["echoed"] += 1
            results["bytes_sent"] += len(payload)
            results["bytes_received"] += len(back)
            if args.pause_ms:
                await asyncio.sleep(args.pause_ms / 1000)
        if args.idle_s:
            # A client that just sits (or vanished): how long until the tunnel is closed?
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(ws.recv(), args.idle_s)
                results["closed_after"] = "message"
            except asyncio.TimeoutError:
                results["closed_after"] = None
            except websockets.ConnectionClosed:
                results["closed_after"] = round(time.monotonic() - t0, 2)
            print(json.dumps(results))
            return
        await ws.send("bye")
        results["text"] = await ws.recv()
    print(json.dumps(results))


async def ws_stream(args):
    import websockets

    ctx = ssl.create_default_context(cafile=args.ca)

    def say(doc):
        print(json.dumps(doc), flush=True)

    async with websockets.connect(
        args.url,
        ssl=ctx,
        additional_headers=headers_of(args),
        compression=None,
        ping_interval=None,
    ) as ws:
        deadline = time.monotonic() + args.max_s
        i = 0
        try:
            while time.monotonic() < deadline:
                await ws.send(f"m{i}")
                back = await ws.recv()
                if back != f"m{i}":
                    say({"mismatch": i})
                    return
                say({"echo": i})
                i += 1
                await asyncio.sleep(args.pause_ms / 1000)
        except websockets.ConnectionClosed as e:
            rcvd = e.rcvd
            say(
                {
                    "closed": {
                        "code": rcvd.code if rcvd else None,
                        "reason": rcvd.reason if rcvd else None,
                        "by_server": rcvd is not None,
                    }
                }
            )
            return
        say({"done": i})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["get", "sse", "ws-echo", "ws-stream"])
    p.add_argument("url")
    p.add_argument("--ca", required=True)
    p.add_argument("-H", "--header", action="append")
    p.add_argument("--http2", action="store_true")
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--pause-ms", type=int, default=0)
    p.add_argument("--idle-s", type=float, default=0)
    p.add_argument("--max-s", type=float, default=60)
    args = p.parse_args()
    if args.cmd == "get":
        cmd_get(args)
    elif args.cmd == "sse":
        cmd_sse(args)
    elif args.cmd == "ws-stream":
        asyncio.run(ws_stream(args))
    else:
        asyncio.run(ws_echo(args))


if __name__ == "__main__":
    sys.exit(main())
