"""The OpenAI Files API (/v1/files): the training data of finetuning jobs.

An upload streams from the socket through a multipart parser straight into the store's
temp file, so the server never holds a file in memory and a too-large upload is cut off
as soon as it crosses `max_upload_bytes`. Disk writes run in worker threads, so the
event loop keeps streaming tokens to other clients meanwhile. Contents are stored as
uploaded; a finetuning job validates them when it starts.

A file belongs to the owner of the API key that uploaded it; other owners get a 404,
as for a file that does not exist (admins see every owner's files).

Beside OpenAI's multipart upload, a file's text may come as a JSON body, for paths that
forward JSON only (vllm-router, README "Replicas behind a router"); that body is parsed
in memory, so it is bounded by `max_request_body_bytes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Annotated, BinaryIO, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from server import errors
from server.auth import principal_of
from server.context import get_context
from server.limits import body_too_large
from server.store import FileNotFound, FileRecord
from server.settings import Settings
from server.store.files import FileStore, StorageQuotaExceeded, Upload

router = APIRouter()

# Room in a request body for everything but the file's bytes: boundaries, part headers, `purpose`.
MAX_FORM_OVERHEAD_BYTES = 64 * 1024
PURPOSES = ("fine-tune",)
# `purpose` is the one text field kept in memory; a real value is a few bytes.
MAX_PURPOSE_BYTES = 64
MAX_LIST_LIMIT = 10_000
CONTENT_CHUNK_BYTES = 1024 * 1024


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    # Deprecated by OpenAI but still in its schema; a stored file is always ready.
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: None = None

    @classmethod
    def of(cls, record: FileRecord) -> FileObject:
        return cls(
            id=record.id,
            bytes=record.bytes,
            created_at=record.created_at,
            filename=record.filename,
            purpose=record.purpose,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ListFilesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    purpose: str | None = None
    limit: int = Field(MAX_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None


class FileAsJSON(BaseModel):
    """`POST /v1/files` as `application/json`: the file's text, its name and purpose."""

    model_config = ConfigDict(extra="forbid")

    purpose: str
    filename: str = Field(min_length=1, max_length=255)
    content: str


def list_files_query(request: Request) -> ListFilesQuery:
    """Validated here rather than by FastAPI so that errors name the parameter (`limit`), not `query.limit`."""
    try:
        return ListFilesQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _scope(request: Request) -> str | None:
    """The owner whose files the caller may see (None = all, for admins)."""
    return principal_of(request).owner_scope


def file_not_found(exc: FileNotFound, param: str = "file_id") -> errors.APIError:
    return errors.APIError(404, str(exc), param=param, code="file_not_found")


def upload_too_large(limit: int) -> errors.APIError:
    return errors.APIError(
        413, f"File uploads are limited to max_upload_bytes={limit} bytes.", param="file", code="file_too_large"
    )


def quota_exceeded(exc: StorageQuotaExceeded) -> errors.APIError:
    return errors.APIError(
        413,
        f"This upload would take the owner's files past max_stored_bytes_per_owner={exc.quota} bytes "
        f"({exc.used} stored); delete files first.",
        param="file",
        code="storage_quota_exceeded",
    )


def invalid_purpose(value: str) -> errors.APIError:
    return errors.bad_request(f"Invalid purpose {value!r}; this server accepts {', '.join(PURPOSES)}.", "purpose")


