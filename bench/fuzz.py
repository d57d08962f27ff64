"""Fuzz every route of a real ``gateway serve``: schemathesis on /openapi.json, then raw sockets.

Setup, all on 127.0.0.1: a ``gateway serve`` subprocess whose only engine is ``scripted`` (an
instant script, so no CPU goes to speech recognition), with short body and header timeouts so a
stalled request is answered in seconds.

1. **schemathesis** (the OpenAPI fuzzer) loads the gateway's own ``/openapi.json`` and generates
   requests for every operation, half from valid data (positive) and half from data that breaks
   the document (negative). To reach past the first 404 or 415, some cases get a real transcript's
   id in the path, or a real WAV as the upload. Each response is checked: no 5xx; it conforms to
   the document (status, content type, headers, body schema); every 4xx carries its API's coded
   error body (native ``{"error": {"code"}}``, OpenAI ``{"error": {"code"}}``, AymurAI
   ``{"code"}``); no answer within ``REQUEST_TIMEOUT`` is a hang.
2. **raw sockets**, for what schemathesis never sends: truncated multipart, a missing or wrong
   boundary, bogus Content-Length values, Content-Length with Transfer-Encoding (smuggling),
   non-UTF-8 and oversized headers, header floods, garbage declared to be audio, then random byte
   mutations of valid requests. Each must get a coded 4xx, or a clean close where HTTP has no
   better answer (the request cannot be framed, or the client stopped sending).

Afterwards the server's log must hold no traceback, no ``INTERNAL_ERROR`` and no 5xx.

Prints one table (requests, 5xx, non-conforming, uncoded 4xx, hangs, log problems) per fuzzer;
the exit status is 1 when any count but requests is not 0. Run from the repository root:
``python bench/fuzz.py`` (10,000 schemathesis requests and 2,000 raw ones by default).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _common import ROOT, machine, markdown_table, silent_wav, start_gateway  # noqa: E402

__all__ = [
    "GATEWAY_CONFIG",
    "RAW_CASES",
    "Tally",
    "coded_error",
    "fuzz_gateway",
    "log_problems",
    "raw_fuzz",
    "schema_fuzz",
]

# The engine under fuzz: scripted and instant (explicitly, whatever the default engine is).
GATEWAY_CONFIG: dict[str, Any] = {
    "server": {
        "default_engine": "scripted",
        "body_timeout": 2.0,
        "header_timeout": 2.0,
        "max_upload_bytes": 1024 * 1024,
        "keepalive": 0.0,
    },
    "engines": {"scripted": {"kind": "scripted", "words": ["fuzz", "me"], "seconds_per_word": 0.1}},
}
# A request unanswered after this long is a hang (the body and header timeouts are 2 s).
REQUEST_TIMEOUT = 15.0
# Paths whose errors are OpenAI's or AymurAI's shape; every other path answers in the native one.
_OPENAI_PREFIXES = ("/v1/audio/", "/v1/models")
_AYMURAI_PREFIX = "/asr/"


def _api_of(path: str) -> str:
    if path.startswith(_OPENAI_PREFIXES):
        return "openai"
    return "aymurai" if path.startswith(_AYMURAI_PREFIX) else "native"


def coded_error(path: str, content_type: str, body: bytes) -> str | None:
    """Why a 4xx answer lacks its API's machine-readable error body, or None when it has one."""
    if not content_type.startswith("application/json"):
        return f"content type {content_type!r}"
    try:
        payload = json.loads(body)
    except ValueError:
        return "the body is not JSON"
    api = _api_of(path)
    holder = (
        payload
        if api == "aymurai"
        else (payload or {}).get("error")
        if isinstance(payload, dict)
        else None
    )
    code = holder.get("code") if isinstance(holder, dict) else None
    if not isinstance(code, str) or not code:
        return f"no {api} error code in {body[:200]!r}"
    return None


@dataclass
class Tally:
    """What one fuzzer saw; every list holds short descriptions of the offending requests."""

    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    nonconforming: list[str] = field(default_factory=list)
    uncoded: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(
            map(len, (self.server_errors, self.nonconforming, self.uncoded, self.hangs, self.log))
        )

    def row(self, name: str) -> list[str]:
        counts = (self.server_errors, self.nonconforming, self.uncoded, self.hangs, self.log)
        return [name, f"{self.requests:,}", *(str(len(c)) for c in counts)]

    def examples(self, limit: int = 5) -> str:
        out = []
        for name in ("server_errors", "nonconforming", "uncoded", "hangs", "log"):
            items: list[str] = getattr(self, name)
            out += [f"{name}: {item}" for item in items[:limit]]
        return "\n".join(out)


