"""API keys and JWTs at the gateway, on a SQLite file and on PostgreSQL, before a real engine."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import forkhost
import httpx
import jwt
import openai
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import Gateway, create_key, start_gateway, wait_for

MODEL = "tiny-qwen3"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
JWT_SECRET = "test-shared-secret-of-at-least-32-bytes!"
ISSUER, AUDIENCE = "https://id.example.test", "qwenstack"
ADMIN_CLAIM = "qwenstack_admin"  # what the identity provider sets for admins only
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@dataclass
class AuthGateway:
    gateway: Gateway
    database_url: str
    env: dict[str, str]
    admin: str  # secrets of keys created for the tests
    user: str
    secrets: list[str] = field(default_factory=list)  # every secret handed out, for the leak check

    def post(
        self, key: str | bytes | None, body: dict = CHAT, path: str = "/v1/chat/completions"
    ) -> httpx.Response:
        headers = (
            {}
            if key is None
            else {"authorization": key if isinstance(key, bytes) else f"Bearer {key}"}
        )
        return httpx.post(self.gateway.url + path, json=body, headers=headers, timeout=60)

    def admin_call(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.gateway.url}/admin{path}",
            headers={"authorization": f"Bearer {self.admin}"},
            timeout=30,
            **kwargs,
        )

    def new_key(self, name: str, **fields) -> str:
        response = self.admin_call("POST", "/keys", json={"name": name, **fields})
        assert response.status_code == 201, response.text
        self.secrets.append(response.json()["key"])
        return response.json()["key"]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def auth(
    request: pytest.FixtureRequest, engine_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthGateway]:
    tmp = tmp_path_factory.mktemp(f"auth-{request.param}")
    home = tmp / "home"
    database_url = (
        request.getfixturevalue("postgres_url")
        if request.param == "postgres"
        else f"sqlite:///{home / 'qwenstack.db'}"
    )
    env = {
        "QWENSTACK_DATABASE_URL": database_url,
        "QWENSTACK_AUTH__KEY_CACHE_S": "1",
        "QWENSTACK_AUTH__PROTECT_METRICS": "true",
        "QWENSTACK_AUTH__JWT__SECRET": JWT_SECRET,
        "QWENSTACK_AUTH__JWT__PUBLIC_KEY": RSA_PUBLIC_PEM,
        "QWENSTACK_AUTH__JWT__ISSUER": ISSUER,
        "QWENSTACK_AUTH__JWT__AUDIENCE": AUDIENCE,
        "QWENSTACK_AUTH__JWT__CLAIMS__ADMIN": ADMIN_CLAIM,
    }
    suffix = request.param  # one PostgreSQL database serves the whole session: names must differ
    admin = create_key(home, "--name", f"auth-admin-{suffix}", "--admin", env=env)
    user = create_key(home, "--name", f"auth-user-{suffix}", env=env)
    gateway = start_gateway(tmp, engine_url, env=env, auth=True)
    yield AuthGateway(gateway, database_url, env, admin, user, [admin, user])
    assert gateway.stop() == 0


def token(claims: dict, key: object = JWT_SECRET, algorithm: str = "HS256", **headers) -> str:
    now = int(time.time())
    return jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **claims},
        key,
        algorithm=algorithm,
        headers=headers or None,
    )


CRAFTED = [
    "sk-qs-' OR '1'='1",
    "' OR 1=1 --",
    "sk-qs-x'; DROP TABLE api_keys; --",
    'sk-qs-") UNION SELECT digest FROM api_keys --',
    "sk-qs-%' OR digest LIKE '%",
    "sk-qs-" + "A" * 10240,
    "A" * 10240,
    "sk-qs-\\x00\\",
    "a.b.c",
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.",  # alg "none"
]


def test_valid_key_is_served_and_health_ready_stay_open(auth: AuthGateway):
    assert auth.post(auth.user).status_code == 200
    client = openai.OpenAI(base_url=f"{auth.gateway.url}/v1", api_key=auth.user)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{auth.gateway.url}/health").status_code == 200
    assert httpx.get(f"{auth.gateway.url}/ready").status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"Bearer",
        b"Basic dXNlcjpwYXNz",
        b"sk-qs-nobearer",
        b"Bearer sk-qs-wrongwrongwrongwrongwrongwrongwrongwrongwro",
        *(f"Bearer {crafted}".encode() for crafted in CRAFTED),
        "Bearer sk-qs-ключ-ü-日本".encode(),
        "Bearer sk-qs-ключ".encode("latin-1", "replace"),
    ],
)
def test_missing_wrong_and_crafted_keys_get_401(auth: AuthGateway, authorization: bytes | None):
    for path in ("/v1/chat/completions", "/v1/models"):
        headers = {} if authorization is None else {"authorization": authorization}
        response = httpx.request(
            "POST" if "chat" in path else "GET",
            auth.gateway.url + path,
            json=CHAT,
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 401, (authorization, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "authentication_error"


def test_crafted_keys_leave_the_key_table_intact(auth: AuthGateway):
    for crafted in CRAFTED:
        auth.post(crafted)
    engine = sa.create_engine(auth.database_url)
    with engine.connect() as connection:
        names = set(connection.scalars(sa.text("SELECT name FROM api_keys")))
    engine.dispose()
    assert {f"auth-admin-{n}" for n in ("sqlite", "postgres")} & names
    assert auth.post(auth.user).status_code == 200


def test_admin_api_needs_an_admin_key(auth: AuthGateway):
    url = f"{auth.gateway.url}/admin/keys"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers={"authorization": f"Bearer {auth.user}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    listed = auth.admin_call("GET", "/keys").json()["data"]
    assert {"name", "prefix", "status", "rpm", "models"} <= set(listed[0])
    assert all("key" not in entry and "digest" not in entry for entry in listed)


def test_revoked_key_gets_401_at_once_through_the_admin_api(auth: AuthGateway):
    secret = auth.new_key("revoke-me")
    assert auth.post(secret).status_code == 200
    assert auth.admin_call("DELETE", "/keys/revoke-me").json()["status"] == "revoked"
    assert auth.post(secret).status_code == 401
    assert auth.admin_call("DELETE", "/keys/revoke-me").status_code == 400
    assert auth.admin_call("DELETE", "/keys/no-such-key").status_code == 404


def test_key_revoked_from_the_cli_stops_within_the_cache_time(auth: AuthGateway):
    secret = create_key(auth.gateway.home, "--name", "cli-revoked", env=auth.env)
    auth.secrets.append(secret)
    assert auth.post(secret).status_code == 200
    _cli(auth, "keys", "revoke", "cli-revoked")
    # QWENSTACK_AUTH__KEY_CACHE_S=1: refused once the cached entry is a second old.
    wait_for(lambda: auth.post(secret).status_code == 401, "the revoked key refused", 5)


def test_rotated_key_old_secret_401_new_secret_200(auth: AuthGateway):
    old = auth.new_key("rotate-me", rpm=100)
    rotated = auth.admin_call("POST", "/keys/rotate-me/rotate").json()
    auth.secrets.append(rotated["key"])
    assert rotated["rpm"] == 100 and rotated["key"] != old
    assert auth.post(old).status_code == 401
    assert auth.post(rotated["key"]).status_code == 200


def test_expired_key_gets_401(auth: AuthGateway):
    secret = auth.new_key("short-lived", expires="2s")
    assert auth.post(secret).status_code == 200
    wait_for(lambda: auth.post(secret).status_code == 401, "the expired key refused", 10)
    assert "expired" in auth.post(secret).json()["error"]["message"]


def test_model_outside_the_keys_scope_gets_403(auth: AuthGateway):
    secret = auth.new_key("other-models", models=["some-other-model"])
    refused = auth.post(secret)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert refused.json()["error"]["type"] == "permission_error"
    listed = httpx.get(
        f"{auth.gateway.url}/v1/models", headers={"authorization": f"Bearer {secret}"}
    )
    assert listed.json()["data"] == []
    allowed = auth.new_key("this-model", models=[MODEL])
    assert auth.post(allowed).status_code == 200


def test_metrics_can_be_protected(auth: AuthGateway):
    assert httpx.get(f"{auth.gateway.url}/metrics").status_code == 401


def test_jwt_hs256_and_rs256_are_accepted_with_their_claims(auth: AuthGateway):
    assert auth.post(token({})).status_code == 200
    assert auth.post(token({"sub": "bob"}, RSA_KEY, "RS256")).status_code == 200
    scoped = token({"models": ["some-other-model"]})
    assert auth.post(scoped).status_code == 403
    assert auth.post(token({"models": f"{MODEL} x"})).status_code == 200
    # Admin rights come from the configured claim only: a self-styled `admin` is not one.
    pretender = {"authorization": f"Bearer {token({'admin': True})}"}
    assert httpx.get(f"{auth.gateway.url}/admin/keys", headers=pretender).status_code == 403
    admin = {"authorization": f"Bearer {token({ADMIN_CLAIM: True})}"}
    assert httpx.get(f"{auth.gateway.url}/admin/keys", headers=admin).status_code == 200
    # Usage is recorded under the token's subject (written every 0.5 s).
    def by_caller() -> dict[str, dict]:
        usage = httpx.get(f"{auth.gateway.url}/admin/usage?by=key", headers=admin).json()["data"]
        return {entry["key"]: entry for entry in usage}

    def requests(caller: str) -> int:
        return by_caller().get(caller, {}).get("requests", 0)

    # Until every request's row is written: a batch may hold some of a caller's rows only.
    wait_for(lambda: requests("jwt:alice") >= 3 and requests("jwt:bob") >= 1, "usage rows", 10)


@pytest.mark.parametrize(
    ("claims", "key", "algorithm"),
    [
        ({"exp": int(time.time()) - 3600}, JWT_SECRET, "HS256"),  # expired (beyond the 30 s leeway)
        ({"aud": "someone-else"}, JWT_SECRET, "HS256"),
        ({"iss": "https://evil.example"}, JWT_SECRET, "HS256"),
        ({"nbf": int(time.time()) + 3600}, JWT_SECRET, "HS256"),
        ({}, "another-secret-that-is-32-bytes-long!!", "HS256"),  # wrong signature
        (
            {},
            RSA_PUBLIC_PEM,
            "HS256",
        ),  # the public key used as an HMAC secret (algorithm confusion)
        ({"rpm": "lots"}, JWT_SECRET, "HS256"),
        ({"sub": ""}, JWT_SECRET, "HS256"),
    ],
)
def test_bad_jwts_get_401(auth: AuthGateway, claims: dict, key: object, algorithm: str):
    if key == RSA_PUBLIC_PEM:  # PyJWT refuses to sign with a PEM as HMAC key; forged by hand
        signed = (
            _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
            + b"."
            + _b64(
                json.dumps(
                    {
                        "iss": ISSUER,
                        "aud": AUDIENCE,
                        "sub": "mallory",
                        "exp": int(time.time()) + 300,
                    }
                ).encode()
            )
        )
        forged = (
            signed + b"." + _b64(hmac.new(key.encode(), signed, hashlib.sha256).digest())
        ).decode()
    else:
        forged = token(claims, key, algorithm)
    response = auth.post(forged)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_no_secret_in_logs_or_database(auth: AuthGateway):
    auth.post(auth.user)
    log = auth.gateway.log.read_text()
    engine = sa.create_engine(auth.database_url)
    with engine.connect() as connection:
        dump = json.dumps(
            [
                [
                    list(map(str, row))
                    for row in connection.execute(sa.text(f"SELECT * FROM {table}"))
                ]
                for table in ("api_keys", "usage_records")
            ]
        )
    engine.dispose()
    if auth.database_url.startswith("sqlite"):
        database = Path(auth.database_url.removeprefix("sqlite:///"))
        for file in (database, database.with_name(database.name + "-wal")):  # WAL: recent writes
            if file.exists():
                dump += file.read_bytes().decode("latin-1")
    assert len(auth.secrets) >= 5
    for secret in auth.secrets:
        assert secret not in log
        assert secret not in dump
        assert secret[len("sk-qs-") + 6 :] not in dump  # not even the part past the shown prefix


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _cli(auth: AuthGateway, *args: str) -> str:
    out = forkhost.run([*args, "--home", str(auth.gateway.home)], env={**os.environ, **auth.env})
    assert out.returncode == 0, out.stderr
    return out.stdout


class _JWKS(BaseHTTPRequestHandler):
    document = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, *args) -> None:
        pass


def test_es256_through_a_jwks_url(engine_url: str, tmp_path: Path):
    """An identity provider's JWKS endpoint: a static document, served here on loopback."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    _JWKS.document = json.dumps(
        {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}
    ).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JWKS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gateway = start_gateway(
        tmp_path,
        engine_url,
        env={
            "QWENSTACK_AUTH__JWT__JWKS_URL": f"http://127.0.0.1:{server.server_port}/jwks.json",
            "QWENSTACK_AUTH__JWT__ALGORITHMS": "ES256",
            "QWENSTACK_AUTH__JWT__ISSUER": ISSUER,
            "QWENSTACK_AUTH__JWT__AUDIENCE": AUDIENCE,
        },
        auth=True,
    )
    try:
        url = f"{gateway.url}/v1/chat/completions"
        good = token({}, private, "ES256", kid="k1")
        assert (
            httpx.post(
                url, json=CHAT, headers={"authorization": f"Bearer {good}"}, timeout=60
            ).status_code
            == 200
        )
        other = token({}, ec.generate_private_key(ec.SECP256R1()), "ES256", kid="k1")
        assert (
            httpx.post(
                url, json=CHAT, headers={"authorization": f"Bearer {other}"}, timeout=60
            ).status_code
            == 401
        )
        hs = token({})  # HS256 is not among the accepted algorithms here
        assert (
            httpx.post(
                url, json=CHAT, headers={"authorization": f"Bearer {hs}"}, timeout=60
            ).status_code
            == 401
        )
    finally:
        gateway.stop()
        server.shutdown()


