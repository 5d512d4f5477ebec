"""Incremental server-sent-events parser: bytes chunks in, complete frames out.

Follows the WHATWG event-stream rules (any of CRLF, LF, CR ends a line; a
blank line ends a frame; ``:`` starts a comment; one space after the colon is
dropped; ``id`` persists across frames). Pure: no I/O, no clock.

Lines are split on bytes before decoding, so a multi-byte character split
across chunks is reassembled before it is decoded. The buffer is bounded: a
frame larger than ``max_frame_bytes`` is dropped (its remaining lines are
skipped without being stored) and reported by :class:`SSEFrameTooLarge`
after the rest of the chunk has been parsed, so one huge frame costs the
caller that frame only, never the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "SSEFrame", "SSEFrameTooLarge", "SSEParser"]

# opencode puts whole tool outputs and diffs in one frame; 16 MiB leaves room
# for those while still bounding what a misbehaving server can make us hold.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SSEFrame:
    """One dispatched event. ``invalid_utf8`` marks lossy decoding (U+FFFD)."""

    data: str
    event: str = "message"
    id: str | None = None
    invalid_utf8: bool = False


class SSEFrameTooLarge(ValueError):
    """A frame exceeded the parser's bound and was dropped.

    ``frames`` holds the well-formed frames parsed from the same chunk, which
    the caller should still process; the parser stays usable.
    """

    def __init__(self, size: int, limit: int, dropped: int, frames: list[SSEFrame]) -> None:
        super().__init__(
            f"server-sent event frame exceeded {limit} bytes (reached {size} bytes); "
            f"dropped {dropped} oversize frame(s)"
        )
        self.size = size
        self.limit = limit
        self.dropped = dropped
        self.frames = frames


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


class SSEParser:
    """Feed it chunks as they arrive; it returns the frames they complete."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self._limit = max_frame_bytes
        self._line = bytearray()  # the current, unterminated line
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: bytes | None = None
        self._last_id: bytes | None = None
        self._retry_ms: int | None = None
        self._after_cr = False  # a chunk ended in CR: a leading LF next is the same EOL
        self._first_line = True
        self._skipping = False  # inside an oversize frame, discarding to its end
        self._skip_line_has_bytes = False
        self._comments = 0
        # Oversize frames seen during the current feed(); reported at its end.
        self._dropped = 0
        self._dropped_size = 0

    @property
    def last_event_id(self) -> str | None:
        return None if self._last_id is None else _decode(self._last_id)[0]

    @property
    def retry_ms(self) -> int | None:
        """The reconnection delay the server asked for, if it sent one."""
        return self._retry_ms

    @property
    def comments(self) -> int:
        """Comment lines seen so far (servers use them as keep-alives)."""
        return self._comments

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the frame in progress (bounded by max_frame_bytes)."""
        return len(self._line) + self._data_size

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        """Parse ``chunk``; return the frames it completed, oldest first.

        Raises :class:`SSEFrameTooLarge` (carrying this chunk's good frames)
        if a frame overflowed the bound; parsing resumes after that frame.
        """
        frames: list[SSEFrame] = []
        if not chunk:  # nothing to read, and a pending CR must still pair with the next LF
            return frames
        pos = 0
        if self._after_cr and chunk[:1] == b"\n":
            pos = 1
        self._after_cr = False
        end = len(chunk)
        while pos < end:
            match = _EOL.search(chunk, pos)
            if match is None:
                self._extend_line(chunk[pos:])
                break
            self._extend_line(chunk[pos : match.start()])
            if match.end() == end and match.group() == b"\r":
                self._after_cr = True
            pos = match.end()
            frame = self._end_line()
            if frame is not None:
                frames.append(frame)
        if self._dropped:
            dropped, size = self._dropped, self._dropped_size
            self._dropped = self._dropped_size = 0
            raise SSEFrameTooLarge(size, self._limit, dropped, frames)
        return frames

    def reset(self) -> None:
        """Forget any partial frame, e.g. before reading a reconnected stream."""
        # last_event_id and retry_ms survive: a reconnect is meant to use them.
        self._line.clear()
        self._data.clear()
        self._data_size = 0
        self._event = None
        self._after_cr = False
        self._first_line = True
        self._skipping = False
        self._skip_line_has_bytes = False

    # -- internals ---------------------------------------------------------

    def _extend_line(self, piece: bytes) -> None:
        if not piece:
            return
        if self._skipping:
            self._skip_line_has_bytes = True
            return
        if len(self._line) + len(piece) + self._data_size > self._limit:
            self._overflow(len(self._line) + len(piece) + self._data_size, mid_line=True)
            return
        self._line += piece

    def _overflow(self, size: int, *, mid_line: bool) -> None:
        self._dropped += 1
        self._dropped_size = max(self._dropped_size, size)
        self._line.clear()
        self._data.clear()
        self._data_size = 0
        self._event = None
        self._skipping = True
        self._skip_line_has_bytes = mid_line

    def _end_line(self) -> SSEFrame | None:
        if self._skipping:
            blank = not self._skip_line_has_bytes
            self._skip_line_has_bytes = False
            if blank:
                self._skipping = False
            return None
        line = bytes(self._line)
        self._line.clear()
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            self._comments += 1
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value
        elif name == b"retry" and value.isdigit():
            self._retry_ms = int(value)
        # Unknown field names are ignored, as the spec requires.
        return None

    def _dispatch(self) -> SSEFrame | None:
        if not self._data:
            # A frame with no data lines (only id/event/comments) is not dispatched.
            self._event = None
            return None
        data, bad_data = _decode(b"\n".join(self._data))
        event, bad_event = _decode(self._event) if self._event else ("message", False)
        frame_id, bad_id = _decode(self._last_id) if self._last_id is not None else (None, False)
        self._data.clear()
        self._data_size = 0
        self._event = None
        return SSEFrame(
            data=data,
            event=event,
            id=frame_id,
            invalid_utf8=bad_data or bad_event or bad_id,
        )