class UploadForm:
    """A multipart/form-data body parsed as it arrives: the `file` part goes to `upload`,
    `purpose` is kept, any other field is a 400 naming it.

    python-multipart reports parts through synchronous callbacks; they only collect the
    file's bytes, and `feed` writes them in a worker thread.
    """

    def __init__(self, content_type: str, upload: Upload, max_bytes: int):
        kind, options = parse_options_header(content_type)
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise errors.bad_request("Uploads must be sent as multipart/form-data with `file` and `purpose`.")
        self._upload = upload
        self._max_bytes = max_bytes
        self._parser = MultipartParser(
            options[b"boundary"],
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        self.filename: str | None = None
        self.purpose: str | None = None
        self._body_bytes = 0
        self._complete = False
        self._part: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._purpose_bytes = bytearray()
        self._file_data: list[bytes] = []

    async def feed(self, chunk: bytes) -> None:
        self._body_bytes += len(chunk)
        if self._body_bytes > self._max_bytes + MAX_FORM_OVERHEAD_BYTES:
            raise upload_too_large(self._max_bytes)
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise errors.bad_request(f"Malformed multipart body: {exc}") from None
        if self._file_data:
            data, self._file_data = b"".join(self._file_data), []
            if self._upload.size + len(data) > self._max_bytes:
                raise upload_too_large(self._max_bytes)
            await asyncio.to_thread(self._upload.write, data)

    def finish(self) -> tuple[str, str]:
        """(filename, purpose) once the whole body is in."""
        if not self._complete:
            raise errors.bad_request("Malformed multipart body: it ends before the closing boundary.")
        if self.filename is None:
            raise errors.bad_request("Missing the `file` field.", "file")
        if self.purpose is None:
            raise errors.bad_request("Missing the `purpose` field.", "purpose")
        return self.filename, self.purpose

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._part = _text(options.get(b"name", b""))
        if self._part.startswith("expires_after"):
            # Accepting it would promise an expiry that never happens.
            raise errors.bad_request("File expiry is not supported.", "expires_after")
        if self._part == "file":
            if self.filename is not None:
                raise errors.bad_request("Send exactly one `file` field.", "file")
            self.filename = _text(options.get(b"filename", b"")) or "file"
        elif self._part == "purpose":
            self._purpose_bytes.clear()
        else:  # never dropped silently: the sender meant something by it
            raise errors.bad_request(
                f"Unknown upload field {self._part!r}; uploads take `file` and `purpose`.", self._part or None
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            self._file_data.append(data[start:end])
        elif self._part == "purpose":
            self._purpose_bytes += data[start:end]
            if len(self._purpose_bytes) > MAX_PURPOSE_BYTES:
                raise invalid_purpose(_text(bytes(self._purpose_bytes[:MAX_PURPOSE_BYTES])) + "...")

    def _on_part_end(self) -> None:
        if self._part == "purpose":
            purpose = _text(bytes(self._purpose_bytes))
            if purpose not in PURPOSES:
                raise invalid_purpose(purpose)
            self.purpose = purpose
        self._part = None

    def _on_end(self) -> None:
        self._complete = True


def _text(raw: bytes) -> str:
    """Browsers and HTTP clients send UTF-8 in form headers and fields; anything else is read as Latin-1."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@router.post("/v1/files", response_model=FileObject)
async def create_file(request: Request) -> FileObject:
    ctx = get_context(request)
    settings, files = ctx.settings, ctx.store.files
    owner, limit = principal_of(request).owner, settings.max_upload_bytes
    quota = settings.max_stored_bytes_per_owner or None
    if parse_options_header(request.headers.get("content-type", ""))[0] == b"application/json":
        return await _create_from_json(request, settings, files, owner, quota)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MAX_FORM_OVERHEAD_BYTES:
        raise upload_too_large(limit)
    if quota is not None and declared.isdigit():
        # Refused before a byte is stored when even the smallest file the body can hold does not fit.
        used = await asyncio.to_thread(files.stored_bytes, owner)
        if used + int(declared) - MAX_FORM_OVERHEAD_BYTES > quota:
            raise quota_exceeded(StorageQuotaExceeded(used, quota))
    with files.upload() as upload:
        form = UploadForm(request.headers.get("content-type", ""), upload, limit)
        try:
            async for chunk in request.stream():
                await form.feed(chunk)
        except ClientDisconnect:
            raise errors.bad_request("The client disconnected during the upload.", "file") from None
        filename, purpose = form.finish()
        try:
            record = await asyncio.to_thread(upload.commit, owner, filename, purpose, quota)
        except StorageQuotaExceeded as exc:
            raise quota_exceeded(exc) from None
    return FileObject.of(record)


async def _create_from_json(
    request: Request, settings: Settings, files: FileStore, owner: str, quota: int | None
) -> FileObject:
    body, max_body = bytearray(), settings.max_request_body_bytes
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise body_too_large(max_body)
    except ClientDisconnect:
        raise errors.bad_request("The client disconnected during the upload.", "content") from None
    try:
        form = FileAsJSON.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if form.purpose not in PURPOSES:
        raise invalid_purpose(form.purpose)
    data = form.content.encode()
    if len(data) > settings.max_upload_bytes:
        raise upload_too_large(settings.max_upload_bytes)
    with files.upload() as upload:
        await asyncio.to_thread(upload.write, data)
        try:
            record = await asyncio.to_thread(upload.commit, owner, form.filename, form.purpose, quota)
        except StorageQuotaExceeded as exc:
            raise quota_exceeded(exc) from None
    return FileObject.of(record)


@router.get("/v1/files", response_model=FileList)
def list_files(request: Request, query: Annotated[ListFilesQuery, Depends(list_files_query)]) -> FileList:
    files = get_context(request).store.files
    try:
        page = files.list(
            _scope(request), limit=query.limit, order=query.order, after=query.after, purpose=query.purpose
        )
    except FileNotFound as exc:
        raise file_not_found(exc, param="after") from None
    data = [FileObject.of(record) for record in page.records]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=page.has_more,
    )


@router.get("/v1/files/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, request: Request) -> FileObject:
    try:
        return FileObject.of(get_context(request).store.files.get(_scope(request), file_id))
    except FileNotFound as exc:
        raise file_not_found(exc) from None


@router.get(
    "/v1/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def file_content(file_id: str, request: Request) -> StreamingResponse:
    try:
        record, contents = get_context(request).store.files.open(_scope(request), file_id)
    except FileNotFound as exc:
        raise file_not_found(exc) from None
    return StreamingResponse(
        _chunks(contents), media_type="application/octet-stream", headers={"Content-Length": str(record.bytes)}
    )


def _chunks(contents: BinaryIO) -> Iterator[bytes]:
    # A generator, so Starlette reads each chunk in a worker thread and the file closes when it is done.
    with contents:
        while chunk := contents.read(CONTENT_CHUNK_BYTES):
            yield chunk


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, request: Request) -> FileDeleted:
    try:
        get_context(request).store.files.delete(_scope(request), file_id)
    except FileNotFound as exc:
        raise file_not_found(exc) from None
    return FileDeleted(id=file_id)
