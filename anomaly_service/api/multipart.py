"""A multipart body must end with its closing boundary: one cut off is malformed (400), not a form missing a field.

Starlette's parser stops wherever the body stops, so a body cut off inside the ``file`` part parsed as a form with
no ``file`` at all, and the client was told 422 "form field file: Field required" about a field it did send. The
routers that take multipart bodies use :class:`WholeMultipartRoute`: its requests check the body's end as it
streams and raise the ``MultiPartException`` a missing boundary raises, which Starlette answers 400 and the app's
handler ``malformed_request`` (errors.py).
"""

from collections.abc import AsyncGenerator, Awaitable, Callable

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.formparsers import MultiPartException


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


class WholeMultipartRoute(APIRoute):
    """An API route whose requests are :class:`WholeMultipartRequest` (the routers' ``route_class``)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def whole_multipart_handler(request: Request) -> Response:
            return await handler(WholeMultipartRequest(request.scope, request.receive))

        return whole_multipart_handler
