"""MLLP framing (HL7 v2.5.1 appendix C, release 1/2 block format): bytes only.

A frame is ``<VT> payload <FS><CR>`` (0x0B ... 0x1C 0x0D). `MllpDecoder` turns the
bytes of one connection, in whatever pieces TCP delivers them, into events:

- `Frame`: one complete payload, exactly as sent between the start and end blocks;
- `Oversize`: a frame whose payload grew past the limit. It is reported once, when the
  frame's end block arrives, with its total size and only its first `HEAD_BYTES` (enough
  for the MSH, so the AR can name the message); the rest is counted and dropped as it
  arrives, never held in memory (HL7-INTAKE.md rule 12).

Never: deliver an unterminated frame (a payload without its end block is not a
message: rule 1); hold more than ``max_frame_bytes`` (+ `HEAD_BYTES`) of one frame;
interpret the payload (that is `adapters.hl7.intake`'s job); log anything.

Invariants:
- Bytes outside a frame (before a start block, between frames) are discarded and
  counted in `MllpDecoder.discarded`.
- A start block inside a frame means the sender gave up on that frame and began
  again: the partial frame is discarded (and counted), never delivered.
- An FS not followed by CR is payload (the intake refuses it as a control byte).
- Feeding the same bytes split at any boundaries yields the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

START_BLOCK: Final = b"\x0b"  # VT
END_BLOCK: Final = b"\x1c"  # FS
CARRIAGE_RETURN: Final = b"\x0d"  # CR, ends the end block
_SB: Final = 0x0B
_FS: Final = 0x1C
_CR: Final = 0x0D

#: How much of an oversize frame is kept: enough for any real MSH segment.
HEAD_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete MLLP payload, byte for byte as sent."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame over the limit: its total payload size and its first bytes only."""

    head: bytes
    size: int


Event = Frame | Oversize


def frame(payload: bytes) -> bytes:
    """Wrap one payload in MLLP start and end blocks."""
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


class MllpDecoder:
    """Incremental MLLP decoder for one connection. Not thread-safe (one per connection)."""

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        #: Bytes seen outside any frame, plus those of frames abandoned unfinished.
        self.discarded = 0
        self._inside = False
        self._buf = bytearray()
        self._size = 0  # payload bytes of the current frame, kept or not
        self._fs_pending = False  # the last byte of the previous feed was an FS

    @property
    def buffered(self) -> int:
        """Payload bytes held right now (at most max(max_frame_bytes, HEAD_BYTES))."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started and not ended (a disconnect now loses it)."""
        return self._inside

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes received; return the events they complete, in order."""
        events: list[Event] = []
        i, n = 0, len(data)
        while i < n:
            if not self._inside:
                j = data.find(START_BLOCK, i)
                if j < 0:
                    self.discarded += n - i
                    break
                self.discarded += j - i
                self._begin()
                i = j + 1
                continue
            if self._fs_pending:
                self._fs_pending = False
                if data[i] == _CR:
                    events.append(self._end())
                    i += 1
                    continue
                self._append(END_BLOCK)  # an FS that did not end the frame is payload
            k_fs = data.find(END_BLOCK, i)
            k_sb = data.find(START_BLOCK, i)
            if k_sb >= 0 and (k_fs < 0 or k_sb < k_fs):
                # The sender started over: what came before is never delivered.
                self._append(data[i:k_sb])
                self.discarded += self._size
                self._begin()
                i = k_sb + 1
                continue
            if k_fs < 0:
                self._append(data[i:])
                break
            self._append(data[i:k_fs])
            if k_fs + 1 == n:
                self._fs_pending = True
                break
            if data[k_fs + 1] == _CR:
                events.append(self._end())
                i = k_fs + 2
            else:
                self._append(END_BLOCK)
                i = k_fs + 1
        return events

    def _begin(self) -> None:
        self._inside = True
        self._buf.clear()
        self._size = 0
        self._fs_pending = False

    def _append(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += len(chunk)
        if self._size <= self.max_frame_bytes:
            self._buf += chunk
        elif len(self._buf) < HEAD_BYTES:
            # Past the limit: keep only the head (for the AR's MSA-2), drop the rest.
            room = HEAD_BYTES - len(self._buf)
            self._buf += chunk[:room]
        if self._size > self.max_frame_bytes and len(self._buf) > HEAD_BYTES:
            del self._buf[HEAD_BYTES:]

    def _end(self) -> Event:
        self._inside = False
        data = bytes(self._buf)
        self._buf.clear()
        if self._size > self.max_frame_bytes:
            return Oversize(head=data[:HEAD_BYTES], size=self._size)
        return Frame(data)