_HEADER = ["fuzzer", "requests", "5xx", "non-conforming", "uncoded 4xx", "hangs", "log problems"]


def log_problems(text: str) -> list[str]:
    """Errors, tracebacks, INTERNAL_ERROR outcomes and 5xx statuses in the gateway's JSON log."""
    problems = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            if "Traceback" in line:
                problems.append(line[:300])
            continue
        request = record.get("request") or {}
        status = request.get("status") or 0
        if (
            record.get("level") in ("ERROR", "CRITICAL")
            or "exc" in record
            or request.get("outcome") == "INTERNAL_ERROR"
            or status >= 500
        ):
            problems.append(line[:300])
    return problems


# --- schemathesis --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeds:
    """Things that exist on the server, so that generated requests also reach the success paths."""

    transcript_id: str
    document_id: str
    wavs: tuple[bytes, ...]


def _seed(url: str) -> Seeds:
    import requests

    wavs = tuple(silent_wav(0.1 + 0.05 * i) for i in range(8))
    files = {"file": ("seed.wav", wavs[0], "audio/wav")}
    native = requests.post(url + "/v1/transcriptions", files=files, timeout=REQUEST_TIMEOUT)
    native.raise_for_status()
    aymurai = requests.post(url + "/asr/transcribe", files=files, timeout=REQUEST_TIMEOUT)
    aymurai.raise_for_status()
    return Seeds(native.json()["id"], aymurai.json()["document_id"], wavs)


def _steer(case: Any, seeds: Seeds, rnd: random.Random) -> None:
    """Point some cases at real resources: a stored id in the path, a real WAV as the upload."""
    params = case.path_parameters or {}
    if rnd.random() < 0.5:
        if "id" in params:
            params["id"] = seeds.transcript_id
        if "document_id" in params:
            params["document_id"] = seeds.document_id
        if "model" in params:
            params["model"] = "scripted"
    if rnd.random() < 0.4:
        wav = rnd.choice(seeds.wavs)
        if isinstance(case.body, dict) and "file" in case.body:
            case.body["file"] = wav
        elif isinstance(case.body, bytes | bytearray):
            case.body = wav


