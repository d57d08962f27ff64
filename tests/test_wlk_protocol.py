"""WhisperLiveKit protocol translation and the pacer, fed with frames and numbers (no sockets,
no clock)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.engines._wlk_pacer import BACKLOG_ROUNDING, REPORT_LATENCY, Pacer
from gateway.engines._wlk_protocol import (
    Line,
    ReadyToStop,
    ServerConfig,
    ServerError,
    Stitcher,
    Transcription,
    Unknown,
    decode_message,
    format_timestamp,
    parse_timestamp,
)
from gateway.errors import UpstreamError
from gateway.events import Segment

# Literal messages observed from WhisperLiveKit 0.2.26 (text replaced), from the reference.
CONFIG = '{"type": "config", "useAudioWorklet": true, "mode": "full"}'
NO_AUDIO = (
    '{"status": "no_audio_detected", "lines": [], "buffer_transcription": "", '
    '"buffer_diarization": "", "buffer_translation": "", "remaining_time_transcription": 0, '
    '"remaining_time_transcription_processing": 0.0, "remaining_time_transcription_policy": 0.0, '
    '"remaining_time_diarization": 0}'
)
ACTIVE = (
    '{"status": "active_transcription", "lines": [{"speaker": 1, "text": " hello there", '
    '"start": "0:00:00.26", "end": "0:00:01.94", "detected_language": "en"}], '
    '"buffer_transcription": "", "buffer_diarization": "", "buffer_translation": "", '
    '"remaining_time_transcription": 0, "remaining_time_transcription_processing": 25.8, '
    '"remaining_time_transcription_policy": 2.3, "remaining_time_diarization": 0}'
)
READY = '{"type": "ready_to_stop"}'


def update(
    *lines: tuple[float, float, str] | tuple[float, float, str, int], buffer: str = ""
) -> str:
    def line(spec: tuple[Any, ...]) -> dict[str, Any]:
        start, end, text, *rest = spec
        speaker = rest[0] if rest else 1
        return {
            "speaker": speaker,
            "text": text,
            "start": format_timestamp(start),
            "end": format_timestamp(end),
        }

    return json.dumps(
        {
            "status": "active_transcription",
            "lines": [line(spec) for spec in lines],
            "buffer_transcription": buffer,
            "remaining_time_transcription_processing": 1.5,
        }
    )


def feed(stitcher: Stitcher, message: str) -> None:
    event = decode_message(message)
    assert isinstance(event, Transcription)
    stitcher.update(event)


# -- decoding ---------------------------------------------------------------------------------


def test_decodes_the_observed_messages() -> None:
    assert decode_message(CONFIG) == ServerConfig(pcm=True, mode="full")
    assert decode_message(NO_AUDIO) == Transcription(
        status="no_audio_detected", lines=(), buffer="", backlog=0.0
    )
    assert decode_message(ACTIVE) == Transcription(
        status="active_transcription",
        lines=(Line(0.26, 1.94, "hello there"),),
        buffer="",
        backlog=25.8,
    )
    assert decode_message(READY) == ReadyToStop()
    assert decode_message(READY.encode()) == ReadyToStop()


def test_encoded_mode_config() -> None:
    assert decode_message(
        '{"type":"config","useAudioWorklet":false,"mode":"full"}'
    ) == ServerConfig(pcm=False, mode="full")


def test_silence_lines_are_marked() -> None:
    event = decode_message(
        '{"status":"active_transcription","lines":[{"speaker":-2,"text":null,'
        '"start":"0:00:06.72","end":"0:00:17.57"}],"buffer_transcription":"tail"}'
    )
    assert event == Transcription(
        status="active_transcription",
        lines=(Line(6.72, 17.57, "", silence=True),),
        buffer="tail",
        backlog=0.0,
    )


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        ('{"type": "error", "error": "invalid session parameters"}', "invalid session parameters"),
        (
            '{"status": "error", "lines": [], "buffer_transcription": "", '
            '"error": "FFmpeg error: write_error"}',
            "FFmpeg error: write_error",
        ),
        ('{"status": "error"}', "status: error"),
    ],
)
def test_errors_are_server_errors(message: str, detail: str) -> None:
    assert decode_message(message) == ServerError(detail)


def test_unknown_types_are_ignorable() -> None:
    assert decode_message('{"type": "diff", "seq": 2}') == Unknown("diff")


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1, 2]",
        '{"lines": [{"start": "x:y"}]}',
        '{"lines": 3}',
        '{"lines": [{"end": -1}]}',
    ],
)
def test_garbage_is_an_upstream_error(message: str) -> None:
    with pytest.raises(UpstreamError, match="unreadable"):
        decode_message(message)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0:00:13.05", 13.05), ("1:02:03.40", 3723.4), ("0:00:00", 0.0), ("12.5", 12.5), (3, 3.0)],
)
def test_parse_timestamp(text: str | float, seconds: float) -> None:
    assert parse_timestamp(text) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=100 * 3600 * 100))
def test_timestamps_round_trip_at_centisecond_precision(centis: int) -> None:
    seconds = centis / 100
    text = format_timestamp(seconds)
    assert parse_timestamp(text) == pytest.approx(seconds, abs=1e-6)
    assert text.count(":") == 2 and len(text.split(".")[-1]) == 2


# -- stitching ------------------------------------------------------------------------------------


def test_the_growing_last_line_is_tentative() -> None:
    s = Stitcher()
    feed(s, update((0.0, 1.0, "hello")))
    snap = s.snapshot(processed=1.2)
    assert snap.committed == ()
    assert snap.tentative == (Segment(0.0, 1.0, "hello"),)
    feed(s, update((0.0, 1.5, "hello there"), buffer="and"))
    snap = s.snapshot(processed=2.0)
    assert snap.tentative == (Segment(0.0, 1.5, "hello there"), Segment(1.5, 2.0, "and"))
    feed(s, update((0.0, 1.5, "hello there"), (1.5, 2.5, "and then"), (2.5, 8.0, "", -2)))
    snap = s.snapshot(processed=8.0)
    assert snap.committed == (Segment(0.0, 1.5, "hello there"), Segment(1.5, 2.5, "and then"))
    # A silence line is never shown, committed or not.
    assert snap.tentative == ()
    final = s.finalize(processed=8.0)
    assert final.committed == snap.committed
    assert final.tentative == ()


def test_committed_lines_are_frozen_as_first_seen() -> None:
    s = Stitcher()
    feed(s, update((0.0, 1.0, "one"), (1.0, 2.0, "two")))
    feed(s, update((0.0, 1.0, "ONE (revised)"), (1.0, 2.5, "two more")))
    assert s.snapshot(2.5).committed == (Segment(0.0, 1.0, "one"),)


def test_resume_offsets_the_next_connection_and_loses_nothing() -> None:
    s = Stitcher()
    feed(s, update((0.0, 2.0, "a b"), (2.0, 4.0, "c d"), (4.0, 5.0, "e")))
    # The connection drops: everything it showed is committed; resume at 5.0 s.
    assert s.end_connection() is True
    assert s.resume_point == 5.0
    s.begin_connection(5.0)
    assert s.resume_point == 5.0
    feed(s, update((0.0, 1.0, "f"), (1.0, 3.0, "g h")))
    final = s.finalize(processed=8.0)
    assert [seg.text for seg in final.committed] == ["a b", "c d", "e", "f", "g h"]
    assert final.committed[3] == Segment(5.0, 6.0, "f")
    assert final.committed[4] == Segment(6.0, 8.0, "g h")


def test_a_connection_without_lines_makes_no_progress() -> None:
    s = Stitcher()
    feed(s, update((0.0, 2.0, "a")))
    assert s.end_connection() is True
    s.begin_connection(2.0)
    feed(s, NO_AUDIO)
    assert s.end_connection() is False
    assert s.resume_point == 2.0


def test_silence_counts_for_the_resume_point() -> None:
    s = Stitcher()
    feed(s, update((0.0, 2.0, "a"), (2.0, 9.0, "", -2)))
    s.end_connection()
    assert s.resume_point == 9.0


def test_encoded_resume_drops_the_retranscribed_lines() -> None:
    s = Stitcher()
    feed(s, update((0.0, 2.0, "a b"), (2.0, 4.0, "c d")))
    s.end_connection()
    # The whole upload is sent again from its start; the new connection's clock is the session's.
    s.begin_connection(0.0, skip_before=s.resume_point)
    feed(s, update((0.0, 2.1, "a b"), (2.1, 3.9, "c d"), (3.9, 6.0, "e f"), (6.0, 7.0, "g")))
    assert [seg.text for seg in s.snapshot(7.0).committed] == ["a b", "c d", "e f"]
    assert [seg.text for seg in s.finalize(7.0).committed] == ["a b", "c d", "e f", "g"]


def test_a_leftover_buffer_is_kept_at_the_end() -> None:
    s = Stitcher()
    feed(s, update((0.0, 1.0, "one"), buffer="two"))
    final = s.finalize(processed=2.0)
    assert final.committed == (Segment(0.0, 1.0, "one"), Segment(1.0, 2.0, "two"))


lines_strategy = st.lists(
    st.tuples(st.integers(min_value=1, max_value=5), st.booleans()), min_size=1, max_size=12
)


@given(lines_strategy, st.lists(st.integers(min_value=0, max_value=11), max_size=4))
def test_committed_segments_only_ever_grow(shape: list[tuple[int, bool]], drops: list[int]) -> None:
    """Whatever the server sends and wherever connections drop, committed is append-only."""
    s = Stitcher()
    previous: tuple[Segment, ...] = ()
    t = 0.0
    shown: list[tuple[float, float, str] | tuple[float, float, str, int]] = []
    for step, (length, silent) in enumerate(shape):
        end = t + length
        shown.append((t, end, "", -2) if silent else (t, end, f"line{step}"))
        t = end
        feed(s, update(*shown))
        snap = s.snapshot(processed=t)
        assert snap.committed[: len(previous)] == previous
        previous = snap.committed
        if step in drops:
            expected_point = s.offset + t
            s.end_connection()
            s.begin_connection(s.resume_point)
            assert s.resume_point == pytest.approx(expected_point)
            shown = []
            t = 0.0
            # Later lines are on the new connection's clock.
            offset = s.offset
            assert offset >= (previous[-1].end if previous else 0.0)
    final = s.finalize(processed=t)
    assert final.committed[: len(previous)] == previous
    starts = [seg.start for seg in final.committed]
    assert starts == sorted(starts)


# -- the pacer -------------------------------------------------------------------------------------
FRAME = 0.25  # seconds of audio in one PCM frame


def test_pacer_lets_a_fresh_connection_send_up_to_its_lead() -> None:
    pacer = Pacer(lead=2.0)
    sent = 0
    while pacer.may_send(FRAME, now=0.0):
        pacer.sent += FRAME
        sent += 1
        assert sent < 100
    # Nothing reported, nothing confirmed: the lead is counted in full.
    assert pacer.sent == pytest.approx(2.0)
    assert pacer.lead_estimate(0.0) == pytest.approx(2.0)
    assert pacer.unconfirmed()


def test_pacer_counts_committed_lines_as_processed() -> None:
    pacer = Pacer(lead=2.0)
    pacer.sent = 2.0
    assert not pacer.may_send(FRAME, now=0.0)
    pacer.report(backlog=0.0, committed=1.5)
    assert pacer.lead_estimate(0.0) == pytest.approx(0.5)
    assert pacer.may_send(FRAME, now=0.0)
    # A later report with an earlier line never moves the committed end back.
    pacer.report(backlog=0.0, committed=1.0)
    assert pacer.committed == 1.5


def test_a_pong_confirms_audio_once_its_reports_have_settled() -> None:
    pacer = Pacer(lead=2.0)
    pacer.sent = 2.0
    pacer.report(backlog=0.3, committed=0.0)
    pacer.asked(pacer.sent)
    assert not pacer.unconfirmed()
    assert pacer.next_settle() == math.inf
    pacer.acked(2.0, now=10.0)
    assert pacer.next_settle() == pytest.approx(10.0 + REPORT_LATENCY)
    # Before the reports can reflect that audio, it still counts in full.
    assert pacer.lead_estimate(10.0 + REPORT_LATENCY / 2) == pytest.approx(2.0)
    # After: the server holds all of it, and only its backlog is unprocessed.
    settled = 10.0 + REPORT_LATENCY
    assert pacer.lead_estimate(settled) == pytest.approx(0.3 + BACKLOG_ROUNDING)
    assert pacer.next_settle() == math.inf
    assert pacer.processed(settled) == pytest.approx(2.0 - 0.3)
    assert pacer.may_send(FRAME, now=settled)


def test_an_idle_server_always_gets_the_next_frame() -> None:
    """Even a frame longer than the whole lead goes out once the server has caught up."""
    pacer = Pacer(lead=0.1)
    assert pacer.may_send(1.0, now=0.0)
    pacer.sent = 1.0
    assert not pacer.may_send(1.0, now=0.0)
    pacer.report(backlog=0.0, committed=1.0)
    assert pacer.may_send(1.0, now=0.0)


@pytest.mark.parametrize("speed", [0.25, 1.0, 3.0, 20.0])
def test_paced_audio_never_leads_the_server_by_more_than_the_lead(speed: float) -> None:
    """A simulated server processing at ``speed`` times real time, reporting its backlog
    (rounded to 0.1 s, as WhisperLiveKit does) and lines (every 0.5 s of processed audio) every
    tick; the writer sends frames when the pacer allows and pings when it may not. Whatever the
    speed, the audio the server holds unprocessed stays within the lead, and all of it goes."""
    lead, tick, total = 2.0, 0.05, 30.0
    pacer = Pacer(lead)
    received = processed = 0.0
    now = 0.0
    worst = 0.0
    while processed < total - 1e-9:
        assert now < 10_000, "the pacer stalled"
        while received < total - 1e-9 and pacer.may_send(FRAME, now):
            pacer.sent += FRAME
            received += FRAME
            worst = max(worst, received - processed)
        if received < total - 1e-9 and pacer.unconfirmed():
            pacer.asked(pacer.sent)
            pacer.acked(pacer.sent, now)  # the pong: the server read all we sent
        now += tick
        processed = min(received, processed + speed * tick)
        backlog = round((received - processed) * 10) / 10
        pacer.report(backlog, committed=math.floor(processed * 2) / 2)
        # What the pacer calls processed never runs ahead of the server (but for rounding).
        assert pacer.processed(now) <= processed + BACKLOG_ROUNDING + 1e-9
    assert worst <= lead + 1e-9
    assert pacer.processed(now) >= total - 0.5
