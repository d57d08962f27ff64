"""Subtitle and text exports as players read them: cues sorted by start, never zero-length, no
blank line inside a cue, WebVTT markup escaped, and any stored time rendered without failing."""

from __future__ import annotations

import pytest

from gateway.events import MAX_SECONDS, Segment
from gateway.exports import ZERO_CUE_MS, srt, timestamp, txt, vtt


def cue_times(subtitles: str) -> list[str]:
    return [line for line in subtitles.splitlines() if " --> " in line]


def test_cues_are_sorted_by_start_then_end_and_numbered_in_that_order() -> None:
    segments = [Segment(2.0, 3.0, "c"), Segment(0.0, 2.0, "b"), Segment(0.0, 1.0, "a")]
    assert srt(segments) == (
        "1\n00:00:00,000 --> 00:00:01,000\na\n\n"
        "2\n00:00:00,000 --> 00:00:02,000\nb\n\n"
        "3\n00:00:02,000 --> 00:00:03,000\nc\n\n"
    )
    # Plain text keeps the stored order: it is the transcript, not a timeline.
    assert txt(segments) == "c b a\n"


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        # Alone: ZERO_CUE_MS long.
        ([Segment(1.0, 1.0, "a")], ["00:00:01,000 --> 00:00:01,500"]),
        # Cut short by the next cue's start.
        (
            [Segment(1.0, 1.0, "a"), Segment(1.2, 2.0, "b")],
            ["00:00:01,000 --> 00:00:01,200", "00:00:01,200 --> 00:00:02,000"],
        ),
        # Equal to the millisecond after rounding is zero-length too; one at the same start as
        # another does not cut it to nothing.
        (
            [Segment(1.0001, 1.0004, "a"), Segment(1.0, 1.0, "b"), Segment(3.0, 4.0, "c")],
            [
                "00:00:01,000 --> 00:00:01,500",
                "00:00:01,000 --> 00:00:01,500",
                "00:00:03,000 --> 00:00:04,000",
            ],
        ),
        # An engine's segment that ends before it starts is treated the same way.
        ([Segment(2.0, 1.0, "a")], ["00:00:02,000 --> 00:00:02,500"]),
    ],
)
def test_zero_length_cues_get_a_minimal_duration(
    segments: list[Segment], expected: list[str]
) -> None:
    assert ZERO_CUE_MS == 500
    assert cue_times(srt(segments)) == expected
    assert cue_times(vtt(segments)) == [t.replace(",", ".") for t in expected]


def test_blank_lines_inside_a_cue_are_folded_and_blank_cues_left_out() -> None:
    segments = [
        Segment(0.0, 1.0, "  one\n\n\r\n   \ntwo  \r\nthree\u2028\u2028four  "),
        Segment(1.0, 2.0, " \n\n "),
    ]
    assert srt(segments) == "1\n00:00:00,000 --> 00:00:01,000\none\ntwo\nthree\nfour\n\n"
    assert "\n\n" not in vtt(segments).removeprefix("WEBVTT\n\n").removesuffix("\n\n")


def test_vtt_cue_text_is_escaped_markup() -> None:
    text = vtt([Segment(0.0, 1.0, "a <b> & c --> d")])
    assert text.endswith("\na &lt;b&gt; &amp; c --&gt; d\n\n")
    assert srt([Segment(0.0, 1.0, "a <b> & c")]).endswith("\na <b> & c\n\n")


def test_any_stored_time_renders() -> None:
    # Rows written before the store bounded times may hold anything: clamped, never an error.
    bound = timestamp(MAX_SECONDS)
    assert bound == "277777:46:40,000"
    assert [timestamp(t) for t in (1e15, 1e306, float("inf"))] == [bound] * 3
    assert [timestamp(t) for t in (-1.0, float("nan"))] == ["00:00:00,000"] * 2
    assert cue_times(vtt([Segment(1e306, 1e306, "x")])) == ["277777:46:40.000 --> 277777:46:40.500"]