def test_admin_api_bad_input_gets_openai_errors(auth: AuthGateway):
    bad = [
        {"name": "x", "rpm": "many"},
        {"rpm": 3},
        {"name": "bad name"},
        {"name": "x", "expires": "0d"},
    ]
    for body in bad:
        response = auth.admin_call("POST", "/keys", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert auth.admin_call("POST", "/keys", content=b"{not json").status_code == 400
    assert auth.admin_call("GET", "/usage?by=nothing").status_code == 400
    assert auth.admin_call("GET", "/usage?since=forever").status_code == 400
    auth.new_key("taken")
    taken = auth.admin_call("POST", "/keys", json={"name": "taken"})
    assert taken.status_code == 400 and "exists" in taken.json()["error"]["message"]


def test_first_start_saves_an_admin_key_in_a_private_file_and_keeps_the_home_private(
    engine_url: str, tmp_path: Path
):
    # A log an older version left readable to all: made private too.
    old_log = tmp_path / "first" / "home" / "logs" / "engine-0.log"
    old_log.parent.mkdir(parents=True)
    old_log.write_text("old\n")
    old_log.chmod(0o644)
    first = start_gateway(tmp_path / "first", engine_url, auth=True)
    try:
        printed = first.log.read_text()
        [path] = re.findall(r"admin key file +(\S+)", printed)
        secret = Path(path).read_text().strip()
        # Not a terminal (a container's log, here a file): the key itself is not printed.
        assert secret.startswith("sk-qs-") and secret not in printed
        listed = httpx.get(f"{first.url}/admin/keys", headers={"authorization": f"Bearer {secret}"})
        assert [key["name"] for key in listed.json()["data"]] == ["admin"]
        # Home, databases, secrets and logs: nobody but their owner may read them.
        home = first.home
        assert home.stat().st_mode & 0o777 == 0o700
        private = [home / "qwenstack.db", Path(path), old_log, home / "secrets" / "pepper"]
        assert {p.name: p.stat().st_mode & 0o777 for p in private} == {
            p.name: 0o600 for p in private}
    finally:
        assert first.stop() == 0
    # The same home again: the key store is not empty, so no new key.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "home").symlink_to(first.home)
    again = start_gateway(tmp_path / "again", engine_url, auth=True)
    try:
        assert "admin key" not in again.log.read_text()
        models = httpx.get(f"{again.url}/v1/models", headers={"authorization": f"Bearer {secret}"})
        assert models.status_code == 200
    finally:
        assert again.stop() == 0


def test_text_logs_escape_control_characters(engine_url: str, tmp_path: Path):
    gateway = start_gateway(tmp_path, engine_url, auth=True,
                            env={"QWENSTACK_OBSERVABILITY__LOG_FORMAT": "text"})
    try:
        forged = "2026-01-01 00:00:00,000 INFO qwenstack.gateway: key=admin status=200"
        response = httpx.get(f"{gateway.url}/v1/models%0A{forged.replace(' ', '%20')}")
        assert response.status_code == 401
    finally:
        assert gateway.stop() == 0
    lines = gateway.log.read_text().splitlines()
    # The path is in the log, on the request's own line: the forged line never starts one.
    assert any("/v1/models\\n2026-01-01" in line for line in lines), lines[-5:]
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in lines)


@pytest.mark.parametrize("unset", ["ISSUER", "AUDIENCE"])
def test_jwt_without_issuer_or_audience_refuses_to_start(tmp_path: Path, unset: str):
    env = {**os.environ, "QWENSTACK_HOME": str(tmp_path), "QWENSTACK_AUTH__JWT__SECRET": JWT_SECRET,
           "QWENSTACK_AUTH__JWT__ISSUER": ISSUER, "QWENSTACK_AUTH__JWT__AUDIENCE": AUDIENCE}
    del env[f"QWENSTACK_AUTH__JWT__{unset}"]
    started = forkhost.run(["gateway"], env=env, timeout=120)
    assert started.returncode != 0
    # One clear sentence naming the setting, not a traceback.
    assert f"auth.jwt.{unset.lower()}" in started.stderr and "Traceback" not in started.stderr
