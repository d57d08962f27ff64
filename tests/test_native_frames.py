"""NativeTranslator's incremental snapshot encoding gives exactly the bytes of a full encoding."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.native import NativeTranslator
from gateway.events import Done, Progress, Segment, Transcript

_encoder = msgspec.json.Encoder()

texts = st.sampled_from(["", " ", "hello", " world ", "ça va", 'quote " and \\ slash', "\u2028"])
segments = st.builds(
    Segment,
    start=st.floats(0, 1e4, allow_nan=False),
    end=st.floats(0, 1e4, allow_nan=False),
    text=texts,
    speaker=st.none() | st.integers(0, 3),
)


def full_frame(t: Transcript) -> bytes:
    """The frame as the translator used to build it: every segment encoded each time."""
    payload = {
        "id": t.id,
        "segments": t.segments,
        "text": t.text,
        "current_time": t.current_time,
        "total_time": t.total_time,
        "committed": t.committed,
    }
    return b"event: transcription\r\ndata: " + _encoder.encode(payload) + b"\r\n\r\n"


@st.composite
def snapshot_runs(draw: st.DrawFn) -> list[Transcript]:
    """Cumulative snapshots: committed segments are usually appended, sometimes revised (which
    the translator must notice), with a changing tentative tail."""
    committed: list[Segment] = []
    out = []
    for step in range(draw(st.integers(1, 12))):
        action = draw(st.sampled_from(["append", "append", "same", "revise", "reset"]))
        if action == "append":
            committed += draw(st.lists(segments, max_size=4))
        elif action == "revise" and committed:
            committed[draw(st.integers(0, len(committed) - 1))] = draw(segments)
        elif action == "reset":
            committed = draw(st.lists(segments, max_size=3))
        tentative = draw(st.lists(segments, max_size=2))
        out.append(
            Transcript(
                id=draw(st.sampled_from(["a", "b"])),
                segments=(*committed, *tentative),
                committed=len(committed),
                current_time=float(step),
                total_time=draw(st.none() | st.just(12.5)),
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(snapshot_runs())
def test_incremental_frames_equal_full_encoding(run: list[Transcript]) -> None:
    translator = NativeTranslator()
    for t in run:
        frame = translator.encode(Progress(t))
        assert frame == full_frame(t)
        assert frame is not None
        data = json.loads(frame.split(b"data: ", 1)[1])
        assert data["text"] == t.text


def test_engine_sharing_segment_objects_and_final_done() -> None:
    """The common case: one engine's growing list of the same Segment objects, then done."""
    translator = NativeTranslator()
    committed: list[Segment] = []
    for i in range(50):
        committed.append(Segment(i * 0.5, i * 0.5 + 0.5, f"word{i}"))
        t = Transcript(
            id="x",
            segments=(*committed, Segment(i * 0.5 + 0.5, i * 0.5 + 0.7, "tent")),
            committed=len(committed),
            current_time=i * 0.5 + 0.7,
            total_time=None,
        )
        assert translator.encode(Progress(t)) == full_frame(t)
    final = Transcript(
        id="x", segments=tuple(committed), committed=50, current_time=25.0, total_time=None
    )
    done = translator.encode(Done(final, cached=False))
    assert done is not None and done.startswith(b"event: done\r\ndata: ")
    assert json.loads(done.split(b"data: ", 1)[1])["text"] == final.text
