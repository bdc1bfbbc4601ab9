"""A FastAPI application for keygate's real-application tests (tests/fidelity_*.rs).

Run behind keygate by tests/apps/serve.py on uvicorn (with --proxy-headers, its documented setup
behind a proxy) or hypercorn. Each route shows one thing an application sees or does behind a
proxy; the tests drive them through keygate with curl, httpx and websockets.
"""

import asyncio
import hashlib
import os
import tempfile
import time

from fastapi import FastAPI, File, Request, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

app = FastAPI()

# A deterministic file for Range requests: byte i is i % 251 (a prime, so no power-of-two period).
RANGE_FILE_LEN = 1_000_000
_data_dir = tempfile.mkdtemp(prefix="keygate-app-")
RANGE_FILE = os.path.join(_data_dir, "range.bin")
with open(RANGE_FILE, "wb") as f:
    f.write(bytes(i % 251 for i in range(RANGE_FILE_LEN)))


@app.get("/healthz")
async def healthz():
    return {"ok": True}


@app.get("/items/", name="read_items")
async def read_items():
    """`GET /items` (no slash) is answered by Starlette with a redirect to `/items/`."""
    return {"items": ["a", "b"]}


@app.get("/url-for")
async def url_for(request: Request):
    """URLs the application builds itself, as it would put them in a body."""
    return {
        "url_for": str(request.url_for("read_items")),
        "base_url": str(request.base_url),
        "url": str(request.url),
    }


@app.api_route("/echo", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def echo(request: Request):
    """What the application sees of a request: raw header lines (duplicates kept, in order),
    the client address, the URL and the raw query string, cookies, and the body's length."""
    body = await request.body()
    client = request.client
    return {
        "method": request.method,
        "http_version": request.scope.get("http_version"),
        "scheme": request.url.scheme,
        "url": str(request.url),
        "path": request.url.path,
        "query_string": request.scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
        "cookies": dict(request.cookies),
        "client": [client.host, client.port] if client else None,
        "body_len": len(body),
    }


@app.get("/cookies")
async def set_cookies():
    """Three Set-Cookie fields, one with an Expires date (which contains a comma)."""
    resp = JSONResponse({"set": 3})
    resp.set_cookie("session", "s1", httponly=True, secure=True, samesite="lax")
    resp.set_cookie("theme", "dark", path="/")
    resp.set_cookie("prefs", "a=1", expires="Wed, 21 Oct 2037 07:28:00 GMT")
    return resp


@app.get("/sse")
async def sse(n: int = 5, interval_ms: int = 400):
    """Server-sent events, each carrying the time it was sent (`time.time()`, seconds)."""

    async def events():
        for i in range(n):
            yield f"id: {i}\nevent: tick\ndata: {time.time():.6f}\n\n"
            await asyncio.sleep(interval_ms / 1000)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket):
    """Echoes every text or binary message back."""
    await websocket.accept()
    try:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await websocket.send_text(msg["text"])
            elif msg.get("bytes") is not None:
                await websocket.send_bytes(msg["bytes"])
    except WebSocketDisconnect:
        return


@app.post("/upload")
async def upload(file: UploadFile = File(...)):
    """A multipart upload: the file's size and SHA-256 (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = await file.read(1 << 20)
        if not chunk:
            break
        size += len(chunk)
        h.update(chunk)
    return {"filename": file.filename, "size": size, "sha256": h.hexdigest()}


@app.api_route("/stream-in", methods=["POST", "PUT"])
async def stream_in(request: Request):
    """Reads a raw request body as it streams; answers its length and SHA-256."""
    h = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


@app.get("/file")
async def file():
    """A 1 000 000-byte file served with Range support (byte i is i % 251)."""
    return FileResponse(RANGE_FILE, media_type="application/octet-stream")


@app.get("/text")
async def text():
    return PlainTextResponse("hello from fastapi\n")
