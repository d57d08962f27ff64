"""The web page (``GET /``) in a real browser: Debian's headless chromium driven by Playwright.

Each test serves the gateway on loopback and runs one browser script in a worker thread
(Playwright's sync API; its async API does not run under trio), under a trio.fail_after guard and
Playwright's own timeouts. Uploads use real recordings; the pages' states are saved as screenshots
under build/test-artifacts/web/ (ignored by git). A page that logs an uncaught error or a
Content-Security-Policy violation fails its test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from conftest import Gateway, make_config, run_gateway, sse_events
from wer import pooled_wer

from gateway.auth import add_key
from gateway.config import Config
from gateway.web import ASSETS

pytestmark = pytest.mark.anyio

playwright_api = pytest.importorskip("playwright.sync_api")

DATA = Path(__file__).parent / "data"
JFK = DATA / "whisper_jfk.wav"  # "And so my fellow Americans, ask not what your country can do..."
SHORT = DATA / "ds_LDC93S1.wav"  # 2.9 s
LONG = DATA / "ps_librivox_concat.wav"  # 24.7 s
ARTIFACTS = Path(__file__).parent.parent / "build" / "test-artifacts" / "web"
# Root needs --no-sandbox; the rest keeps chromium off the network (loopback only) and quiet.
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Playwright's own wait limit (ms): shorter than the trio guard, so a stuck wait fails the script
# with its own message and the browser closes, instead of an abandoned thread.
STEP_MS = 60_000
GUARD = 150

T = TypeVar("T")
Page = Any  # playwright.sync_api.Page (pytest.importorskip above leaves it untyped)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium: .ci/run installs Debian's chromium as root")
        pytest.skip("no chromium binary (apt-get install chromium, or run .ci/run as root)")
    return found


@contextmanager
def _page(chromium: str, args: tuple[str, ...]) -> Iterator[tuple[Page, list[str]]]:
    """A fresh browser page, and the list its uncaught errors and CSP violations go to."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True, args=[*BROWSER_ARGS, *args], timeout=STEP_MS
        )
        try:
            page = browser.new_context(accept_downloads=True).new_page()
            page.set_default_timeout(STEP_MS)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console: {m.text}")
                    if m.type == "error" and "Content Security Policy" in m.text
                    else None
                ),
            )
            yield page, problems
        finally:
            browser.close()


def _run_script(chromium: str, script: Callable[[Page], T], args: tuple[str, ...]) -> T:
    with _page(chromium, args) as (page, problems):
        result = script(page)
    assert not problems, problems
    return result


async def browse(script: Callable[[Page], T], *, microphone: Path | None = None) -> T:
    """Run ``script`` on a fresh page in a worker thread; the page must log no error.
    ``microphone``: a WAV file that Chromium's fake capture device plays (once) as the
    microphone, with the permission prompt answered yes."""
    chromium = _chromium()
    args: tuple[str, ...] = ()
    if microphone is not None:
        args = (
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop",
        )
    return await trio.to_thread.run_sync(partial(_run_script, chromium, script, args))


def _config(tmp_path: Path, engines: dict[str, Any] | None = None, **sections: Any) -> Config:
    engines = engines or {"fake": {"kind": "scripted", "words": ["hello", "web", "page"]}}
    return make_config(
        tmp_path,
        engines=engines,
        server={"default_engine": next(iter(engines)), "keepalive": 0},
        **sections,
    )


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def upload(page: Page, path: Path, *, engine: str = "") -> None:
    """Choose ``path`` in the page's file input (and ``engine``), then press Transcribe."""
    page.wait_for_selector("#engine option[value='']", state="attached")
    if engine:
        page.wait_for_selector(f"#engine option[value='{engine}']", state="attached")
        page.select_option("#engine", engine)
    page.set_input_files("#file", str(path))
    page.get_by_role("button", name="Transcribe").click()


def watch(page: Page) -> None:
    """Record in ``window.seen`` what the page showed on the way: the progress bar's values, and
    the transcript's committed and tentative parts."""
    page.evaluate(
        """() => {
          window.seen = {percents: [], parts: []};
          const text = (selector) => document.querySelector(selector)?.textContent ?? '';
          new MutationObserver(() => {
            const bar = document.getElementById('progress');
            window.seen.percents.push(bar.position === -1 ? null : bar.value);  // -1: no value
            window.seen.parts.push(
              [text('#transcript .committed'), text('#transcript .tentative').trim()]);
          }).observe(document.body, {subtree: true, childList: true, characterData: true,
                                     attributes: true});
        }"""
    )


