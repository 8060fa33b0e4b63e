"""Page cursors: where a listing goes on, signed so that a client passes it back unchanged.

A cursor names the last item a page ended at (an inspection's id, a byte of a model's change log), so the next page
starts after it however many items were added meanwhile. It is signed with a key derived from the API key: a
cursor changed by hand, or made by another deployment, is refused with a clear 400 instead of reading a page from
a place no page ended at.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from .errors import ApiError
from .lifecycle import Service


def _cursor_key(service: Service) -> bytes:
    key = service.settings.api_key
    return hashlib.sha256(b"anomaly-cursor:" + (key.get_secret_value().encode() if key else b"")).digest()


def _mac(service: Service, listing: str, body: str) -> bytes:
    """The signature of ``body`` as a cursor of ``listing``: a cursor of one listing is none of another's. The
    records' listing signs its body alone, as before there were others, so cursors handed out then still work."""
    signed = body if listing == RECORDS else f"{listing}:{body}"
    return hmac.new(_cursor_key(service), signed.encode(), hashlib.sha256).digest()[:12]


RECORDS = "inspections"
HISTORY = "history"


def encode_cursor(service: Service, last_id: str, listing: str = RECORDS) -> str:
    body = base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")
    return f"{body}.{base64.urlsafe_b64encode(_mac(service, listing, body)).decode().rstrip('=')}"


def decode_cursor(service: Service, cursor: str, listing: str = RECORDS) -> str:
    """The id a cursor of ``listing`` continues after; 400 ``invalid_cursor`` if it was not made by this service for
    that listing, or was changed."""
    try:
        body, mac = cursor.split(".")
        expected = _mac(service, listing, body)
        if not hmac.compare_digest(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)), expected):
            raise ValueError("checksum")
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise invalid_cursor() from None


def invalid_cursor() -> ApiError:
    return ApiError(400, "invalid_cursor", "cursor is not one this service returned (changed or truncated); "
                    "start again without it")
