"""A multipart body must end with its closing boundary: one cut off is malformed (400), not a form missing a field.

Starlette's parser stops wherever the body stops, so a body cut off inside the ``file`` part parsed as a form with
no ``file`` at all, and the client was told 422 "form field file: Field required" about a field it did send. The
routers that take multipart bodies use :class:`WholeMultipartRoute`: its requests check the body's end as it
streams and raise the ``MultiPartException`` a missing boundary raises, which Starlette answers 400 and the app's
handler ``malformed_request`` (errors.py).

The parser is also held to what the routes take: Starlette keeps each file up to 1 MiB and each text field up to
1 MiB in memory while it parses, up to 1,000 of each, so a batch-sized body (``max_batch_files`` uploads' worth)
of small files or fields was held whole before a route could count them. At most ``max_batch_files`` files
(then 413 ``too_many_files``), :data:`MAX_FIELDS` text fields of at most :data:`MAX_FIELD_BYTES` (then 400).

A file part over 1 MiB is spooled to the temporary directory; one that directory does not take (a full tmpfs) is
507 ``insufficient_storage`` (:func:`spool_failed`), not the 400 FastAPI makes of any error while it parses.

A file's name is the one its client meant (:func:`sent_filename`): .NET's HttpClient, common on a plant's MES,
spells a name beyond ASCII twice, and Starlette kept the spelling meant for old mail readers.
"""

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from email.header import decode_header, make_header
from email.errors import HeaderParseError
from urllib.parse import unquote

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from .errors import FILE_PART, CodedHTTPException

MAX_FIELDS = 256  # text fields of one form: part context, note, force, inspection ids (also comma-separated)
MAX_FIELD_BYTES = 64 * 1024  # one text field: meta is refused above 16 KB, a note above 2,000 characters


def closing_delimiter(content_type: str | None) -> bytes | None:
    """The line that ends a multipart body of this ``Content-Type`` (``CRLF--boundary--``); None for any other
    body, or a multipart one with no boundary (Starlette refuses that one itself)."""
    if not content_type:
        return None
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    return b"\r\n--" + boundary + b"--"


class WholeMultipartRequest(Request):
    """A request whose multipart body stream fails, as malformed, when it ends before its closing boundary."""

    async def stream(self) -> AsyncGenerator[bytes, None]:
        delimiter = closing_delimiter(self.headers.get("content-type"))
        if delimiter is None:
            async for chunk in super().stream():
                yield chunk
            return
        n = len(delimiter)
        # the body's first boundary may open it with no line break before it: start as if one came first
        tail, closed = b"\r\n", False
        async for chunk in super().stream():
            if not closed and chunk:
                closed = delimiter in chunk or delimiter in tail + chunk[:n - 1]  # also across two chunks
                tail = (tail + chunk[-n:])[-n:]
            yield chunk
        if not closed:
            raise MultiPartException("the multipart body ended before its closing boundary: the upload was cut "
                                     "off or is malformed; send the whole request again")

    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> FormData:
        """The form, parsed with no more files and text than the routes take, so that a body of many small parts
        is refused as it streams instead of held in memory whole."""
        files = self.app.state.service.settings.max_batch_files
        fields = min(max_fields, MAX_FIELDS)
        try:
            form = await super()._get_form(max_files=min(max_files, files), max_fields=fields,
                                           max_part_size=min(max_part_size, MAX_FIELD_BYTES))
            # a url-encoded form: Starlette before 1.3.1 held only a multipart body's text fields to max_fields
            if sum(not isinstance(v, UploadFile) for _, v in form.multi_items()) > fields:
                raise HTTPException(400, f"Too many fields. Maximum number of fields is {fields}.")
            # ... and only a multipart body's text fields to max_part_size: a url-encoded one was taken at any size
            urlencoded = self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
            if urlencoded and any(len(k.encode()) + len(v.encode()) > MAX_FIELD_BYTES
                                  for k, v in form.multi_items() if isinstance(v, str)):
                raise HTTPException(400, f"Field exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")
            for _, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value.filename = sent_filename(value.filename, value.headers.get("content-disposition"))
            return form
        except HTTPException as exc:
            if str(exc.detail).startswith("Too many files"):  # Starlette's message for max_files
                raise CodedHTTPException(413, "too_many_files", f"more than {files} files; the limit is {files} "
                                         "per request (--max-batch-files)") from None
            if str(exc.detail).startswith("Part exceeded maximum size"):  # ... for max_part_size, of a text field
                raise CodedHTTPException(400, "malformed_request", "a form field without a file name is over "
                                         f"{MAX_FIELD_BYTES // 1024} KB: if it is the photo, send it as a file: "
                                         f"{FILE_PART}") from None
            raise
        except OSError as exc:  # FastAPI answers anything but an HTTPException here 400 "error parsing the body"
            raise spool_failed(exc) from exc


