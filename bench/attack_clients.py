#!/usr/bin/env python3
"""Hostile-but-simple clients for bench/attack.sh (stdlib only: asyncio + ssl).

  idle  N HOST PORT TOKEN [PATH] [ADDRS]
                                  open N TLS connections (ALPN http/1.1), send one keep-alive
                                  GET each, read the response, then hold them idle. Connection i
                                  comes from 127.0.0.(10 + i % ADDRS) (default 200 addresses,
                                  so that a per-address cap does not decide the figure). Prints
                                  "ready <n>" once all are idle, then waits for SIGTERM.
  slowread N HOST PORT TOKEN PATH SECS [PIPELINE]
                                  open N TLS connections (from 127.0.0.10.. like idle), each
                                  with a 4 KiB receive buffer, send PIPELINE (default 3) keep-alive
                                  GETs of PATH at once, then read 32 bytes every 5 s for SECS
                                  seconds (slowhttptest -X, which cannot send an API key).
                                  Prints "ready <n>" once all have sent, and at the end
                                  "done <n> <bytes read>".
  paced HOST PORT TOKEN PATH COUNT GAP_MIN GAP_MAX
                                  COUNT requests one after another on one keep-alive TLS
                                  connection (a new one if the proxy closes it), a random pause
                                  of GAP_MIN..GAP_MAX s between them; prints "ok <n> failed <m>"
  closing-upstream PORT MODE      a plain HTTP/1.1 upstream that answers 200 "ok" to anything.
                                  MODE "close": it closes each connection right after its
                                  response, without "Connection: close"; MODE "idle:S": it keeps
                                  connections alive but closes one idle for S seconds. Runs until
                                  SIGTERM.
  bare  N HOST PORT [SRC]         open N TCP connections from SRC (default 127.0.0.1) that never
                                  send a byte; prints "ready <n>" and holds them until SIGTERM.
  probe HOST PORT TOKEN SRC COUNT INTERVAL
                                  COUNT requests, each on a new TLS connection from SRC, one
                                  every INTERVAL s, 2 s timeout each; prints served/COUNT and
                                  the longest run of failures in seconds.

Everything is bounded: counts from the command line, 2 s per probe, 60 s per connection setup.
"""
import asyncio
import signal
import socket
import ssl
import sys
import time


def tls_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return int(head[9:12])


async def wait_term():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()


async def idle(n, host, port, token, path="/small", addrs="200"):
    ctx = tls_ctx()
    conns = []
    sem = asyncio.Semaphore(64)
    statuses = {}
    addrs = int(addrs)

    async def one(i):
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        port,
                        ssl=ctx,
                        server_hostname="localhost",
                        local_addr=(f"127.0.0.{10 + i % addrs}", 0),
                    ),
                    60,
                )
                w.write(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n".encode()
                )
                st = await asyncio.wait_for(read_response(r), 60)
                statuses[st] = statuses.get(st, 0) + 1
                conns.append((r, w))
            except Exception as e:  # counted, not fatal: the report shows how many are held
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1

    await asyncio.gather(*(one(i) for i in range(n)))
    print(f"ready {len(conns)} {statuses}", flush=True)
    await wait_term()


async def slowread(n, host, port, token, path, secs, pipeline="3", addrs="200"):
    ctx = tls_ctx()
    conns = []
    sem = asyncio.Semaphore(64)
    loop = asyncio.get_running_loop()
    pipeline, addrs, secs = int(pipeline), int(addrs), float(secs)
    req = (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n" * pipeline
    ).encode()

    async def one(i):
        async with sem:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small receive buffer (set before connect, so the window stays small), as
            # slowhttptest -w/-y do: the server's data waits in its own buffers.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            try:
                s.bind((f"127.0.0.{10 + i % addrs}", 0))
                await asyncio.wait_for(loop.sock_connect(s, (host, port)), 10)
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(
                        sock=s, ssl=ctx, server_hostname="localhost", limit=4096
                    ),
                    30,
                )
                w.write(req)
                conns.append((r, w))
            except Exception:
                s.close()

    await asyncio.gather(*(one(i) for i in range(n)))
    print(f"ready {len(conns)}", flush=True)
    got = 0
    end = time.monotonic() + secs

    async def reader(r):
        nonlocal got
        while time.monotonic() < end:
            try:
                b = await asyncio.wait_for(r.read(32), max(0.1, end - time.monotonic()))
            except Exception:
                return
            if not b:
                return
            got += len(b)
            await asyncio.sleep(5)

    await asyncio.gather(*(reader(r) for r, _ in conns))
    for _, w in conns:
        w.transport.abort()
    print(f"done {len(conns)} {got}", flush=True)


async def paced(host, port, token, path, count, gap_min, gap_max):
    import random

    ctx = tls_ctx()
    ok = failed = 0
    conn = None
    req = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\n\r\n".encode()
    for _ in range(int(count)):
        try:
            if conn is None:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"), 5
                )
            r, w = conn
            w.write(req)
            st = await asyncio.wait_for(read_response(r), 5)
            if st == 200:
                ok += 1
            else:
                failed += 1
        except Exception:
            failed += 1
            conn = None
        await asyncio.sleep(random.uniform(float(gap_min), float(gap_max)))
    print(f"ok {ok} failed {failed}", flush=True)


async def closing_upstream(port, mode):
    idle = float(mode.split(":", 1)[1]) if mode.startswith("idle:") else None

    async def serve(r, w):
        try:
            while True:
                try:
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), idle)
                except Exception:
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await r.readexactly(length)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                await w.drain()
                if idle is None:
                    break
        finally:
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await wait_term()


async def bare(n, host, port, src="127.0.0.1"):
    socks = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src, 0))
        try:
            await asyncio.wait_for(loop.sock_connect(s, (host, port)), 5)
            socks.append(s)
        except Exception:
            s.close()
    print(f"ready {len(socks)}", flush=True)
    await wait_term()


async def probe(host, port, token, src, count, interval):
    ctx = tls_ctx()
    served = 0
    worst = 0.0
    fail_since = None
    start = time.monotonic()
    for i in range(count):
        at = start + i * interval
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        ok = False
        try:
            async def go():
                r, w = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname="localhost", local_addr=(src, 0)
                )
                w.write(
                    f"GET /small HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {token}\r\nConnection: close\r\n\r\n".encode()
                )
                st = await read_response(r)
                w.close()
                return st

            ok = await asyncio.wait_for(go(), 2) == 200
        except Exception:
            ok = False
        now = time.monotonic()
        if ok:
            served += 1
            if fail_since is not None:
                worst = max(worst, now - fail_since)
                fail_since = None
        elif fail_since is None:
            fail_since = now
    if fail_since is not None:
        worst = max(worst, time.monotonic() - fail_since)
    print(f"served {served}/{count} longest_outage_s {worst:.1f}", flush=True)


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "idle":
        asyncio.run(idle(int(args[0]), args[1], int(args[2]), args[3], *args[4:6]))
    elif cmd == "slowread":
        asyncio.run(slowread(int(args[0]), args[1], int(args[2]), *args[3:8]))
    elif cmd == "paced":
        asyncio.run(paced(args[0], int(args[1]), *args[2:7]))
    elif cmd == "closing-upstream":
        asyncio.run(closing_upstream(int(args[0]), args[1]))
    elif cmd == "bare":
        asyncio.run(bare(int(args[0]), args[1], int(args[2]), *args[3:4]))
    elif cmd == "probe":
        asyncio.run(
            probe(args[0], int(args[1]), args[2], args[3], int(args[4]), float(args[5]))
        )
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
