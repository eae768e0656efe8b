"""mitmproxy addon that signs each request with a CDP ES256 JWT: the bench's mitmproxy peer.

Run: mitmdump --mode reverse:https://127.0.0.1:PORT -s mitm_sign_addon.py --set cdp_key_file=KEY.json
The key is parsed once in configure(); every request gets a fresh token (PyJWT).
"""

import json
import secrets
import time

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from mitmproxy import ctx, http

HOST = "api.coinbase.com"  # the JWT uri host, whatever the reverse target is


class CdpSign:
    def __init__(self) -> None:
        self.key_name = ""
        self.key = None

    def load(self, loader) -> None:
        loader.add_option("cdp_key_file", str, "", "CDP API key JSON file")

    def configure(self, updated) -> None:
        if "cdp_key_file" in updated and ctx.options.cdp_key_file:
            with open(ctx.options.cdp_key_file) as f:
                data = json.load(f)
            self.key_name = data["name"]
            self.key = load_pem_private_key(data["privateKey"].encode(), password=None)

    def request(self, flow: http.HTTPFlow) -> None:
        now = int(time.time())
        path = flow.request.path.split("?", 1)[0]
        claims = {
            "sub": self.key_name,
            "iss": "cdp",
            "nbf": now,
            "exp": now + 120,
            "uri": f"{flow.request.method} {HOST}{path}",
        }
        token = jwt.encode(
            claims,
            self.key,
            algorithm="ES256",
            headers={"kid": self.key_name, "nonce": secrets.token_hex()},
        )
        flow.request.headers["Authorization"] = f"Bearer {token}"


addons = [CdpSign()]
