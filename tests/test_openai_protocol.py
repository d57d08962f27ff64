"""The OpenAI Realtime (GA) translation layer, fed frames directly: no sockets, no clock."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import OpenAIRealtimeConfig
from gateway.engines._openai_protocol import (
    Committed,
    ErrorEvent,
    TranscriptAssembler,
    apply_event,
    build_session_update,
    decode_server_event,
    encode_append,
    encode_client_event,
    encode_commit,
)
from gateway.events import Segment


def feed(assembler: TranscriptAssembler, *frames: dict[str, object]) -> None:
    for frame in frames:
        event = decode_server_event(json.dumps(frame))
        if event is not None:
            apply_event(assembler, event)


def committed(item: str, previous: str | None) -> dict[str, object]:
    return {"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": previous}


def delta(item: str, text: str) -> dict[str, object]:
    return {
        "type": "conversation.item.input_audio_transcription.delta",
        "item_id": item,
        "content_index": 0,
        "delta": text,
    }


def completed(item: str, text: str) -> dict[str, object]:
    return {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": item,
        "content_index": 0,
        "transcript": text,
        "usage": {"type": "duration", "seconds": 2},
    }


def texts(segments: tuple[Segment, ...]) -> list[str]:
    return [s.text for s in segments]


# -- client events -----------------------------------------------------------------------------


def test_session_update_is_the_ga_transcription_shape() -> None:
    config = OpenAIRealtimeConfig(
        model="gpt-4o-transcribe",
        language="en",
        prompt="finance",
        noise_reduction="near_field",
        vad_threshold=0.4,
    )
    frame = json.loads(encode_client_event(build_session_update(config)))
    assert frame == {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {
                        "model": "gpt-4o-transcribe",
                        "language": "en",
                        "prompt": "finance",
                    },
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.4,
                        "prefix_padding_ms": 300,
                        "silence_duration_ms": 500,
                    },
                    "noise_reduction": {"type": "near_field"},
                }
            },
        },
    }


def test_session_update_without_vad_sends_explicit_nulls_and_language_override() -> None:
    config = OpenAIRealtimeConfig(turn_detection="none", noise_reduction="none", language="en")
    frame = json.loads(encode_client_event(build_session_update(config, language="de")))
    audio_input = frame["session"]["audio"]["input"]
    assert audio_input["turn_detection"] is None
    assert audio_input["noise_reduction"] is None
    assert audio_input["transcription"] == {"model": config.model, "language": "de"}


def test_append_carries_raw_pcm_as_base64_and_commit_is_bare() -> None:
    pcm = bytes(range(256)) * 3
    frame = json.loads(encode_append(pcm))
    assert frame["type"] == "input_audio_buffer.append"
    assert base64.b64decode(frame["audio"]) == pcm
    assert json.loads(encode_commit()) == {"type": "input_audio_buffer.commit"}


def test_commit_may_carry_an_event_id_for_the_error_it_causes_to_name() -> None:
    assert json.loads(encode_commit("commit_0_1")) == {
        "type": "input_audio_buffer.commit",
        "event_id": "commit_0_1",
    }


# -- server events -----------------------------------------------------------------------------


def test_known_server_events_decode_into_structs() -> None:
    event = decode_server_event(
        '{"type":"input_audio_buffer.committed","event_id":"event_BzIyYo5dVYD4EymLRxOeK",'
        '"previous_item_id":null,"item_id":"item_BzIyOo8QFAyacGMS5qVRU"}'
    )
    assert event == Committed(
        item_id="item_BzIyOo8QFAyacGMS5qVRU",
        previous_item_id=None,
        event_id="event_BzIyYo5dVYD4EymLRxOeK",
    )
    error = decode_server_event(
        '{"type":"error","event_id":"event_5","error":{"type":"invalid_request_error",'
        '"code":"input_audio_buffer_commit_empty","message":"buffer too small","param":null,'
        '"event_id":null}}'
    )
    assert isinstance(error, ErrorEvent)
    assert error.error.code == "input_audio_buffer_commit_empty"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"conversation.item.added","item":{"id":"x"}}',
        '{"type":"input_audio_buffer.timeout_triggered","event_id":"e"}',
        '{"type":"some.future.event"}',
    ],
)
def test_unknown_event_types_decode_to_none(frame: str) -> None:
    assert decode_server_event(frame) is None


def test_malformed_frames_raise_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_server_event("not json")
    with pytest.raises(msgspec.ValidationError):
        decode_server_event('{"type":"input_audio_buffer.committed"}')  # no item_id


# -- assembly (scenario 10) --------------------------------------------------------------------


def test_partial_text_is_kept_per_item_and_completed_replaces_it() -> None:
    asm = TranscriptAssembler()
    feed(
        asm,
        committed("a", None),
        committed("b", "a"),
        delta("a", "hel"),
        delta("b", "wor"),
        delta("a", "lo"),
    )
    update = asm.snapshot(processed=2.0)
    assert update.committed == ()
    assert texts(update.tentative) == ["hello", "wor"]
    feed(asm, completed("a", "Hello."))
    update = asm.snapshot(processed=2.0)
    assert texts(update.committed) == ["Hello."]
    assert texts(update.tentative) == ["wor"]
    feed(asm, delta("a", " ignored after completion"), completed("b", "World."))
    assert texts(asm.snapshot(processed=2.0).committed) == ["Hello.", "World."]


def test_items_completing_out_of_order_are_emitted_in_previous_item_id_order() -> None:
    asm = TranscriptAssembler()
    feed(asm, committed("a", None), committed("b", "a"), committed("c", "b"))
    feed(asm, completed("c", "three"))
    update = asm.snapshot(processed=3.0)
    assert update.committed == ()
    assert texts(update.tentative) == ["three"]
    feed(asm, completed("b", "two"))
    assert asm.snapshot(processed=3.0).committed == ()
    feed(asm, completed("a", "one"))
    assert texts(asm.snapshot(processed=3.0).committed) == ["one", "two", "three"]


def test_committed_event_places_item_after_its_previous_item() -> None:
    asm = TranscriptAssembler()
    # speech_started makes "b" known before "a" is committed; committed order wins.
    feed(
        asm,
        {"type": "input_audio_buffer.speech_started", "item_id": "b", "audio_start_ms": 1500},
        committed("a", None),
        committed("b", "a"),
        completed("b", "second"),
        completed("a", "first"),
    )
    assert texts(asm.snapshot(processed=2.0).committed) == ["first", "second"]


def test_unknown_events_are_ignored_by_the_assembly() -> None:
    asm = TranscriptAssembler()
    feed(
        asm,
        committed("a", None),
        {"type": "conversation.item.added", "item": {"id": "a"}},
        {"type": "totally.new", "item_id": "a", "transcript": "nope"},
        completed("a", "yes"),
    )
    assert texts(asm.snapshot(processed=1.0).committed) == ["yes"]


def test_failed_item_resolves_to_an_empty_final() -> None:
    asm = TranscriptAssembler()
    feed(
        asm,
        committed("a", None),
        committed("b", "a"),
        delta("a", "garbled"),
        {
            "type": "conversation.item.input_audio_transcription.failed",
            "item_id": "a",
            "content_index": 0,
            "error": {"type": "transcription_error", "code": "x", "message": "m", "param": None},
        },
        completed("b", "fine"),
    )
    update = asm.snapshot(processed=1.0)
    assert texts(update.committed) == ["fine"]
    assert asm.pending == 0


def test_segment_times_come_from_speech_events_and_never_go_backwards() -> None:
    asm = TranscriptAssembler()
    feed(
        asm,
        {"type": "input_audio_buffer.speech_started", "item_id": "a", "audio_start_ms": 1180},
        {"type": "input_audio_buffer.speech_stopped", "item_id": "a", "audio_end_ms": 3420},
        committed("a", None),
        # A bogus start before the previous end is clamped.
        {"type": "input_audio_buffer.speech_started", "item_id": "b", "audio_start_ms": 3000},
        {"type": "input_audio_buffer.speech_stopped", "item_id": "b", "audio_end_ms": 5000},
        committed("b", "a"),
        completed("a", "one"),
        completed("b", "two"),
    )
    assert asm.snapshot(processed=6.0).committed == (
        Segment(1.18, 3.42, "one"),
        Segment(3.42, 5.0, "two"),
    )


def test_discard_unstable_keeps_only_the_completed_prefix() -> None:
    asm = TranscriptAssembler()
    feed(
        asm,
        committed("a", None),
        committed("b", "a"),
        committed("c", "b"),
        completed("a", "one"),
        completed("c", "three"),
    )
    # c completed out of order: pending behind b, but only b is incomplete.
    assert (asm.pending, asm.incomplete) == (2, 1)
    assert asm.discard_unstable() == ["b", "c"]
    assert asm.last_stable_id == "a"
    # A new upstream session starts a new chain.
    feed(asm, committed("x", None), completed("x", "two again"))
    assert texts(asm.snapshot(processed=1.0, final=True).committed) == ["one", "two again"]


@given(st.permutations(range(6)), st.lists(st.integers(0, 5), max_size=12))
def test_committed_only_grows_and_ends_in_commit_order(
    completion_order: list[int], delta_items: list[int]
) -> None:
    asm = TranscriptAssembler()
    items = [f"i{n}" for n in range(6)]
    previous: str | None = None
    for item in items:
        feed(asm, committed(item, previous))
        previous = item
    for n in delta_items:
        feed(asm, delta(items[n], "x"))
    seen: tuple[Segment, ...] = ()
    for n in completion_order:
        feed(asm, completed(items[n], f"t{n}"))
        now = asm.snapshot(processed=1.0).committed
        assert now[: len(seen)] == seen
        seen = now
    assert texts(seen) == [f"t{n}" for n in range(6)]
