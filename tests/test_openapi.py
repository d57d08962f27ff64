"""GET /openapi.json: one OpenAPI 3.1 document for every route of the gateway, pinned to the app.

The fuzz tests (tests/test_fuzz.py) check real answers against it; these check the document
itself: every Starlette route and method is in it and nothing else is, it is a valid OpenAPI 3.1
document, its option values follow the code and the configuration, and every error answer names
its own API's error shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import make_config, run_gateway
from starlette.routing import Route

from gateway import exports, live_audio, openapi
from gateway.api import openai_compat
from gateway.app import create_app
from gateway.config import Config

pytestmark = pytest.mark.anyio

_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _config(tmp_path: Path, **sections: Any) -> Config:
    return make_config(
        tmp_path,
        server={"default_engine": "scripted"},
        engines={"scripted": {"kind": "scripted"}, "slow": {"kind": "scripted", "delay": 1.0}},
        **sections,
    )


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in spec["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_every_route_and_method_of_the_app_is_in_the_document_and_nothing_else(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    app = create_app(config)
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"  # Starlette adds HEAD to every GET
    }
    assert len(served) == 19
    assert _operations(openapi.document(config)) == served


def test_the_document_is_valid_openapi_3_1_and_every_ref_resolves(tmp_path: Path) -> None:
    import schemathesis

    spec = openapi.document(_config(tmp_path), "1.2.3")
    assert spec["openapi"] == "3.1.0" and spec["info"]["version"] == "1.2.3"
    schemas = spec["components"]["schemas"]
    refs = set(re.findall(r'"\$ref":\s*"([^"]+)"', json.dumps(spec)))
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
    # schemathesis refuses a document that is not valid OpenAPI; every operation must load.
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19


def test_option_values_come_from_the_code_and_the_configuration(tmp_path: Path) -> None:
    config = _config(tmp_path, openai={"aliases": {"whisper-1": "slow"}})
    paths = openapi.document(config)["paths"]
    native = paths["/v1/transcriptions"]["post"]
    engine = next(p for p in native["parameters"] if p["name"] == "engine")
    assert engine["schema"]["enum"] == ["scripted", "slow"]
    form = native["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["engine"]["enum"] == [
        "scripted",
        "slow",
    ]
    # A live body is for the streaming route only; its options are the live WebSocket's.
    stream = {p["name"]: p for p in paths["/v1/transcriptions/stream"]["post"]["parameters"]}
    assert stream["live"]["schema"] == {"type": "boolean"}
    assert stream["format"]["schema"]["enum"] == list(live_audio.FORMATS)
    rate = stream["sample_rate"]["schema"]
    assert (rate["minimum"], rate["maximum"]) == (live_audio.MIN_RATE, live_audio.MAX_RATE)
    assert not {"live", "format", "sample_rate"} & {p["name"] for p in native["parameters"]}
    export = paths["/v1/transcriptions/{id}"]["get"]["parameters"][0]
    assert export["name"] == "format" and export["schema"]["enum"] == list(exports.FORMATS)
    openai_form = paths["/v1/audio/transcriptions"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]["schema"]
    props = openai_form["properties"]
    assert props["model"]["enum"] == ["scripted", "slow", "whisper-1"]
    assert props["response_format"]["enum"] == list(openai_compat.RESPONSE_FORMATS)
    assert props["timestamp_granularities[]"]["items"]["enum"] == list(openai_compat.GRANULARITIES)
    # Only the blocking AymurAI route is deprecated.
    assert paths["/asr/transcribe"]["post"]["deprecated"] is True
    assert not any(
        op.get("deprecated")
        for path, item in paths.items()
        if path != "/asr/transcribe"
        for op in item.values()
        if isinstance(op, dict)
    )


@pytest.mark.parametrize(
    ("prefix", "shape"),
    [
        ("/v1/transcriptions", "NativeError"),
        ("/v1/audio/", "OpenAIError"),
        ("/v1/models", "OpenAIError"),
        ("/asr/", "AymurAIError"),
    ],
)
def test_every_error_answer_has_its_own_apis_error_shape(
    tmp_path: Path, prefix: str, shape: str
) -> None:
    paths = openapi.document(_config(tmp_path))["paths"]
    errors = [
        response
        for path, item in paths.items()
        if path.startswith(prefix)
        for op in item.values()
        if isinstance(op, dict) and "responses" in op
        for status, response in op["responses"].items()
        if int(status) >= 400
    ]
    assert errors
    for response in errors:
        assert response["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{shape}"
        }


async def test_the_gateway_serves_the_document_of_its_configuration(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    from gateway import __version__

    assert r.json() == openapi.document(config, __version__)
