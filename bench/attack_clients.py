#!/usr/bin/env python3
"""Hostile-but-simple clients for bench/attack.sh (stdlib only: asyncio + ssl).

  idle  N HOST PORT TOKEN [PATH] [ADDRS]
                                  open N TLS connections (ALPN http/1.1), send one keep-alive
                                  GET each, read the response, then hold them idle. Connection i
                                  comes from 127.0.0.(10 + i % ADDRS) (default 200 addresses,
                                  so that a per-address cap does not decide the figure). Prints
                                  "ready <n>" once all are idle, then waits for SIGTERM.
  idle-h2 N HOST PORT TOKEN [PATH] [ADDRS]
                                  the same over HTTP/2 (ALPN h2; frames and HPACK literals
                                  written by hand, no library): one GET on stream 1, the
                                  response read to its END_STREAM, then idle, answering the
                                  server's PINGs and SETTINGS.
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


def h2_frame(ty, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ty, flags]) + stream.to_bytes(4, "big") + payload


def hpack_int(v, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if v < limit:
        return bytes([first | v])
    out = bytearray([first | limit])
    v -= limit
    while v >= 128:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


async def h2_conn(host, port, src, token, path, statuses, conns):
    ctx = tls_ctx()
    ctx.set_alpn_protocols(["h2"])
    r, w = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost", local_addr=(src, 0)),
        60,
    )
    block = b"".join(
        hpack_literal(n, v)
        for n, v in [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"x-api-key", token.encode()),
        ]
    )
    w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0) + h2_frame(1, 0x5, 1, block))
    done = asyncio.get_running_loop().create_future()

    async def frames():
        status = None
        try:
            while True:
                head = await r.readexactly(9)
                n = int.from_bytes(head[:3], "big")
                ty, flags, sid = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await r.readexactly(n) if n else b""
                if ty == 4 and not flags & 1:  # SETTINGS: acknowledge
                    w.write(h2_frame(4, 1, 0))
                elif ty == 6 and not flags & 1:  # PING: answer
                    w.write(h2_frame(6, 1, 0, payload))
                elif ty == 1 and sid == 1 and status is None:
                    # The first field of keygate's and nginx's responses is :status as an
                    # indexed static entry (0x88 = 200) or a literal.
                    status = 200 if payload[:1] == b"\x88" else payload[:1].hex()
                elif ty == 7:  # GOAWAY
                    break
                if sid == 1 and ty in (0, 1) and flags & 1 and not done.done():
                    done.set_result(status)
        except Exception:
            pass
        if not done.done():
            done.set_result("closed")

    task = asyncio.ensure_future(frames())
    st = await asyncio.wait_for(done, 60)
    statuses[st] = statuses.get(st, 0) + 1
    conns.append((task, w))


async def idle_h2(n, host, port, token, path="/small", addrs="200"):
    conns = []
    sem = asyncio.Semaphore(64)
    statuses = {}
    addrs = int(addrs)

    async def one(i):
        async with sem:
            try:
                await h2_conn(host, port, f"127.0.0.{10 + i % addrs}", token, path, statuses, conns)
            except Exception as e:
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
    elif cmd == "idle-h2":
        asyncio.run(idle_h2(int(args[0]), args[1], int(args[2]), args[3], *args[4:6]))
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
