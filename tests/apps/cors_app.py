"""A FastAPI application as a browser-facing API behind keygate is usually set up: Starlette's
`CORSMiddleware` for a front-end on another origin, and handlers that do billable work.
Served by tests/apps/serve.py on uvicorn for tests/quota_cost_methods.rs and tests/cors_preflight.rs.

* `GET /report` does the expensive work (it counts its runs); Starlette routes `HEAD /report` to
  the same handler and only drops the body (as Flask, Django and Rails do), so a HEAD does the
  work too.
* `POST /items/{id}` honours a `_method` query override, as Laravel/Symfony and Express
  `method-override` do (`POST /items/1?_method=DELETE` deletes).
* `GET /runs` tells how often each handler ran.
* Every request reaching the application (CORS preflights included, which the middleware answers
  itself) is printed as one `SEEN {json}` line with its method, path and header names and values,
  so a test can tell what keygate forwarded.
"""

import json
import sys
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.middleware.cors import CORSMiddleware

ORIGIN = "https://app.example"

app = FastAPI()
app.add_middleware(
    CORSMiddleware,
    allow_origins=[ORIGIN],
    allow_methods=["GET", "POST", "DELETE"],
    allow_headers=["x-api-key", "content-type"],
    max_age=600,
)

runs = Counter()


class Seen:
    """Outermost ASGI layer: prints every HTTP request as it arrives."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            line = {
                "method": scope["method"],
                "path": scope["path"],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            }
            print("SEEN " + json.dumps(line), file=sys.stderr, flush=True)
        await self.inner(scope, receive, send)


@app.get("/healthz")
async def healthz():
    return {"ok": True}


async def report(request: Request):
    runs["report"] += 1
    return JSONResponse({"report": "x" * 100})


# A Starlette route (as `app.add_route` makes it): Starlette adds HEAD to every GET route and
# runs the handler for it.
app.add_route("/report", report, methods=["GET"])


@app.post("/items/{item_id}")
async def items(item_id: int, request: Request):
    method = request.query_params.get("_method", "POST").upper()
    runs["items " + method] += 1
    return {"item": item_id, "method": method}


@app.get("/runs")
async def get_runs():
    return dict(runs)


app = Seen(app)