def spy_websockets(page: Page) -> None:
    """Record in ``window.sockets`` each WebSocket the page opens: its URL and subprotocols, the
    bytes and text frames it sends, and the seconds from its creation to the first text."""
    page.evaluate(
        """() => {
          const Native = window.WebSocket;
          window.sockets = [];
          window.WebSocket = function (url, protocols) {
            const seen = {url, protocols, bytes: 0, texts: [], first_text: null};
            const born = performance.now();
            window.sockets.push(seen);
            const socket = new Native(url, protocols);
            const send = socket.send.bind(socket);
            socket.send = (data) => {
              if (typeof data === 'string') seen.texts.push(data);
              else seen.bytes += data.byteLength;
              send(data);
            };
            socket.addEventListener('message', (m) => {
              if (seen.first_text === null && JSON.parse(m.data).text)
                seen.first_text = (performance.now() - born) / 1000;
            });
            return socket;
          };
          Object.assign(window.WebSocket, Native);
          window.WebSocket.prototype = Native.prototype;
        }"""
    )


def wait_status(page: Page, test: str) -> None:
    """Wait until the status line passes ``test``, a JavaScript string method call. (A function,
    not an expression: Playwright evaluates expressions with eval, which the page's CSP refuses.)"""
    page.wait_for_function(f"() => document.getElementById('status').textContent.{test}")


def wait_done(page: Page) -> None:
    wait_status(page, "startsWith('Done')")


@asynccontextmanager
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    async with run_gateway(config) as gw:
        yield gw


# --- the page and its headers, without a browser -------------------------------------------------


async def test_the_page_and_its_assets_are_served_with_strict_security_headers(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, auth={"keys_file": str(tmp_path / "keys.jsonl")})
    with trio.fail_after(30):
        async with gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            answers = {path: await c.get(path) for path in ["/", *(f"/web/{n}" for n in ASSETS)]}
            refused = await c.get("/v1/models")
            missing = await c.get("/web/nothing.js")
    # Public with auth on (the page asks for the key); the API behind it is not, nor is any other
    # path under /web/.
    assert refused.status_code == missing.status_code == 401
    types = {"/": "text/html", **{f"/web/{n}": m.split(";")[0] for n, m in ASSETS.items()}}
    for path, r in answers.items():
        assert r.status_code == 200, path
        assert r.headers["content-type"].split(";")[0] == types[path]
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    html = answers["/"].text
    # No inline code for the CSP to refuse: every script has a src, no style attributes.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/web/app.js" defer>']
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    assert 'id="transcript"' in html and 'aria-live="polite"' in html


# --- upload ---------------------------------------------------------------------------------------


async def test_upload_a_recording_with_whisper_streams_to_done_with_exports(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, {"embedded": {"kind": "whisper", "workers": 1}})

    def script(page: Page) -> dict[str, Any]:
        page.goto(url)
        watch(page)
        upload(page, JFK, engine="embedded")
        wait_done(page)
        screenshot(page, "upload-done.png")
        with page.expect_download() as download:
            page.get_by_role("link", name="srt").click()
        srt = Path(download.value.path()).read_text()
        return {
            "text": page.inner_text("#transcript"),
            "progress": page.eval_on_selector("#progress", "p => [p.value, p.max]"),
            "progress_text": page.inner_text("#progress-text"),
            "busy": page.get_attribute("#transcript", "aria-busy"),
            "links": page.eval_on_selector_all(
                "#exports a", "links => links.map(a => a.getAttribute('href'))"
            ),
            "url": page.url,
            "cached_hidden": page.is_hidden("#cached"),
            "seen": page.evaluate("window.seen"),
            "srt": srt,
            "error_hidden": page.is_hidden("#error"),
        }

    with trio.fail_after(GUARD):
        async with gateway(config) as gw:
            url = gw.url
            seen = await browse(script)
    for words in ("fellow americans", "ask not", "your country"):
        assert words in seen["text"].lower()
    assert seen["progress"] == [100, 100] and seen["progress_text"] == "100 %"
    assert seen["busy"] == "false" and seen["error_hidden"] and seen["cached_hidden"]
    # Progress grew through the stream before it reached 100 %.
    assert any(0 < p < 100 for p in seen["seen"]["percents"])
    id_ = re.search(r"/\?id=([0-9a-f]+)$", seen["url"])
    assert id_ is not None, seen["url"]
    base = f"/v1/transcriptions/{id_.group(1)}"
    assert seen["links"] == [*(f"{base}?format={f}" for f in ("txt", "srt", "vtt", "json")),
                             f"/?id={id_.group(1)}"]  # fmt: skip
    assert seen["srt"].startswith("1\n00:00:00,000 --> ") and "country" in seen["srt"]


