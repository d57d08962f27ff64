"""API keys end to end: every front API's routes behind the auth middleware, tenant isolation in
the store and the cache, the per-tenant stream limit, and the `gateway keys` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from audio_util import GOFORWARD
from conftest import Gateway, make_config, run_gateway, sse_events, wait_until

from gateway.auth import KEY_PREFIX, KeyRing, add_key, list_keys, revoke_key
from gateway.config import Config
from gateway.engines.scripted import ScriptedEngine
from gateway.errors import Unauthorized
from gateway.store import content_uuid

pytestmark = pytest.mark.anyio

GATEWAY = [sys.executable, "-m", "gateway.cli"]
WORDS = ["alpha", "beta", "gamma"]
AUDIO = GOFORWARD.read_bytes()
SOME_ID = "0" * 32


def auth_config(tmp_path: Path, *, engines: dict[str, Any] | None = None, **auth: Any) -> Config:
    return make_config(
        tmp_path,
        engines={"fake": {"kind": "scripted", "words": WORDS}, **(engines or {})},
        server={"default_engine": "fake", "keepalive": 0},
        auth={"keys_file": str(tmp_path / "keys.jsonl"), **auth},
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wav() -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("goforward.wav", AUDIO, "audio/wav")}


def engine(gw: Gateway, name: str = "fake") -> ScriptedEngine:
    found = gw.state.engines[name]
    assert isinstance(found, ScriptedEngine)
    return found


# Every authenticated route: method, path, request arguments, and whose error shape it answers in.
ROUTES: list[tuple[str, str, Callable[[], dict[str, Any]], str]] = [
    ("POST", "/v1/transcriptions/stream", lambda: {"files": wav()}, "native"),
    ("POST", "/v1/transcriptions", lambda: {"files": wav()}, "native"),
    ("GET", f"/v1/transcriptions/{SOME_ID}", dict, "native"),
    (
        "PUT",
        f"/v1/transcriptions/{SOME_ID}/corrections",
        lambda: {"json": {"segments": []}},
        "native",
    ),
    (
        "POST",
        "/v1/audio/transcriptions",
        lambda: {"files": wav(), "data": {"model": "whisper-1"}},
        "openai",
    ),
    ("GET", "/v1/models", dict, "openai"),
    ("GET", "/v1/models/whisper-1", dict, "openai"),
    ("POST", "/asr/transcribe/stream", lambda: {"files": wav()}, "aymurai"),
    ("POST", "/asr/transcribe", lambda: {"files": wav()}, "aymurai"),
    ("GET", f"/asr/validation/document/{content_uuid(SOME_ID)}", dict, "aymurai"),
    ("POST", f"/asr/validation/document/{content_uuid(SOME_ID)}", lambda: {"json": []}, "aymurai"),
    ("GET", "/metrics", dict, "native"),
]


def check_refusal(r: httpx.Response, shape: str, where: str) -> None:
    assert r.status_code == 401, (where, r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer"), where
    assert r.headers["content-type"] == "application/json", where
    body = r.json()
    if shape == "native":
        assert body["error"]["code"] == "UNAUTHORIZED" and body["error"]["detail"], where
    elif shape == "openai":
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert error["type"] == "authentication_error" and error["code"] == "unauthorized", where
    else:
        assert body["code"] == "UNAUTHORIZED" and body["detail"], where


async def test_every_api_route_refuses_missing_wrong_foreign_and_revoked_keys(
    tmp_path: Path,
) -> None:
    config = auth_config(tmp_path, protect_metrics=True)
    keys = config.auth.keys_file
    _, good = add_key(keys, "alpha")
    doomed, doomed_key = add_key(keys, "alpha")
    # The right id with another key's secret, a made-up id, junk, and another scheme.
    wrong_secret = good[: len(KEY_PREFIX) + 17] + doomed_key[len(KEY_PREFIX) + 17 :]
    bad_headers = {
        "no key": {},
        "wrong secret": bearer(wrong_secret),
        "unknown id": bearer(KEY_PREFIX + "f" * 16 + "_" + "x" * 43),
        "junk": bearer("sk-not-a-gateway-key"),
        "basic": {"Authorization": "Basic " + good},
    }
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            # While its key is valid, each route answers for real (nothing here is a 401).
            for method, path, args, _ in ROUTES:
                r = await c.request(method, path, headers=bearer(doomed_key), **args())
                assert r.status_code != 401, (path, r.text)
            revoke_key(keys, doomed.id)
            bad_headers["revoked"] = bearer(doomed_key)
            for method, path, args, shape in ROUTES:
                for name, headers in bad_headers.items():
                    r = await c.request(method, path, headers=headers, **args())
                    check_refusal(r, shape, f"{method} {path} with {name}")
            # A wrong key is told so (RFC 6750); a missing one is only asked for.
            r = await c.get("/v1/models", headers=bearer(wrong_secret))
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
            assert (await c.get("/v1/models")).headers["www-authenticate"] == "Bearer"
            # Health and readiness stay open; so does nothing else.
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 200
            assert (await c.get("/v1/models", headers=bearer(good))).status_code == 200
    # The revoked key's record says when; the other key is untouched.
    records = {r.id: r for r in list_keys(keys)}
    assert records[doomed.id].revoked is not None
    assert sum(r.revoked is None for r in records.values()) == 1


async def test_metrics_are_open_unless_protected(tmp_path: Path) -> None:
    config = auth_config(tmp_path)
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            r = await c.get("/metrics")
    assert r.status_code == 200 and "gateway_active_streams" in r.text


async def test_another_tenant_gets_404_and_never_the_first_tenants_cache_or_corrections(
    tmp_path: Path,
) -> None:
    config = auth_config(tmp_path)
    _, a = add_key(config.auth.keys_file, "alpha")
    _, b = add_key(config.auth.keys_file, "beta")
    secret = {"segments": [{"start": 0.0, "end": 2.8, "text": "alpha's private words"}]}
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            first = await c.post("/v1/transcriptions", files=wav(), headers=bearer(a))
            assert first.status_code == 200 and first.json()["text"] == "alpha beta gamma"
            id = first.json()["id"]
            put = await c.put(
                f"/v1/transcriptions/{id}/corrections", json=secret, headers=bearer(a)
            )
            assert put.status_code == 200 and put.json()["corrected"] is True
            document = f"/asr/validation/document/{content_uuid(id)}"
            paragraphs = [{"speaker_no": 0, "start": 0.0, "end": 1.0, "text": "beta's words"}]
            # Beta cannot see, correct or validate alpha's transcript: 404, as if it did not exist.
            for r in (
                await c.get(f"/v1/transcriptions/{id}", headers=bearer(b)),
                await c.put(f"/v1/transcriptions/{id}/corrections", json=secret, headers=bearer(b)),
            ):
                assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
            for r in (
                await c.get(document, headers=bearer(b)),
                await c.post(document, json=paragraphs, headers=bearer(b)),
            ):
                assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
            # The same bytes from beta are transcribed afresh, on every front API.
            opened = engine(gw).opened
            oa = await c.post(
                "/v1/audio/transcriptions",
                files=wav(),
                data={"model": "whisper-1"},
                headers=bearer(b),
            )
            assert oa.status_code == 200 and oa.json()["text"] == "alpha beta gamma"
            assert engine(gw).opened == opened + 1
            async with c.stream(
                "POST", "/asr/transcribe/stream", files=wav(), headers=bearer(b)
            ) as r:
                aym = [e async for e in sse_events(r)]
            assert "private" not in json.dumps([e.data for e in aym])
            async with c.stream(
                "POST", "/v1/transcriptions/stream", files=wav(), headers=bearer(b)
            ) as r:
                native = [e async for e in sse_events(r)]
            done = native[-1].data
            assert native[-1].event == "done" and done["cached"] is True
            assert done["corrected"] is False and done["text"] == "alpha beta gamma"
            # Alpha still has its corrections; beta's own copy has none.
            mine = (await c.get(f"/v1/transcriptions/{id}", headers=bearer(a))).json()
            theirs = (await c.get(f"/v1/transcriptions/{id}", headers=bearer(b))).json()
    assert mine["text"] == "alpha's private words" and mine["corrected"] is True
    assert theirs["text"] == "alpha beta gamma" and theirs["corrected"] is False


async def test_revocation_takes_effect_on_the_next_request_and_the_cache_does_not_hide_it(
    tmp_path: Path,
) -> None:
    config = auth_config(tmp_path)
    record, key = add_key(config.auth.keys_file, "alpha")
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            # Twice: the second is answered from the verified-key cache.
            for _ in range(2):
                assert (await c.get("/v1/models", headers=bearer(key))).status_code == 200
            result = await trio.run_process(
                [*GATEWAY, "keys", "revoke", record.id, "--keys-file", config.auth.keys_file],
                capture_stderr=True,
            )
            assert record.id.encode() in result.stderr
            r = await c.get("/v1/models", headers=bearer(key))
    assert r.status_code == 401


async def test_keyring_reads_what_the_cli_functions_write(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    ring = KeyRing(path)  # a missing file refuses every key
    with pytest.raises(Unauthorized):
        await ring.authenticate(KEY_PREFIX + "0" * 16 + "_" + "x" * 43)
    record, key = add_key(path, "acme")
    assert key.startswith(f"{KEY_PREFIX}{record.id}_") and record.hash and record.salt
    assert await ring.authenticate(key) == "acme"
    # The file holds no secret: only the salted hash.
    assert key.split("_", 2)[2] not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        add_key(path, "")
    with pytest.raises(KeyError):
        revoke_key(path, "nope")
    first = revoke_key(path, record.id)
    assert revoke_key(path, record.id).revoked == first.revoked
    with pytest.raises(Unauthorized):
        await ring.authenticate(key)


async def test_stream_limit_per_tenant_is_429_in_each_shape_and_freed_however_a_stream_ends(
    tmp_path: Path,
) -> None:
    config = auth_config(
        tmp_path,
        engines={
            "slow": {
                "kind": "scripted",
                "words": ["w"] * 30,
                "seconds_per_word": 0.1,
                "delay": 0.2,
            },
            "broken": {"kind": "scripted", "words": WORDS, "fail_after": 0},
        },
        max_streams_per_tenant=1,
    )
    _, a = add_key(config.auth.keys_file, "alpha")
    _, b = add_key(config.auth.keys_file, "beta")
    stream = "/v1/transcriptions/stream"
    slow = {"engine": "slow", "use_cache": "false"}
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            active = gw.state.tenant_streams.active
            stored = await c.post("/v1/transcriptions", files=wav(), headers=bearer(a))
            assert stored.json()["cached"] is False and not active
            async with c.stream("POST", stream, params=slow, files=wav(), headers=bearer(a)) as r:
                events = sse_events(r)
                assert (await anext(events)).event == "transcription"
                assert active == {"alpha": 1}
                refused = [
                    await c.post(stream, files=wav(), headers=bearer(a)),
                    await c.post("/v1/transcriptions", files=wav(), headers=bearer(a)),
                    await c.post(
                        "/v1/audio/transcriptions",
                        files=wav(),
                        data={"model": "whisper-1"},
                        headers=bearer(a),
                    ),
                    await c.post("/asr/transcribe", files=wav(), headers=bearer(a)),
                ]
                for r429 in refused:
                    assert r429.status_code == 429, r429.text
                    assert int(r429.headers["retry-after"]) >= 1
                assert refused[0].json()["error"]["code"] == "TOO_MANY_STREAMS"
                assert refused[2].json()["error"]["type"] == "rate_limit_error"
                assert refused[3].json()["code"] == "TOO_MANY_STREAMS"
                # Another tenant is not held back by alpha's stream.
                other = await c.post("/v1/transcriptions", files=wav(), headers=bearer(b))
                assert other.status_code == 200
                await events.aclose()
            # The client left mid-stream: the slot is freed once the job has wound down.
            await wait_until(lambda: not active)
            await engine(gw, "slow").wait_closed(1)
            # Cache hit, engine failure, and a whole stream: each frees its slot once.
            cached = await c.post("/v1/transcriptions", files=wav(), headers=bearer(a))
            assert cached.json()["cached"] is True and not active
            failed = await c.post(
                "/v1/transcriptions", params={"engine": "broken"}, files=wav(), headers=bearer(a)
            )
            assert failed.status_code == 502 and not active
            again = {"use_cache": "false"}
            async with c.stream("POST", stream, params=again, files=wav(), headers=bearer(a)) as r:
                assert [e.event async for e in sse_events(r)][-1] == "done"
            await wait_until(lambda: not active)
            assert gw.state.active_jobs == 0


async def test_openai_sdk_sends_the_key_and_a_wrong_one_is_an_authentication_error(
    tmp_path: Path,
) -> None:
    config = auth_config(tmp_path)
    _, key = add_key(config.auth.keys_file, "alpha")
    with trio.fail_after(60):
        async with run_gateway(config) as gw:
            async with openai.AsyncOpenAI(
                base_url=gw.url + "/v1", api_key=key, max_retries=0
            ) as client:
                result = await client.audio.transcriptions.create(model="whisper-1", file=GOFORWARD)
                assert result.text == "alpha beta gamma"
            async with openai.AsyncOpenAI(
                base_url=gw.url + "/v1", api_key=key[:-2] + "zz", max_retries=0
            ) as client:
                with pytest.raises(openai.AuthenticationError) as caught:
                    await client.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "unauthorized"


async def test_keys_cli_add_list_revoke_as_a_subprocess(tmp_path: Path) -> None:
    keys = tmp_path / "secrets" / "keys.jsonl"
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(f'[auth]\nkeys_file = "{keys}"\n')

    async def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(
            [*GATEWAY, "keys", *args], capture_stdout=True, capture_stderr=True, check=check
        )

    with trio.fail_after(60):
        added = await run("add", "--tenant", "acme", "--config", str(config_file))
        key = added.stdout.decode().strip()
        assert key.startswith(KEY_PREFIX) and b"only this once" in added.stderr
        other = (await run("add", "--tenant", "zeta", "--keys-file", str(keys))).stdout.decode()
        listed = (await run("list", "--keys-file", str(keys))).stdout.decode()
        rows = [line.split("\t") for line in listed.splitlines()]
        assert rows[0] == ["id", "tenant", "created", "revoked"]
        assert [(r[1], r[3]) for r in rows[1:]] == [("acme", "-"), ("zeta", "-")]
        key_id = rows[1][0]
        assert key.startswith(f"{KEY_PREFIX}{key_id}_")
        # Neither the list nor the file shows a secret.
        for secret in (key.split("_", 2)[2], other.strip().split("_", 2)[2]):
            assert secret not in listed and secret not in keys.read_text()
        await run("revoke", key_id, "--config", str(config_file))
        listed = (await run("list", "--config", str(config_file))).stdout.decode()
        assert listed.splitlines()[1].split("\t")[3].endswith("Z")
        missing = await run("revoke", "f" * 16, "--keys-file", str(keys), check=False)
        assert missing.returncode == 1 and b"no key" in missing.stderr
        bad = await run("add", "--tenant", "no spaces", "--keys-file", str(keys), check=False)
        assert bad.returncode == 2 and b"tenant" in bad.stderr
        unset = await run("list", check=False)
        assert unset.returncode == 2 and b"auth.keys_file" in unset.stderr


async def test_transcribe_client_sends_its_api_key(tmp_path: Path) -> None:
    config = auth_config(tmp_path)
    _, key = add_key(config.auth.keys_file, "alpha")
    with trio.fail_after(60):
        async with run_gateway(config) as gw:
            command = [*GATEWAY, "transcribe", str(GOFORWARD), "--url", gw.url]
            refused = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
            flag = await trio.run_process(
                [*GATEWAY, "transcribe", str(GOFORWARD), "--url", gw.url, "--api-key", key],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            env = await trio.run_process(
                command,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "ASR_GATEWAY_API_KEY": key},
            )
    assert refused.returncode == 1 and b"401" in refused.stderr
    assert flag.returncode == 0 and flag.stdout.decode().strip() == "alpha beta gamma"
    assert env.returncode == 0 and env.stdout.decode().strip() == "alpha beta gamma"
