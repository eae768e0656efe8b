"""The naive signing proxy a user would write in an afternoon: the bench's aiohttp peer.

One ClientSession, PyJWT ES256 per request with a key parsed once, the whole body read
into memory both ways. Usage: naive_proxy.py PORT UPSTREAM_URL CA_FILE KEY_JSON
"""

import json
import secrets
import ssl
import sys
import time

import jwt
from aiohttp import ClientSession, TCPConnector, web
from cryptography.hazmat.primitives.serialization import load_pem_private_key

port, upstream, ca_file, key_file = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3], sys.argv[4]
with open(key_file) as f:
    cdp_key = json.load(f)
KEY_NAME = cdp_key["name"]
KEY = load_pem_private_key(cdp_key["privateKey"].encode(), password=None)
HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "authorization"}


async def make_session(app: web.Application):
    ctx = ssl.create_default_context(cafile=ca_file)
    app["session"] = ClientSession(connector=TCPConnector(ssl=ctx), auto_decompress=False)
    yield
    await app["session"].close()


async def handle(request: web.Request) -> web.Response:
    now = int(time.time())
    claims = {
        "sub": KEY_NAME,
        "iss": "cdp",
        "nbf": now,
        "exp": now + 120,
        "uri": f"{request.method} api.coinbase.com{request.path}",
    }
    token = jwt.encode(
        claims, KEY, algorithm="ES256", headers={"kid": KEY_NAME, "nonce": secrets.token_hex()}
    )
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = f"Bearer {token}"
    async with request.app["session"].request(
        request.method,
        upstream + request.path_qs,
        headers=headers,
        data=await request.read(),
        allow_redirects=False,
    ) as resp:
        body = await resp.read()
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
        return web.Response(status=resp.status, body=body, headers=out)


app = web.Application(client_max_size=0)
app.cleanup_ctx.append(make_session)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(port), print=None, access_log=None)