async def test_the_tentative_tail_is_shown_apart_from_the_committed_text(tmp_path: Path) -> None:
    # The scripted engine commits a word per 0.7 s of audio (not a multiple of the decoder's
    # chunks) and shows the next one, partly heard, as tentative; a delay per update lets the page
    # render each snapshot.
    engines = {
        "fake": {
            "kind": "scripted",
            "words": ["hello", "web", "page"],
            "seconds_per_word": 0.7,
            "delay": 0.1,
        }
    }

    def script(page: Page) -> dict[str, Any]:
        page.goto(url)
        watch(page)
        upload(page, SHORT)
        wait_done(page)
        seen: dict[str, Any] = page.evaluate("window.seen")
        # How a tentative tail looks: in italics (and a muted colour).
        seen["style"] = page.evaluate(
            """() => {
              const span = document.createElement('span');
              span.className = 'tentative';
              document.getElementById('transcript').append(span);
              const style = getComputedStyle(span).fontStyle;
              span.remove();
              return style;
            }"""
        )
        return seen

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path, engines)) as gw:
            url = gw.url
            seen = await browse(script)
    parts = [tuple(p) for p in seen["parts"]]
    # "web" was shown as the tentative tail before it was committed; the end has no tail.
    assert ("hello", "web") in parts
    assert parts.index(("hello", "web")) < parts.index(("hello web", ""))
    assert parts[-1] == ("hello web page", "")
    assert seen["style"] == "italic"


async def test_the_same_upload_again_says_from_cache(tmp_path: Path) -> None:
    def script(page: Page) -> tuple[bool, str]:
        page.goto(url)
        upload(page, SHORT)
        wait_done(page)
        first = page.is_visible("#cached")
        upload(page, SHORT)
        page.wait_for_selector("#cached", state="visible")
        return first, page.inner_text("#status")

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path)) as gw:
            url = gw.url
            first, status = await browse(script)
    assert first is False
    assert status == "Done (from cache)."


