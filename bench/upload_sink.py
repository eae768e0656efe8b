"""Upload sink behind the bench's nginx: reads a request body to the end, discards it,
answers {"received": <bytes>} so the harness can check that every byte was relayed.

Usage: upload_sink.py PORT   (plain HTTP on 127.0.0.1; nginx terminates TLS in front of it)
"""

import sys

from aiohttp import web


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"received": received})


app = web.Application(client_max_size=0)
app.router.add_route("*", "/{tail:.*}", sink)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
