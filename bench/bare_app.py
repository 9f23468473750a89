"""The floor under `cjm serve`'s POST /v1/track: FastAPI and uvicorn doing nothing else.

One route reads the body, parses it with orjson as cjm does and answers 200 with a
small JSON: no key check, no validation, no database (/healthz only tells bench/tracking.py
that the server is up). It is served the way `cjm serve` serves its app (engine/cli.py):
`uvicorn.Server(...).serve()` run by `uvloop.run`, with the same Config, so the event
loop and the HTTP parser are the same.

Run by bench/tracking.py: `python bench/bare_app.py PORT`.
"""

from __future__ import annotations

import sys

import orjson
import uvicorn
import uvloop
from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.post("/v1/track")
async def track(request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(orjson.dumps({"success": True}), media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(orjson.dumps({"status": "ok"}), media_type="application/json")


def main() -> None:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False
    )
    uvloop.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