async def test_the_queue_position_shows_while_the_engine_is_busy(tmp_path: Path) -> None:
    # One session at a time, one update per 0.1 s of audio, 0.15 s each: the long recording holds
    # the engine for about 37 s (it is let go as soon as the page shows its position), the page's
    # short one takes about 4 s.
    engines = {
        "slow": {
            "kind": "scripted",
            "words": ["queued", "then", "done"],
            "seconds_per_word": 0.1,
            "delay": 0.15,
            "max_sessions": 1,
        }
    }
    queued = trio.Event()

    def script(page: Page) -> tuple[str, str]:
        page.goto(url)
        upload(page, SHORT)
        page.wait_for_function(
            "() => document.getElementById('status').textContent.includes('position')"
        )
        status = page.inner_text("#status")
        screenshot(page, "queued.png")
        trio.from_thread.run_sync(queued.set)
        wait_done(page)
        return status, page.inner_text("#transcript")

    async def hog(task_status: trio.TaskStatus[None]) -> None:
        """Holds the engine's one session until the page has shown its queue position."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            files = {"file": (LONG.name, LONG.read_bytes(), "audio/wav")}
            async with (
                c.stream("POST", "/v1/transcriptions/stream", files=files) as r,
                aclosing(sse_events(r)) as events,
            ):
                async for event in events:
                    if event.event == "transcription":
                        break
                task_status.started()
                await queued.wait()
        # Leaving the stream cancels it: the engine's session goes to the page.

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path, engines)) as gw, trio.open_nursery() as nursery:
            url = gw.url
            await nursery.start(hog)
            status, text = await browse(script)
    assert status == "Waiting in the queue: position 1."
    assert text == "queued then done"


async def test_an_undecodable_file_shows_its_error_code_and_a_sentence(tmp_path: Path) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_bytes(b"these are typed notes, not a recording\n" * 200)

    def script(page: Page) -> tuple[str, str, bool]:
        page.goto(url)
        upload(page, notes)
        page.wait_for_selector("#error", state="visible")
        screenshot(page, "undecodable.png")
        return page.inner_text("#error"), page.inner_text("#status"), page.is_hidden("#exports")

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path)) as gw:
            url = gw.url
            error, status, no_exports = await browse(script)
    assert error.startswith("DECODE_ERROR: The file could not be decoded as audio.")
    assert status == "Failed." and no_exports


# --- results: corrections and permalinks ----------------------------------------------------------


async def test_a_correction_saved_from_the_page_is_served_by_the_api(tmp_path: Path) -> None:
    def script(page: Page) -> tuple[str, str, str]:
        page.goto(url)
        upload(page, SHORT)
        wait_done(page)
        assert page.is_hidden("#corrected")
        # The editor is reachable by its labels: one text box per segment, named by its times.
        box = page.get_by_label("0:01.0 \u2013 0:02.0")  # an en dash
        assert box.input_value() == "web"
        box.fill("corrected")
        page.get_by_role("button", name="Save corrections").click()
        page.wait_for_selector("#corrected", state="visible")
        screenshot(page, "corrected.png")
        return page.url, page.inner_text("#transcript"), page.inner_text("#save-status")

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path)) as gw:
            url = gw.url
            page_url, text, saved = await browse(script)
            id_ = page_url.rsplit("=", 1)[1]
            async with httpx.AsyncClient(base_url=gw.url) as c:
                stored = (await c.get(f"/v1/transcriptions/{id_}")).json()
                txt = (await c.get(f"/v1/transcriptions/{id_}", params={"format": "txt"})).text
    assert text == "hello corrected page" and saved == "Saved."
    assert stored["corrected"] is True and stored["text"] == "hello corrected page"
    assert [s["text"] for s in stored["segments"]] == ["hello", "corrected", "page"]
    assert [(s["start"], s["end"]) for s in stored["segments"]] == [(0, 1), (1, 2), (2, 3)]
    assert "corrected" in txt


async def test_the_permalink_reopens_a_stored_transcript(tmp_path: Path) -> None:
    def script(page: Page) -> dict[str, Any]:
        page.goto(f"{url}/?id={id_}")
        page.wait_for_function(
            "() => document.getElementById('status').textContent.startsWith('Stored')"
        )
        reopened = {
            "text": page.inner_text("#transcript"),
            "corrected": page.is_visible("#corrected"),
            "progress": page.eval_on_selector("#progress", "p => p.value"),
            "editor": page.is_visible("#segments textarea"),
        }
        page.goto(f"{url}/?id={'0' * 32}")
        page.wait_for_selector("#error", state="visible")
        reopened["missing"] = page.inner_text("#error")
        return reopened

    with trio.fail_after(GUARD):
        async with gateway(_config(tmp_path)) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            url = gw.url
            files = {"file": (SHORT.name, SHORT.read_bytes(), "audio/wav")}
            id_ = (await c.post("/v1/transcriptions", files=files)).json()["id"]
            segments = [{"start": 0, "end": 2.9, "text": "fixed by hand"}]
            put = await c.put(f"/v1/transcriptions/{id_}/corrections", json={"segments": segments})
            assert put.status_code == 200
            reopened = await browse(script)
    assert reopened["text"] == "fixed by hand" and reopened["corrected"] is True
    assert reopened["progress"] == 100 and reopened["editor"] is True
    assert reopened["missing"].startswith("NOT_FOUND: There is no such transcript")


# --- keys -----------------------------------------------------------------------------------------


async def test_with_auth_on_the_page_asks_for_a_key_and_says_when_it_is_wrong(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, auth={"keys_file": str(tmp_path / "keys.jsonl")})
    _, key = add_key(config.auth.keys_file, "alpha")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")

    def script(page: Page) -> dict[str, Any]:
        page.goto(url)
        page.wait_for_selector("#key-panel", state="visible")
        out: dict[str, Any] = {
            "prompt": page.inner_text("#key-reason"),
            "error_hidden_at_first": page.is_hidden("#key-error"),
            "focused": page.evaluate("document.activeElement.id"),
        }
        page.get_by_role("textbox", name="API key").fill(wrong)
        page.get_by_role("button", name="Use this key").click()
        page.wait_for_selector("#key-error", state="visible")
        out["wrong"] = page.inner_text("#key-error")
        out["stored_after_wrong"] = page.evaluate("sessionStorage.length")
        page.get_by_role("textbox", name="API key").fill(key)
        page.keyboard.press("Enter")  # the form submits from the keyboard
        page.wait_for_selector("#key-panel", state="hidden")
        upload(page, SHORT)
        wait_done(page)
        with page.expect_download() as download:
            page.get_by_role("link", name="txt").click()
        out["txt"] = Path(download.value.path()).read_text()
        out["session"] = page.evaluate("Object.values(sessionStorage)")
        out["local"] = page.evaluate("localStorage.length")
        out["text"] = page.inner_text("#transcript")
        out["url"] = page.url
        # The microphone's WebSocket carries the key as a subprotocol, never in its URL.
        spy_websockets(page)
        page.get_by_role("button", name="Record").click()
        page.wait_for_function(
            "() => document.getElementById('transcript').textContent.includes('web')"
        )
        page.get_by_role("button", name="Stop").click()
        wait_done(page)
        out["sockets"] = page.evaluate("window.sockets")
        out["live_text"] = page.inner_text("#transcript")
        return out

    with trio.fail_after(GUARD):
        async with gateway(config) as gw:
            url = gw.url
            seen = await browse(script, microphone=SHORT)
    assert seen["prompt"] == "This gateway needs an API key."
    assert seen["error_hidden_at_first"] and seen["focused"] == "key-input"
    assert seen["wrong"].startswith("That API key was refused: it is wrong or has been revoked.")
    assert seen["stored_after_wrong"] == 0  # a refused key is not kept
    # The good key: kept for this tab only, sent as a Bearer header (exports included).
    assert seen["session"] == [key] and seen["local"] == 0
    assert seen["text"] == "hello web page" and "hello web page" in seen["txt"]
    assert key not in seen["url"]
    [socket] = seen["sockets"]
    assert socket["protocols"] == ["asr-gateway", f"bearer.{key}"] and key not in socket["url"]
    assert seen["live_text"].startswith("hello web")


# --- the microphone -------------------------------------------------------------------------------


async def test_record_streams_the_microphone_live_and_stop_gives_the_final_text(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, {"embedded": {"kind": "whisper", "workers": 1}})

    def script(page: Page) -> dict[str, Any]:
        page.goto(url)
        page.wait_for_selector("#engine option[value='embedded']", state="attached")
        note = page.inner_text("#live-note")
        watch(page)
        spy_websockets(page)
        page.get_by_role("button", name="Record").click()
        wait_status(page, "startsWith('Listening')")
        # The text grows while the recording plays (11 s, in real time); once the engine has
        # heard all of it, Stop ends the stream.
        page.wait_for_function(
            "() => document.getElementById('transcript').textContent.includes('country')"
        )
        live_text = page.inner_text("#transcript")
        wait_status(page, "match(/Transcribing: (1[1-9]|[2-9][0-9])\\./)")
        page.get_by_role("button", name="Stop").click()
        wait_done(page)
        screenshot(page, "live-done.png")
        return {
            "note": note,
            "live_text": live_text,
            "text": page.inner_text("#transcript"),
            "sockets": page.evaluate("window.sockets"),
            "percents": page.evaluate("window.seen.percents"),
            "record": page.is_enabled("#record"),
            "stop": page.is_disabled("#stop"),
            "url": page.url,
        }

    with trio.fail_after(GUARD):
        async with gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            url = gw.url
            seen = await browse(script, microphone=JFK)
            id_ = seen["url"].rsplit("=", 1)[1]
            stored = (await c.get(f"/v1/transcriptions/{id_}")).json()
    assert seen["note"] == "Record streams your microphone; Stop ends it."
    [socket] = seen["sockets"]
    assert socket["url"] == f"{url.replace('http', 'ws')}/v1/transcriptions/live?format=auto"
    assert socket["protocols"] == ["asr-gateway"] and socket["texts"] == ['{"type":"end"}']
    # WebM/Opus at 32 kbit/s: a quarter of the 32 KB/s of 16 kHz PCM, or less. The measurements go to
    # the artifacts (bytes per second of audio, seconds from Record to the first text).
    rate = socket["bytes"] / stored["current_time"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "live-measure.json").write_text(
        json.dumps({"bytes_per_audio_second": rate, "first_text_seconds": socket["first_text"]})
    )
    assert rate < 8_000 and socket["first_text"] < 11
    # The fake microphone plays the recording through Opus at 48 kHz: the final text is close to
    # the reference, not equal to it.
    reference = (DATA / "whisper_jfk.txt").read_text()
    assert pooled_wer([(reference, seen["text"])]) <= 0.35, seen["text"]
    for words in ("fellow", "your country", "can do for"):
        assert words in seen["text"].lower()
    assert "country" in seen["live_text"]  # text arrived before Stop
    # A live stream has no length: the bar had no value until done filled it.
    assert None in seen["percents"] and seen["percents"][-1] == 100
    assert seen["record"] and seen["stop"]
    assert stored["text"] == seen["text"] and stored["engine"] == "embedded"


def test_the_pages_files_are_package_data() -> None:
    # pyproject.toml ships them; a wheel without them would serve an empty page.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["gateway"]
    package = Path(__file__).parent.parent / "gateway"
    shipped = {p.name for pattern in patterns for p in package.glob(pattern)}
    assert shipped == {"index.html", *ASSETS}
    # The page links every asset, and only those.
    page = (package / "static" / "index.html").read_text()
    linked = set(re.findall(r'"/web/([^"]+)"', page))
    assert linked == set(ASSETS)