def schema_fuzz(url: str, examples: int, seed: int = 0) -> Tally:
    """``examples`` schemathesis requests against the gateway at ``url`` (blocking)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    strategy = schema.as_strategy(schemathesis.GenerationMode.POSITIVE) | schema.as_strategy(
        schemathesis.GenerationMode.NEGATIVE
    )
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    seeds = _seed(url)
    tally = Tally()
    session = requests.Session()

    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy, salt=st.integers(0, 2**32))
    def run(case: Any, salt: int) -> None:
        _steer(case, seeds, random.Random(salt))
        what = f"{case.method} {case.formatted_path}"
        tally.requests += 1
        try:
            response = case.call(base_url=url, session=session, timeout=REQUEST_TIMEOUT)
        except requests.Timeout:
            tally.hangs.append(what)
            return
        except requests.ConnectionError as exc:
            # A well-formed request must get an answer, not a dropped connection.
            tally.nonconforming.append(f"{what}: connection error {exc}")
            session.close()
            return
        status = response.status_code
        tally.statuses[f"{status // 100}xx"] += 1
        if status >= 500:
            tally.server_errors.append(f"{what}: {status} {response.content[:200]!r}")
        elif status >= 400:
            types = response.headers.get("content-type") or [""]
            reason = coded_error(case.formatted_path, types[0], response.content)
            if reason is not None:
                tally.uncoded.append(f"{what}: {status} {reason}")
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis's failures (or groups)
            if status < 500:
                tally.nonconforming.append(f"{what}: {status} {_first_line(exc)}")

    import hypothesis

    hypothesis.seed(seed)(run)()
    session.close()
    return tally


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, BaseExceptionGroup):
        text = "; ".join(str(e).strip() for e in exc.exceptions if str(e).strip())
    return text.splitlines()[0][:3000] if text else type(exc).__name__


# --- raw sockets ---------------------------------------------------------------------------------

_BOUNDARY = b"fuzzboundary"
_WAV = silent_wav(0.2)


def _multipart(file: bytes, boundary: bytes = _BOUNDARY, file_type: bytes = b"audio/wav") -> bytes:
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: " + file_type + b"\r\n\r\n" + file + b"\r\n"
        b"--" + boundary + b"--\r\n"
    )


def _request(
    path: bytes,
    body: bytes = b"",
    *,
    method: bytes = b"POST",
    content_type: bytes | None = b"multipart/form-data; boundary=" + _BOUNDARY,
    length: bytes | None = None,
    extra: bytes = b"",
) -> bytes:
    head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    if length is None and (body or method == b"POST"):
        length = str(len(body)).encode()
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    return head + extra + b"\r\n" + body


_UPLOAD_PATHS = (
    b"/v1/transcriptions",
    b"/v1/transcriptions/stream",
    b"/asr/transcribe",
    b"/asr/transcribe/stream",
)


def _openai(body: bytes, boundary: bytes = _BOUNDARY) -> bytes:
    field_ = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nscripted\r\n'
    )
    return field_ + body


def _chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


@dataclass(frozen=True)
class RawCase:
    """One raw request: ``send`` is written, then (``half_close``) the write side is shut."""

    name: str
    path: bytes
    send: bytes
    half_close: bool = False
    # The request sends bytes past its own framing: the server closes with them unread, and the
    # client's stack may then reset the connection before the whole answer arrived.
    excess: bool = False


def _cases() -> Iterator[RawCase]:
    whole = _multipart(_WAV)
    garbage = bytes(random.Random(7).getrandbits(8) for _ in range(4096))
    for path in _UPLOAD_PATHS:
        p = path.decode()
        yield RawCase(
            f"truncated multipart, EOF {p}",
            path,
            _request(path, whole[:200], length=str(len(whole)).encode()),
            half_close=True,
        )
        yield RawCase(
            f"truncated multipart, stalled {p}",
            path,
            _request(path, whole[:200], length=str(len(whole)).encode()),
        )
        yield RawCase(
            f"multipart without its end {p}", path, _request(path, whole[: len(whole) - 20])
        )
        yield RawCase(
            f"no boundary {p}", path, _request(path, whole, content_type=b"multipart/form-data")
        )
        yield RawCase(
            f"empty boundary {p}",
            path,
            _request(path, whole, content_type=b"multipart/form-data; boundary="),
        )
        yield RawCase(
            f"wrong boundary {p}",
            path,
            _request(path, whole, content_type=b"multipart/form-data; boundary=other"),
        )
        yield RawCase(f"no content type {p}", path, _request(path, whole, content_type=None))
        for length in (b"abc", b"-1", b"1e3", b"99999999999999999999", b"12, 13", b" 5", b"0x10"):
            yield RawCase(
                f"Content-Length {length!r} {p}",
                path,
                _request(path, whole, length=length),
                excess=length == b" 5",  # h11 reads it as 5
            )
        yield RawCase(
            f"Content-Length short {p}", path, _request(path, whole, length=b"10"), excess=True
        )
        yield RawCase(
            f"two Content-Lengths {p}", path, _request(path, whole, extra=b"Content-Length: 5\r\n")
        )
        yield RawCase(
            f"Content-Length and chunked {p}",
            path,
            _request(path, _chunked(whole), extra=b"Transfer-Encoding: chunked\r\n"),
        )
        smuggled = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        yield RawCase(
            f"Content-Length 4, chunked, a smuggled request {p}",
            path,
            _request(
                path,
                _chunked(whole) + smuggled,
                length=b"4",
                extra=b"Transfer-Encoding: chunked\r\n",
            ),
        )
        yield RawCase(
            f"Transfer-Encoding gzip {p}",
            path,
            _request(path, whole, length=None, extra=b"Transfer-Encoding: gzip\r\n"),
        )
        yield RawCase(
            f"bad chunk size {p}",
            path,
            _request(
                path, b"zz\r\nab\r\n0\r\n\r\n", length=None, extra=b"Transfer-Encoding: chunked\r\n"
            ),
        )
        yield RawCase(
            f"non-UTF-8 content type {p}",
            path,
            _request(path, whole, content_type=b"multipart/form-data; boundary=\xff\xfe"),
        )
        yield RawCase(
            f"non-UTF-8 header {p}", path, _request(path, whole, extra=b"X-Name: \xc3\x28\xff\r\n")
        )
        yield RawCase(
            f"non-UTF-8 query {p}",
            path + b"?engine=%ff%fe&use_cache=%c3%28",
            _request(path + b"?engine=%ff%fe&use_cache=%c3%28", whole),
        )
        yield RawCase(
            f"oversized header {p}",
            path,
            _request(path, whole, extra=b"X-Big: " + b"a" * 200_000 + b"\r\n"),
        )
        yield RawCase(
            f"header flood {p}",
            path,
            _request(path, whole, extra=b"".join(b"X-%d: v\r\n" % i for i in range(20_000))),
        )
        yield RawCase(f"garbage as audio/wav {p}", path, _request(path, _multipart(garbage)))
        yield RawCase(
            f"garbage as audio/mpeg {p}",
            path,
            _request(path, _multipart(garbage, file_type=b"audio/mpeg")),
        )
        yield RawCase(
            f"raw garbage audio/wav {p}", path, _request(path, garbage, content_type=b"audio/wav")
        )
        yield RawCase(
            f"WAV header, garbage after {p}", path, _request(path, _multipart(_WAV[:44] + garbage))
        )
        yield RawCase(
            f"file field twice {p}",
            path,
            _request(
                path,
                _multipart(_WAV)[:-4] + b"\r\n" + _multipart(garbage)[len(b"--" + _BOUNDARY) + 2 :],
            ),
        )
        yield RawCase(
            f"non-UTF-8 field name {p}",
            path,
            _request(path, _multipart(_WAV).replace(b'name="file"', b'name="\xff\xfe"')),
        )
    openai = b"/v1/audio/transcriptions"
    yield RawCase("openai garbage audio", openai, _request(openai, _openai(_multipart(garbage))))
    yield RawCase(
        "openai truncated",
        openai,
        _request(openai, _openai(whole)[:150], length=b"5000"),
        half_close=True,
    )
    yield RawCase(
        "openai wrong boundary",
        openai,
        _request(openai, _openai(whole), content_type=b"multipart/form-data; boundary=x"),
    )
    for path, method in (
        (b"/v1/transcriptions/x/corrections", b"PUT"),
        (b"/asr/validation/document/" + b"0" * 8 + b"-0000-0000-0000-" + b"0" * 12, b"POST"),
    ):
        p = path.decode()
        yield RawCase(
            f"JSON body, bogus length {p}",
            path,
            _request(
                path, b"{}", method=method, content_type=b"application/json", length=b"99999999999"
            ),
        )
        yield RawCase(
            f"JSON body, chunked and length {p}",
            path,
            _request(
                path,
                _chunked(b"{}"),
                method=method,
                content_type=b"application/json",
                extra=b"Transfer-Encoding: chunked\r\n",
            ),
        )
        yield RawCase(
            f"JSON body, non-UTF-8 {p}",
            path,
            _request(
                path, b'{"segments": "\xff"}', method=method, content_type=b"application/json"
            ),
        )
    for raw in (
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/transcriptions/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models/%c3%28 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n: novalue\r\n\r\n",
        b"\r\n\r\n\r\n",
    ):
        yield RawCase(f"malformed {raw[:30]!r}", raw.split(b" ")[1] if b" " in raw else b"/", raw)


RAW_CASES: tuple[RawCase, ...] = tuple(_cases())


def _mutate(rnd: random.Random) -> RawCase:
    """A valid upload with a few random byte edits (flips, deletions, insertions, a cut)."""
    base = rnd.choice(RAW_CASES[:8])
    data = bytearray(_request(base.path, _multipart(_WAV)))
    for _ in range(rnd.randint(1, 6)):
        i = rnd.randrange(len(data))
        op = rnd.random()
        if op < 0.5:
            data[i] = rnd.getrandbits(8)
        elif op < 0.75:
            del data[i]
        else:
            data[i:i] = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 8)))
    if rnd.random() < 0.2:
        data = data[: rnd.randrange(len(data))]
    return RawCase(
        "mutated upload", base.path, bytes(data), half_close=rnd.random() < 0.5, excess=True
    )


@dataclass
class RawAnswer:
    status: int | None  # None: the connection closed without an answer; -1: not HTTP
    content_type: str
    body: bytes
    complete: bool = True


async def _exchange(host: str, port: int, case: RawCase) -> RawAnswer:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        try:
            await stream.send_all(case.send)
            if case.half_close:
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server answered (or closed) before taking all of it: read what it said
        data = bytearray()
        # Read until the answer is complete by its own framing, or the server closes. (Hypercorn
        # keeps a connection open after a chunked answer even when the request said
        # "Connection: close"; the client closes it, as HTTP clients do.)
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
                answer = _parse(bytes(data))
                if answer is not None and answer.complete:
                    return answer
        except trio.BrokenResourceError:
            pass  # a reset after the answer
    return _parse(bytes(data)) or RawAnswer(None, "", b"")


def _parse(data: bytes) -> RawAnswer | None:
    """The answer in ``data`` so far (``complete`` once its framing says so); None before the
    end of its head."""
    if not data:
        return RawAnswer(None, "", b"")
    head, found, rest = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        return RawAnswer(-1, "", data[:200], complete=len(data) >= 12)
    if not found:
        return None
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().decode("latin-1")
    status = int(match.group(1))
    if headers.get(b"transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
    else:
        length = headers.get(b"content-length", "")
        size = int(length) if length.isdigit() else 0
        body, complete = rest[:size], len(rest) >= size
    return RawAnswer(status, headers.get(b"content-type", ""), body, complete)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked message so far, and whether its last chunk has arrived."""
    out = bytearray()
    while data:
        size_line, found, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return bytes(out), False
        if not found:
            break
        if size == 0:
            return bytes(out), rest.startswith(b"\r\n")
        if len(rest) < size + 2:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out), False


