"""The incremental SSE parser, against the WHATWG rules and real opencode captures."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.clients.sse import SSEFrame, SSEFrameTooLarge, SSEParser
from tests.fixtures import OPENCODE

REFERENCE = OPENCODE


def feed_all(parser: SSEParser, *chunks: bytes) -> list[SSEFrame]:
    frames: list[SSEFrame] = []
    for chunk in chunks:
        frames.extend(parser.feed(chunk))
    return frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def test_single_data_frame() -> None:
    frames = SSEParser().feed(b'data: {"type":"server.connected"}\n\n')
    assert frames == [SSEFrame(data='{"type":"server.connected"}')]


def test_several_frames_in_one_chunk_come_out_in_order() -> None:
    frames = SSEParser().feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\n")
    assert [f.data for f in frames] == ["1", "2", "3"]


def test_multi_line_data_is_joined_with_newlines() -> None:
    frames = SSEParser().feed(b"data: first\ndata: second\ndata:\ndata: fourth\n\n")
    assert [f.data for f in frames] == ["first\nsecond\n\nfourth"]


def test_only_one_leading_space_is_dropped() -> None:
    frames = SSEParser().feed(b"data:no-space\n\ndata:  two\n\n")
    assert [f.data for f in frames] == ["no-space", " two"]


def test_field_without_colon_is_an_empty_value() -> None:
    assert [f.data for f in SSEParser().feed(b"data\n\n")] == [""]


def test_comments_are_skipped_and_counted() -> None:
    parser = SSEParser()
    frames = parser.feed(b": keep-alive\n\n:another\ndata: x\n: inside\n\n")
    assert [f.data for f in frames] == ["x"]
    assert parser.comments == 3


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol: bytes) -> None:
    stream = b"data: a" + eol + b"data: b" + eol + eol + b"data: c" + eol + eol
    assert [f.data for f in SSEParser().feed(stream)] == ["a\nb", "c"]


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # Had the LF been taken as a second line end, "a" would dispatch early.
    frames = feed_all(SSEParser(), b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert [f.data for f in frames] == ["a\nb"]


def test_cr_then_cr_across_chunks_ends_the_frame() -> None:
    frames = feed_all(SSEParser(), b"data: a\r", b"\r")
    assert [f.data for f in frames] == ["a"]


def test_frame_split_at_every_byte() -> None:
    stream = 'data: {"text":"héllo ✓"}\r\n\r\nevent: x\ndata: 2\n\n'.encode()
    parser = SSEParser()
    frames = feed_all(parser, *(stream[i : i + 1] for i in range(len(stream))))
    assert frames == [
        SSEFrame(data='{"text":"héllo ✓"}'),
        SSEFrame(data="2", event="x"),
    ]


def test_event_and_id_fields_and_id_persistence() -> None:
    parser = SSEParser()
    frames = parser.feed(b"event: update\nid: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert frames == [
        SSEFrame(data="a", event="update", id="7"),
        SSEFrame(data="b", event="message", id="7"),
        SSEFrame(data="c", event="message", id=""),
    ]


def test_id_with_nul_is_ignored() -> None:
    parser = SSEParser()
    frames = parser.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert [f.id for f in frames] == ["1", "1"]
    assert parser.last_event_id == "1"


def test_retry_field_sets_reconnect_delay() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 2500\n\nretry: soon\n\n")
    assert parser.retry_ms == 2500


def test_frame_without_data_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: ping\nid: 4\n\n: comment\n\nunknown: x\n\n") == []
    # ...and its event name does not leak into the next frame.
    assert parser.feed(b"data: y\n\n") == [SSEFrame(data="y", id="4")]


def test_unterminated_frame_stays_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: partial\n") == []
    assert parser.buffered_bytes > 0
    assert parser.feed(b"\n") == [SSEFrame(data="partial")]


def test_leading_bom_is_stripped_once() -> None:
    frames = SSEParser().feed(b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n")
    # Only the stream's first BOM is special; later it makes an unknown field.
    assert [f.data for f in frames] == ["a"]


def test_invalid_utf8_is_replaced_and_flagged() -> None:
    frames = SSEParser().feed(b'data: {"t":"bad \xff\xfe byte"}\n\ndata: ok\n\n')
    assert frames[0].invalid_utf8
    assert "\ufffd" in frames[0].data
    assert frames[1] == SSEFrame(data="ok")


def test_multibyte_character_split_across_chunks_is_not_invalid() -> None:
    raw = "data: ✓\n\n".encode()
    cut = raw.index(b"\x9c")  # inside the three bytes of the check mark
    frames = feed_all(SSEParser(), raw[:cut], raw[cut:])
    assert frames == [SSEFrame(data="✓")]


def test_oversize_frame_raises_keeps_good_frames_and_recovers() -> None:
    parser = SSEParser(max_frame_bytes=64)
    big = b"data: " + b"x" * 40 + b"\ndata: " + b"y" * 40 + b"\n\n"
    with pytest.raises(SSEFrameTooLarge) as info:
        parser.feed(b"data: before\n\n" + big + b"data: after\n\n")
    err = info.value
    assert err.limit == 64 and err.dropped == 1 and err.size > 64
    assert "64 bytes" in str(err)
    assert [f.data for f in err.frames] == ["before", "after"]
    assert parser.buffered_bytes == 0
    assert parser.feed(b"data: later\n\n") == [SSEFrame(data="later")]


def test_oversize_unterminated_line_is_bounded_and_skipped_to_frame_end() -> None:
    parser = SSEParser(max_frame_bytes=32)
    with pytest.raises(SSEFrameTooLarge):
        parser.feed(b"data: " + b"z" * 100)
    # The rest of that line and frame is discarded without being buffered.
    assert parser.feed(b"z" * 10_000) == []
    assert parser.buffered_bytes == 0
    assert parser.feed(b"\ndata: more of the big frame\n\ndata: next\n\n") == [SSEFrame(data="next")]


def test_frame_at_exactly_the_limit_is_accepted() -> None:
    payload = b"x" * 20
    # The pending line "data: " + payload is the most the buffer ever holds.
    parser = SSEParser(max_frame_bytes=len(b"data: ") + len(payload))
    assert parser.feed(b"data: " + payload + b"\n\n") == [SSEFrame(data=payload.decode())]


def test_reset_drops_partial_frame_but_keeps_last_event_id() -> None:
    parser = SSEParser()
    parser.feed(b"id: 9\ndata: a\n\ndata: half")
    parser.reset()
    assert parser.feed(b"data: b\n\n") == [SSEFrame(data="b", id="9")]


def test_rejects_nonpositive_limit() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_frame_bytes=0)


def _reference_stream(name: str) -> tuple[bytes, list[dict[str, object]]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference capture {path} not present")
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # opencode writes exactly this framing: one data line and a blank line, no event name.
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return stream, events


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=70_000), max_size=40))
def test_reference_capture_survives_any_chunking(cuts: list[int]) -> None:
    stream, events = _reference_stream("opencode-1.18.33-global-events.ndjson")
    frames = feed_all(SSEParser(), *split_at(stream, cuts))
    assert [json.loads(f.data) for f in frames] == events
    assert not any(f.invalid_utf8 for f in frames)


@settings(max_examples=200, deadline=None)
@given(
    datas=st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
            max_size=30,
        ),
        min_size=1,
        max_size=5,
    ),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_chunking_gives_the_same_frames(datas: list[str], eol: str, cuts: list[int]) -> None:
    stream = "".join(f"data: {d}{eol}: c{eol}{eol}" for d in datas).encode()
    frames = feed_all(SSEParser(), *split_at(stream, cuts))
    assert [f.data for f in frames] == datas
