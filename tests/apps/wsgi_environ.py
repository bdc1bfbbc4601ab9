"""A WSGI application that answers with the CGI-style environ it was given: every `HTTP_*`
variable, as a CGI/WSGI server (stdlib `wsgiref`) builds it from the request's header lines.
Served by `serve.py wsgiref wsgi_environ:app` for keygate's header look-alike tests
(tests/fidelity_headers.rs): `X_Forwarded_For` and `X-Forwarded-For` are the same variable here.
"""

import json


def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps(seen, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
