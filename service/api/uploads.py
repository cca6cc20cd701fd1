"""Storing a dataset upload off the event loop: what ``POST /datasets`` and ``POST /v1/files`` share.

By the time a route runs, Starlette has spooled the multipart file (in memory up to 1 MiB, on disk past it). The
route hands that file, unread, to ``service.datasets.store.save_upload`` in a worker thread, which hashes and parses
it as a stream: the event loop never holds or copies the upload and keeps answering other requests (``/healthz``)
meanwhile. If the client goes away, the parse is told to stop (the thread cannot be killed; it checks a flag).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import anyio
from fastapi import Request, UploadFile
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from service.core.config import Settings
from service.core.errors import RequestError
from service.datasets.store import save_upload
from service.jobs.models import Dataset

DISCONNECT_POLL_SECONDS = 0.5


def upload_size(file: UploadFile) -> int:
    """The spooled file's size (Starlette counts it as it spools; the end of the file otherwise)."""
    if file.size is not None:
        return file.size
    size = file.file.seek(0, os.SEEK_END)
    file.file.seek(0)
    return size


async def store_upload(
    request: Request,
    file: UploadFile,
    session: Session,
    settings: Settings,
    format: str | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Dataset, int]:
    """The dataset of an upload (a 413 over ``max_upload_bytes``, a 422 when unusable) and the upload's size."""
    size = upload_size(file)
    if size > settings.max_upload_bytes:
        raise RequestError(413, "too_large", f"the file is over the upload limit of {settings.max_upload_bytes} bytes")
    cancel = threading.Event()
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, cancel))
    try:
        dataset = await run_in_threadpool(
            save_upload, settings, session, file.file, file.filename, format, options, cancel
        )
    finally:
        watcher.cancel()
    return dataset, size


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    while not await request.is_disconnected():
        await anyio.sleep(DISCONNECT_POLL_SECONDS)
    cancel.set()
