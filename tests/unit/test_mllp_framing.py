"""MLLP framing: the receiver table of GoogleCloudPlatform/mllp, plus our rules.

One and many frames per read, frames split across reads at every byte boundary,
garbage between frames, oversize frames reported once and never buffered,
unterminated frames never delivered (HL7-INTAKE.md rules 1, 12, 14).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.hl7_mllp.framing import HEAD_BYTES, Frame, MllpDecoder, Oversize, frame

MSG_A = b"MSH|^~\\&|LIS|HOSP|SEPAS|NODE|20250321093000||ORU^R01|A1|P|2.5\rPID|1\r"
MSG_B = b"MSH|^~\\&|LIS|HOSP|SEPAS|NODE|20250321093001||ADT^A01|B2|P|2.5\rPID|2\r"


def feed_all(decoder: MllpDecoder, pieces: list[bytes]) -> list[Frame | Oversize]:
    out: list[Frame | Oversize] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out


def payloads(events: list[Frame | Oversize]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def test_frame_wraps_payload_in_start_and_end_blocks() -> None:
    assert frame(b"abc") == b"\x0babc\x1c\x0d"


def test_one_frame_in_one_read() -> None:
    assert payloads(MllpDecoder(1 << 20).feed(frame(MSG_A))) == [MSG_A]


def test_many_frames_in_one_read_come_out_in_order() -> None:
    data = frame(MSG_A) + frame(MSG_B) + frame(MSG_A)
    assert payloads(MllpDecoder(1 << 20).feed(data)) == [MSG_A, MSG_B, MSG_A]


def test_frames_split_at_every_byte_boundary() -> None:
    data = frame(MSG_A) + frame(MSG_B)
    for cut in range(len(data) + 1):
        decoder = MllpDecoder(1 << 20)
        assert payloads(feed_all(decoder, [data[:cut], data[cut:]])) == [MSG_A, MSG_B], cut
        assert not decoder.in_frame


def test_one_byte_at_a_time() -> None:
    data = frame(MSG_A) + frame(MSG_B)
    decoder = MllpDecoder(1 << 20)
    assert payloads(feed_all(decoder, [data[i : i + 1] for i in range(len(data))])) == [
        MSG_A,
        MSG_B,
    ]


def test_garbage_outside_frames_is_discarded_and_counted() -> None:
    decoder = MllpDecoder(1 << 20)
    data = b"hello" + frame(MSG_A) + b"\x1c\x0d\x00junk" + frame(MSG_B) + b"tail"
    assert payloads(decoder.feed(data)) == [MSG_A, MSG_B]
    assert decoder.discarded == len(b"hello") + len(b"\x1c\x0d\x00junk") + len(b"tail")


def test_unterminated_frame_is_never_delivered() -> None:
    decoder = MllpDecoder(1 << 20)
    assert decoder.feed(b"\x0b" + MSG_A) == []
    assert decoder.feed(b"\x1c") == []  # FS alone is not the end block yet
    assert decoder.in_frame


def test_second_frame_cut_off_leaves_the_first_delivered() -> None:
    decoder = MllpDecoder(1 << 20)
    events = decoder.feed(frame(MSG_A) + b"\x0b" + MSG_B[:10])
    assert payloads(events) == [MSG_A]
    assert decoder.in_frame


def test_start_block_inside_a_frame_starts_over() -> None:
    decoder = MllpDecoder(1 << 20)
    events = decoder.feed(b"\x0b" + MSG_A[:20] + frame(MSG_B))
    assert payloads(events) == [MSG_B]
    assert decoder.discarded == 20


def test_fs_not_followed_by_cr_is_payload() -> None:
    decoder = MllpDecoder(1 << 20)
    assert payloads(decoder.feed(b"\x0bab\x1cxy\x1c\x0d")) == [b"ab\x1cxy"]
    # ...also when the FS ends one read and the next byte is not CR.
    decoder = MllpDecoder(1 << 20)
    assert payloads(feed_all(decoder, [b"\x0bab\x1c", b"xy\x1c", b"\x0d"])) == [b"ab\x1cxy"]


def test_empty_frame_is_delivered_empty() -> None:
    assert payloads(MllpDecoder(10).feed(b"\x0b\x1c\x0d")) == [b""]


def test_frame_of_exactly_the_limit_is_delivered_and_one_more_byte_is_oversize() -> None:
    limit = 1000
    assert payloads(MllpDecoder(limit).feed(frame(b"x" * limit))) == [b"x" * limit]
    events = MllpDecoder(limit).feed(frame(b"x" * (limit + 1)))
    assert events == [Oversize(head=b"x" * (limit + 1), size=limit + 1)]


def test_oversize_is_reported_once_with_its_head_and_size_without_buffering() -> None:
    limit = 1024
    decoder = MllpDecoder(limit)
    big = MSG_A + b"x" * (1 << 20)
    events: list[Frame | Oversize] = list(decoder.feed(b"\x0b"))
    for i in range(0, len(big), 4096):
        events += decoder.feed(big[i : i + 4096])
        assert decoder.buffered <= max(limit, HEAD_BYTES)
    events += decoder.feed(b"\x1c\x0d")
    assert len(events) == 1
    over = events[0]
    assert isinstance(over, Oversize)
    assert over.size == len(big)
    assert over.head == big[:HEAD_BYTES]
    assert over.head.startswith(MSG_A)


def test_after_an_oversize_frame_the_next_frame_is_delivered() -> None:
    decoder = MllpDecoder(100)
    events = decoder.feed(frame(b"y" * 500) + frame(MSG_A[:90]))
    assert isinstance(events[0], Oversize)
    assert payloads(events) == [MSG_A[:90]]


def test_oversize_frame_never_ended_reports_nothing() -> None:
    decoder = MllpDecoder(100)
    assert decoder.feed(b"\x0b" + b"z" * 1000) == []
    assert decoder.in_frame


def test_max_frame_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        MllpDecoder(0)


_payload = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
_garbage = st.binary(max_size=20).map(lambda b: b.replace(b"\x0b", b""))


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.tuples(_garbage, _payload), min_size=0, max_size=6),
    tail=_garbage,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_split_of_any_stream_gives_the_same_frames(
    messages: list[tuple[bytes, bytes]], tail: bytes, cuts: list[int]
) -> None:
    data = b"".join(g + frame(p) for g, p in messages) + tail
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    decoder = MllpDecoder(1 << 20)
    assert payloads(feed_all(decoder, pieces)) == [p for _, p in messages]
    assert decoder.discarded == sum(len(g) for g, _ in messages) + len(tail)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=5),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_oversize_and_normal_frames_interleaved(sizes: list[int], chunk: int) -> None:
    limit = 200
    data = b"".join(frame(bytes([65 + i % 26]) * n) for i, n in enumerate(sizes))
    decoder = MllpDecoder(limit)
    events = feed_all(decoder, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert len(events) == len(sizes)
    for i, (event, n) in enumerate(zip(events, sizes, strict=True)):
        if n <= limit:
            assert event == Frame(bytes([65 + i % 26]) * n)
        else:
            assert isinstance(event, Oversize)
            assert event.size == n
        assert decoder.buffered <= max(limit, HEAD_BYTES)
