"""Signing microbenchmark: microseconds per token, ES256 / EdDSA / HMAC-SHA256 / CDP v2 wallet.

Compares, in one process and with the same keys:
  floor      raw `cryptography` sign of a prebuilt JWT signing input with a cached key
  pyjwt      `jwt.encode` with a cached key object (fresh claims and nonce each call)
  coinbase   coinbase-advanced-py `coinbase.jwt_generator.build_rest_jwt` (parses the key each call)
  cdp-sdk    cdp-sdk `cdp.auth.generate_jwt(JwtOptions(...))` (parses the key each call)
  ours       signing_proxy.signers.CdpJwtSigner(...).sign(...) / HmacSigner(...).sign(...)
The wallet rows (X-Wallet-Auth, ES256 with the Wallet Secret) compare WalletSigner.token with a
body hash and without one against the same raw ES256 sign floor, and cdp-sdk `generate_wallet_jwt`.
Each figure is the best of several repeats (timeit-style), so it is the cost when warm and undisturbed.
A missing implementation is reported as such, never fatal.

Usage: python sign_bench.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import secrets
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

KEY_NAME = "organizations/bench-org/apiKeys/bench-key"
HOST = "api.coinbase.com"
PATH = "/api/v3/brokerage/accounts"
URI = f"GET {HOST}{PATH}"


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signing_input(alg: str) -> bytes:
    now = int(time.time())
    header = {"alg": alg, "kid": KEY_NAME, "nonce": secrets.token_hex(), "typ": "JWT"}
    claims = {"sub": KEY_NAME, "iss": "cdp", "nbf": now, "exp": now + 120, "uri": URI}
    return b64url(json.dumps(header).encode()) + b"." + b64url(json.dumps(claims).encode())


def calibrate(fn: Callable[[], Any], budget: float) -> int:
    """How many calls take about ``budget`` seconds (after a warm call: imports, caches)."""
    fn()
    number, elapsed = 1, 0.0
    while elapsed < budget / 4:
        number *= 2
        elapsed = timeit.timeit(fn, number=number)
    return max(1, int(number * budget / max(elapsed, 1e-9)))


def measure_interleaved(
    cases: dict[str, Callable[[], Any]], budget: float, repeats: int, errors: dict[str, str]
) -> dict[str, float]:
    """Best per-call microseconds of each case, the repeats interleaved (round r times every
    case once before round r+1), so a slow spell of a shared machine falls on all cases alike
    instead of skewing one case against the floor. A case that raises goes to ``errors``."""
    numbers: dict[str, int] = {}
    for name, fn in cases.items():
        try:
            numbers[name] = calibrate(fn, budget)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
    best = dict.fromkeys(numbers, float("inf"))
    for _ in range(repeats):
        for name, number in numbers.items():
            best[name] = min(best[name], timeit.timeit(cases[name], number=number) / number * 1e6)
    return best


def verify_jwt(token: str, public_key: Any, alg: str) -> str:
    claims = jwt.decode(token, public_key, algorithms=[alg], options={"verify_aud": False})
    header = jwt.get_unverified_header(token)
    problems = []
    if claims.get("uri") != URI:
        problems.append(f"uri={claims.get('uri')!r}")
    if claims.get("sub") != KEY_NAME or header.get("kid") != KEY_NAME:
        problems.append("sub/kid")
    if claims.get("iss") != "cdp" or claims.get("exp", 0) - claims.get("nbf", 0) != 120:
        problems.append("iss/nbf/exp")
    if not header.get("nonce"):
        problems.append("nonce")
    return "ok" if not problems else "BAD: " + ", ".join(problems)


def jwt_cases(alg: str) -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, str]]:
    """Callables per implementation, plus a validity check and any errors."""
    if alg == "ES256":
        key: Any = ec.generate_private_key(ec.SECP256R1())
        secret = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        msg = signing_input(alg)
        floor = lambda: key.sign(msg, ec.ECDSA(hashes.SHA256()))  # noqa: E731
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        secret = base64.b64encode(seed + pub).decode()  # the CDP portal's Ed25519 secret format
        msg = signing_input(alg)
        floor = lambda: key.sign(msg)  # noqa: E731
    public = key.public_key()
    cases: dict[str, Callable[[], Any]] = {"floor (raw cryptography sign)": floor}
    checks: dict[str, str] = {}
    errors: dict[str, str] = {}

    def pyjwt_encode() -> str:
        now = int(time.time())
        return jwt.encode(
            {"sub": KEY_NAME, "iss": "cdp", "nbf": now, "exp": now + 120, "uri": URI},
            key,
            algorithm=alg,
            headers={"kid": KEY_NAME, "nonce": secrets.token_hex()},
        )

    cases["PyJWT jwt.encode (cached key)"] = pyjwt_encode

    try:
        from coinbase.jwt_generator import build_rest_jwt

        cases["coinbase-advanced-py build_rest_jwt"] = lambda: build_rest_jwt(URI, KEY_NAME, secret)
    except Exception as e:
        errors["coinbase-advanced-py build_rest_jwt"] = f"not importable: {e}"

    try:
        from cdp.auth import JwtOptions, generate_jwt

        cases["cdp-sdk generate_jwt"] = lambda: generate_jwt(
            JwtOptions(
                api_key_id=KEY_NAME,
                api_key_secret=secret,
                request_method="GET",
                request_host=HOST,
                request_path=PATH,
            )
        )
    except Exception as e:
        errors["cdp-sdk generate_jwt"] = f"not importable: {e}"

    try:
        from signing_proxy.signers import CdpJwtSigner

        signer = CdpJwtSigner(KEY_NAME, key)
        out = signer.sign("GET", HOST, PATH, "", b"")
        token = out["Authorization"].removeprefix("Bearer ")
        checks["signing-proxy CdpJwtSigner.sign"] = verify_jwt(token, public, alg)
        cases["signing-proxy CdpJwtSigner.sign"] = lambda: signer.sign("GET", HOST, PATH, "", b"")
    except Exception as e:
        errors["signing-proxy CdpJwtSigner.sign"] = f"{type(e).__name__}: {e}"

    for name in ("PyJWT jwt.encode (cached key)", "coinbase-advanced-py build_rest_jwt"):
        if name in cases:
            checks[name] = verify_jwt(cases[name](), public, alg)
    return cases, checks, errors


def hmac_cases() -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, str]]:
    api_key, api_secret = "bench-api-key", secrets.token_urlsafe(24)
    secret_bytes = api_secret.encode()
    msg = f"{int(time.time())}GET{PATH}".encode()
    cases: dict[str, Callable[[], Any]] = {
        "floor (hmac.new(...).hexdigest())": lambda: hmac.new(
            secret_bytes, msg, hashlib.sha256
        ).hexdigest(),
    }
    checks: dict[str, str] = {}
    errors: dict[str, str] = {}
    try:
        from signing_proxy.signers import HmacSigner

        signer = HmacSigner(api_key, api_secret, clock=lambda: 1700000000.0)
        out = {k.lower(): v for k, v in signer.sign("GET", HOST, PATH, "", b"").items()}
        want = hmac.new(secret_bytes, f"1700000000GET{PATH}".encode(), hashlib.sha256).hexdigest()
        checks["signing-proxy HmacSigner.sign"] = (
            "ok"
            if (
                out.get("cb-access-sign") == want
                and out.get("cb-access-key") == api_key
                and out.get("cb-access-timestamp") == "1700000000"
            )
            else f"BAD: {out}"
        )
        live = HmacSigner(api_key, api_secret)
        cases["signing-proxy HmacSigner.sign"] = lambda: live.sign("GET", HOST, PATH, "", b"")
    except Exception as e:
        errors["signing-proxy HmacSigner.sign"] = f"{type(e).__name__}: {e}"
    return cases, checks, errors


WALLET_PATH = "/platform/v2/evm/accounts/0x4315d134aCd3221a02dD380ADE3aF39Ce219037c/sign/message"
WALLET_BODY = (
    b'{"message": "hello, world", "idempotencyKey": "8e03978e-40d5-43e8-bc93-6894a57f9324"}'
)


def wallet_cases() -> tuple[dict[str, Callable[[], Any]], dict[str, str], dict[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secret = base64.b64encode(der).decode()
    claims = {"uris": [f"POST api.cdp.coinbase.com{WALLET_PATH}"], "iat": 1, "nbf": 1, "jti": "x"}
    msg = b64url(b'{"alg":"ES256","typ":"JWT"}') + b"." + b64url(json.dumps(claims).encode())
    cases: dict[str, Callable[[], Any]] = {
        "floor (raw cryptography sign)": lambda: key.sign(msg, ec.ECDSA(hashes.SHA256()))
    }
    checks: dict[str, str] = {}
    errors: dict[str, str] = {}
    body_json = json.loads(WALLET_BODY)
    want = hashlib.sha256(json.dumps(body_json, separators=(",", ":"), sort_keys=True).encode())
    try:
        from signing_proxy.wallet_auth import WalletSigner

        signer = WalletSigner(key)
        token = signer.token("POST", "api.cdp.coinbase.com", WALLET_PATH, WALLET_BODY)
        got = jwt.decode(token, key.public_key(), algorithms=["ES256"])
        ok = got.get("reqHash") == want.hexdigest() and got["uris"] == claims["uris"]
        checks["signing-proxy WalletSigner.token (body)"] = "ok" if ok else f"BAD: {got}"
        cases["signing-proxy WalletSigner.token (body)"] = lambda: signer.token(
            "POST", "api.cdp.coinbase.com", WALLET_PATH, WALLET_BODY
        )
        cases["signing-proxy WalletSigner.token (no body)"] = lambda: signer.token(
            "POST", "api.cdp.coinbase.com", WALLET_PATH, None
        )
    except Exception as e:
        errors["signing-proxy WalletSigner.token"] = f"{type(e).__name__}: {e}"
    try:
        from cdp.auth.utils.jwt import WalletJwtOptions, generate_wallet_jwt

        cases["cdp-sdk generate_wallet_jwt (body)"] = lambda: generate_wallet_jwt(
            WalletJwtOptions(
                wallet_auth_key=secret,
                request_method="POST",
                request_host="api.cdp.coinbase.com",
                request_path=WALLET_PATH,
                request_data=body_json,
            )
        )
    except Exception as e:
        errors["cdp-sdk generate_wallet_jwt (body)"] = f"not importable: {e}"
    return cases, checks, errors


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="shorter loops (about 4x faster)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    budget, repeats = (0.08, 3) if args.quick else (0.25, 5)

    results: dict[str, Any] = {"schemes": {}}
    for scheme, builder in (
        ("ES256", lambda: jwt_cases("ES256")),
        ("EdDSA", lambda: jwt_cases("EdDSA")),
        ("HMAC-SHA256", hmac_cases),
        ("ES256 wallet", wallet_cases),
    ):
        cases, checks, errors = builder()
        rows = {}
        for name, us in measure_interleaved(cases, budget, repeats, errors).items():
            rows[name] = {"us": us, "check": checks.get(name, "")}
        floor = next(v["us"] for k, v in rows.items() if k.startswith("floor"))
        for row in rows.values():
            row["x_floor"] = row["us"] / floor
        results["schemes"][scheme] = {"rows": rows, "errors": errors}
        for name, row in rows.items():
            print(
                f"{scheme:12} {name:40} {row['us']:9.2f} us  {row['x_floor']:5.2f}x floor  {row['check']}"
            )
        for name, err in errors.items():
            print(f"{scheme:12} {name:40} unavailable: {err}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
