"""Reading an upload from its file a line at a time: never the whole file in memory, never one line without bound.

The API hands the parsers the spooled upload (a file, on disk past 1 MiB); these helpers read it in place. A line
(a JSON Lines record, a CSV row with its quoted line breaks) may be at most ``MAX_ROW_BYTES``: one over it is
rejected as soon as that many bytes are read, so a file without line breaks costs no more memory than a long line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import IO

from service.datasets.base import DatasetError, Limits

MAX_ROW_BYTES = 8 * 1024 * 1024
CHUNK = 1024 * 1024
CHECK_EVERY = 1024  # lines between checks of the cancel flag (and a pause that lets the API's event loop run)
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # a line break of its own (old Mac files), as newline="" reads it
_WHITESPACE = b" \t\n\r\x0b\x0c"


def size_words(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size % (1024 * 1024) == 0 else f"{size} bytes"


def head(stream: IO[bytes], size: int = 4096) -> bytes:
    """The first ``size`` bytes; the stream is left at its start."""
    stream.seek(0)
    data = stream.read(size)
    stream.seek(0)
    return data


def is_blank(stream: IO[bytes]) -> bool:
    """True when the file holds nothing but ASCII whitespace (read in chunks; the stream is left at its start)."""
    stream.seek(0)
    try:
        while chunk := stream.read(CHUNK):
            if chunk.strip(_WHITESPACE):
                return False
        return True
    finally:
        stream.seek(0)


class Lines:
    """The lines of an upload, read one at a time from its start.

    ``number`` is the line being read (1-based), ``offset`` the file offset of its first byte. ``record_bytes``
    counts the bytes of the record in progress: a CSV row may span lines, and its reader resets it after each row.
    """

    def __init__(self, stream: IO[bytes], limits: Limits, max_bytes: int = MAX_ROW_BYTES) -> None:
        stream.seek(0)
        self.stream, self.limits, self.max_bytes = stream, limits, max_bytes
        self.number = 0
        self.offset = 0
        self.record_bytes = 0
        self._end = 0

    def raw(self) -> Iterator[bytes | None]:
        """Each line as bytes (with its ``\\n``); ``None`` for a line over ``max_bytes``, which is skipped unread."""
        while True:
            line = self._read(self.max_bytes)
            if not line:
                return
            if len(line) > self.max_bytes:
                self._skip_rest(line)
                yield None
                continue
            yield line

    def text(self) -> Iterator[str]:
        """Lines decoded as UTF-8 (a BOM at the start dropped) for a record reader such as ``csv.reader``.

        A record over ``max_bytes`` (``record_bytes``) or bytes that are not UTF-8 end the file with a 4xx that
        names the line.
        """
        while True:
            room = self.max_bytes - self.record_bytes
            line = self._read(room)
            if not line:
                return
            self.record_bytes += len(line)
            if len(line) > room:
                raise DatasetError(
                    f"line {self.number}: a row longer than {size_words(self.max_bytes)}", {"line": self.number}
                )
            try:
                text = line.decode("utf-8-sig" if self.number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                at = self.offset + exc.start
                raise DatasetError(
                    f"the file is not UTF-8 (line {self.number}, byte {at})", {"line": self.number, "byte": at}
                ) from exc
            if "\r" in text[:-2]:
                yield from (part for part in _LONE_CR.split(text) if part)
            else:
                yield text

    def _read(self, room: int) -> bytes:
        """The next line, at most ``room + 1`` bytes of it (one more than allowed says it is too long)."""
        line = self.stream.readline(room + 1)
        if line:
            self.offset = self._end
            self._end += len(line)
            self.number += 1
            if self.number % CHECK_EVERY == 0:
                self.limits.check()
                time.sleep(0)  # let the event loop's thread take the GIL between chunks of work
        return line

    def _skip_rest(self, line: bytes) -> None:
        while not line.endswith(b"\n"):
            line = self.stream.readline(CHUNK)
            if not line:
                return
            self._end += len(line)