# RFC 5987's extended parameter (charset'language'percent-encoded bytes) and RFC 2047's encoded word (=?cs?B?...?=)
# a parameter is a name, '=' and a token or a quoted string: walked one after another, a quoted file name that
# holds "; filename*=" is one value, not a second parameter
_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_ENCODED_WORD = re.compile(r"=\?[\w.-]+\?[BbQq]\?[^?\s]*\?=")


def sent_filename(filename: str | None, disposition: str | None) -> str | None:
    """The name a client gave its file part. Where it sends ``filename*`` (RFC 5987) beside ``filename``, that one is
    the name (RFC 7578, RFC 6266); .NET's HttpClient sends both for a name beyond ASCII, its ``filename`` an RFC 2047
    encoded word, and Starlette, which reads only ``filename``, kept ``=?utf-8?B?UHLDvGYucG5n?=`` as the name of an
    update's image in every later version. A ``filename`` that is such a word alone is decoded too."""
    star = next((v.strip().strip('"') for k, v in _PARAM.findall(disposition or "") if k.lower() == "filename*"), "")
    if star:
        charset, _, rest = star.partition("'")
        try:
            name = unquote(rest.partition("'")[2], encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):  # a charset Python does not know, bytes that are not in it
            name = ""
        name = name.replace("\\", "/").rsplit("/", 1)[-1]  # a client's folders, as Starlette drops them
        if name:
            return name
    if filename and _ENCODED_WORD.fullmatch(filename):
        try:
            return str(make_header(decode_header(filename))) or filename
        except (HeaderParseError, LookupError, UnicodeDecodeError):
            return filename
    return filename


def spool_failed(exc: OSError) -> CodedHTTPException:
    """The answer to an upload the temporary directory did not take while it was spooled (a file part over 1 MiB
    goes to disk there): the server's fault, not the body's, so not the 400 "malformed" FastAPI made of it. A full
    volume is 507 ``insufficient_storage``, anything else 503 ``spool_unavailable``; smaller uploads, held in memory,
    are still scored."""
    import errno
    import tempfile

    try:  # the spool's own failure may have been gettempdir's: no usable temporary directory at all
        where = tempfile.gettempdir()
    except OSError:
        where = "none usable: TMPDIR, /tmp, /var/tmp, /usr/tmp and the working directory were tried"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CodedHTTPException(507, "insufficient_storage", f"the service's temporary directory ({where}) is "
                                  "full: uploads over 1 MiB are held there while they arrive; try again later or "
                                  "send a smaller file (the operator must free space there)")
    return CodedHTTPException(503, "spool_unavailable", f"the service could not hold this upload in its temporary "
                              f"directory ({where}: {exc.strerror or exc}); try again later or send a smaller file")


class WholeMultipartRoute(APIRoute):
    """An API route whose requests are :class:`WholeMultipartRequest` (the routers' ``route_class``)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def whole_multipart_handler(request: Request) -> Response:
            return await handler(WholeMultipartRequest(request.scope, request.receive))

        return whole_multipart_handler