def _judge(case: RawCase, answer: RawAnswer, tally: Tally) -> None:
    what = case.name
    if answer.status is None:
        tally.statuses["closed"] += 1
        return
    tally.statuses[f"{answer.status // 100}xx" if answer.status > 0 else "not HTTP"] += 1
    if not answer.complete:
        tally.statuses["cut"] += 1
        if not case.excess:
            tally.nonconforming.append(f"{what}: the answer was cut short")
        return
    if answer.status < 0:
        tally.nonconforming.append(f"{what}: not an HTTP answer {answer.body!r}")
    elif answer.status >= 500:
        tally.server_errors.append(f"{what}: {answer.status} {answer.body[:200]!r}")
    elif answer.status >= 400:
        path = case.path.decode("latin-1").split("?")[0]
        reason = coded_error(path, answer.content_type, answer.body)
        if reason is not None:
            tally.uncoded.append(f"{what}: {answer.status} {reason}")


async def raw_fuzz(url: str, random_requests: int, seed: int = 0, concurrency: int = 8) -> Tally:
    """Every case of :data:`RAW_CASES`, then ``random_requests`` mutated uploads."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    rnd = random.Random(seed)
    cases = [*RAW_CASES, *(_mutate(rnd) for _ in range(random_requests))]
    tally = Tally()
    limiter = trio.CapacityLimiter(concurrency)

    async def one(case: RawCase) -> None:
        async with limiter:
            tally.requests += 1
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                try:
                    answer = await _exchange(host, int(port), case)
                except OSError as exc:
                    tally.nonconforming.append(f"{case.name}: {exc}")
                    return
            if scope.cancelled_caught:
                tally.hangs.append(case.name)
                return
            _judge(case, answer, tally)

    async with trio.open_nursery() as nursery:
        for case in cases:
            nursery.start_soon(one, case)
    return tally


# --- the whole run -------------------------------------------------------------------------------


def fuzz_gateway(
    schema_requests: int,
    raw_requests: int,
    seed: int = 0,
    *,
    source: Path = ROOT,
    progress: Callable[[str], None] = print,
) -> dict[str, Tally]:
    """Both fuzzers against one fresh ``gateway serve`` (of the checkout ``source``); the log is
    checked after each."""
    results: dict[str, Tally] = {}
    with start_gateway(GATEWAY_CONFIG, source=source) as server:
        seen = 0
        if schema_requests:
            started = time.monotonic()
            results["schemathesis"] = schema_fuzz(server.url, schema_requests, seed)
            text = server.log()
            results["schemathesis"].log = log_problems(text)
            seen = len(text)
            progress(f"schemathesis: {time.monotonic() - started:.0f} s")
        if raw_requests:
            started = time.monotonic()
            results["raw sockets"] = trio.run(raw_fuzz, server.url, raw_requests, seed)
            results["raw sockets"].log = log_problems(server.log()[seen:])
            progress(f"raw sockets: {time.monotonic() - started:.0f} s")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="schemathesis requests")
    parser.add_argument("--raw", type=int, default=2_000, help="random raw-socket requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to serve")
    args = parser.parse_args()
    results = fuzz_gateway(
        args.requests,
        args.raw,
        args.seed,
        source=args.source,
        progress=lambda s: print(s, file=sys.stderr),
    )
    print(machine(("schemathesis", "hypothesis", "hypercorn", "h11", "starlette")))
    rows = [tally.row(name) for name, tally in results.items()]
    print(markdown_table("Fuzzing a gateway serve (scripted engine)", _HEADER, rows))
    for name, tally in results.items():
        print(f"\n{name}: statuses {dict(sorted(tally.statuses.items()))}")
        if tally.failures:
            print(tally.examples())
    return 1 if any(t.failures for t in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
