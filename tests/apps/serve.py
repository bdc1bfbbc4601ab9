"""Starts an application server on a loopback port it binds itself, then prints `LISTENING <port>`.

    python serve.py uvicorn app:app     # uvicorn --proxy-headers --forwarded-allow-ips 127.0.0.1
    python serve.py hypercorn app:app   # hypercorn, defaults (h2c upgrade accepted)
    python serve.py wsgiref module:app  # stdlib wsgiref (a CGI-style WSGI server)

Binding here (port 0) and handing the socket to the server avoids the race of picking a free
port in the test and binding it later. Extra `key=value` arguments go to the server's config
(e.g. `timeout_keep_alive=1` for uvicorn). Logs go to stderr; the test harness keeps them.
"""

import importlib
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load(target):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def parse_extra(args):
    out = {}
    for a in args:
        k, v = a.split("=", 1)
        if v.isdigit():
            v = int(v)
        elif v in ("true", "false"):
            v = v == "true"
        out[k] = v
    return out


def main():
    server, target, extra = sys.argv[1], sys.argv[2], parse_extra(sys.argv[3:])
    app = load(target)
    if server == "wsgiref":
        from wsgiref.simple_server import make_server

        httpd = make_server("127.0.0.1", 0, app)
        print(f"LISTENING {httpd.server_port}", flush=True)
        httpd.serve_forever()
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    port = sock.getsockname()[1]
    if server == "uvicorn":
        import uvicorn

        config = uvicorn.Config(
            app,
            proxy_headers=True,
            forwarded_allow_ips="127.0.0.1",
            log_level="info",
            **extra,
        )
        srv = uvicorn.Server(config)
        print(f"LISTENING {port}", flush=True)
        srv.run(sockets=[sock])
    elif server == "hypercorn":
        import asyncio

        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{sock.fileno()}"]
        config.accesslog = "-"
        config.errorlog = "-"
        for k, v in extra.items():
            setattr(config, k, v)
        print(f"LISTENING {port}", flush=True)
        asyncio.run(serve(app, config))
    else:
        sys.exit(f"unknown server {server!r}")


if __name__ == "__main__":
    main()
