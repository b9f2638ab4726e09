"""Typed field access for the two encodings Postal uses: JSON and FormData (postal.md §1).

``JsonFields`` and ``FormFields`` offer the same small interface, so the parser reads a field the same
way whichever encoding carried it. FormData values are unescaped with whole-buffer replaces, never split
into millions of pieces: a 25 MB attachment arrives as one 35 MB form value.

Raises only PayloadError; never puts a value into an exception message.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from bridge.postal.encoding import MessageTooLarge, PayloadError

__all__ = ["MAX_ATTACHMENTS", "MAX_FORM_FIELDS", "Fields", "FormFields", "JsonFields", "bad_field", "parse_form"]

# A Hash with more attachments is refused (413) before any is decoded. Real mail carries a handful; 1,000
# rebuild in a fraction of a second, while an unbounded count lets one delivery hold a web worker for
# minutes (50,000 took 30 s before this bound).
MAX_ATTACHMENTS: Final = 1000
# FormData flattens each attachment into 4 fields (filename, content_type, size, data) beside ~25 others:
# a form with more fields than the largest acceptable Hash is refused before it is split (splitting and
# unescaping 200,000 fields costs seconds).
MAX_FORM_FIELDS: Final = 5 * MAX_ATTACHMENTS + 100

_MISSING: Final = object()


def _missing(name: str) -> PayloadError:
    return PayloadError(f"missing field: {name}")


def bad_field(name: str) -> PayloadError:
    return PayloadError(f"bad field: {name}")


class JsonFields:
    """Typed access to a JSON payload's fields (Postal's own types: ints, bools, floats, strings, arrays)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def has(self, name: str) -> bool:
        return name in self._data

    def _raw(self, name: str, required: bool) -> Any:
        value = self._data.get(name, _MISSING)
        if value is _MISSING and required:
            raise _missing(name)
        return None if value is _MISSING else value

    def text(self, name: str, *, required: bool = True, nullable: bool = False) -> str | None:
        value = self._raw(name, required)
        if value is None:
            if required and not nullable:
                raise bad_field(name)
            return None
        if not isinstance(value, str):
            raise bad_field(name)
        return value

    def integer(self, name: str) -> int:
        value = self._raw(name, True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_field(name)
        return value

    def flag(self, name: str) -> bool | None:
        value = self._raw(name, False)
        if value is not None and not isinstance(value, bool):
            raise bad_field(name)
        return value

    def number(self, name: str) -> float | None:
        value = self._raw(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_field(name)
        return float(value)

    def text_list(self, name: str) -> list[str] | None:
        value = self._raw(name, False)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad_field(name)
        return value

    def take_base64(self, name: str) -> str:
        """Remove and return a base64 field, so that the caller holds the only reference to it."""
        value = self._data.pop(name, _MISSING)
        if value is _MISSING:
            raise _missing(name)
        if not isinstance(value, str):
            raise bad_field(name)
        return value

    def take_attachments(self) -> list[tuple[str | None, str | None, str]]:
        value = self._data.pop("attachments", None)
        if value is None:
            return []
        if not isinstance(value, list):
            raise bad_field("attachments")
        if len(value) > MAX_ATTACHMENTS:
            raise MessageTooLarge("too many attachments")
        out = []
        for item in value:
            if not isinstance(item, dict):
                raise bad_field("attachments")
            filename, content_type, data = item.get("filename"), item.get("content_type"), item.get("data")
            if not isinstance(filename, str | None) or not isinstance(content_type, str | None):
                raise bad_field("attachments")
            if not isinstance(data, str):
                raise bad_field("attachments")
            out.append((filename, content_type, data))
        return out


_ATTACHMENT_KEY = re.compile(r"attachments\[(\d{1,6})\]\[([a-z_]+)\]")
_INT = re.compile(r"-?[0-9]{1,19}")
_FLOAT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?", re.I)
# Ruby's encode_www_form_component writes upper-case hex; other encoders may not.
_COMMON_ESCAPES: Final = (
    (b"%0A", b"\n"),
    (b"%0a", b"\n"),
    (b"%0D", b"\r"),
    (b"%0d", b"\r"),
    (b"%2B", b"+"),
    (b"%2b", b"+"),
    (b"%2F", b"/"),
    (b"%2f", b"/"),
    (b"%3D", b"="),
    (b"%3d", b"="),
)


def _form_unquote(value: bytes) -> bytes:
    """application/x-www-form-urlencoded unescaping that stays cheap on a 35 MB base64 value.

    urllib's unquote splits on every '%' (millions of small objects for a big attachment). Base64 only needs
    a handful of escapes, done with whole-buffer replaces; anything left goes through urllib. The replaced
    characters are never '%' or hex digits, so the result equals a single-pass unquote.
    """
    if b"+" in value:
        value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value
    for escaped, plain in _COMMON_ESCAPES:
        if escaped in value:
            value = value.replace(escaped, plain)
    if b"%" in value:
        value = unquote_to_bytes(value)
    return value


def parse_form(body: bytes | bytearray) -> dict[str, list[bytes | None]]:
    """Split a form body into name -> values; ``name`` without ``=`` is Ruby's nil (kept as None)."""
    if body.count(b"&") >= MAX_FORM_FIELDS:  # counted in C before any field is built
        raise MessageTooLarge("too many form fields")
    fields: dict[str, list[bytes | None]] = {}
    view = memoryview(body)
    pos, size = 0, len(body)
    while pos < size:
        end = body.find(b"&", pos)
        if end == -1:
            end = size
        if end > pos:  # Ruby writes "&&" for an empty array: nothing to keep
            eq = body.find(b"=", pos, end)
            name_end = end if eq == -1 else eq
            try:
                name = _form_unquote(bytes(view[pos:name_end])).decode("utf-8")
            except UnicodeDecodeError:
                raise PayloadError("malformed form data") from None
            value = None if eq == -1 else _form_unquote(bytes(view[eq + 1 : end]))
            fields.setdefault(name, []).append(value)
        pos = end + 1
    view.release()
    return fields


class FormFields:
    """Typed access to a FormData payload, where Postal's values all became strings (nil: bare name)."""

    def __init__(self, data: dict[str, list[bytes | None]]) -> None:
        self._data = data

    def has(self, name: str) -> bool:
        return name in self._data

    def _one(self, name: str, required: bool) -> bytes | None:
        values = self._data.get(name)
        if values is None:
            if required:
                raise _missing(name)
            return None
        if len(values) != 1:
            raise bad_field(name)
        return values[0]

    @staticmethod
    def _decode(name: str, value: bytes) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise bad_field(name) from None

    def text(self, name: str, *, required: bool = True, nullable: bool = False) -> str | None:
        value = self._one(name, required)
        if value is None:
            if required and not nullable:
                raise bad_field(name)
            return None
        return self._decode(name, value)

    def integer(self, name: str) -> int:
        value = self._one(name, True)
        if value is None or not _INT.fullmatch(self._decode(name, value)):
            raise bad_field(name)
        return int(value)

    def flag(self, name: str) -> bool | None:
        value = self._one(name, False)
        if value is None:
            return None
        if value not in (b"true", b"false"):
            raise bad_field(name)
        return value == b"true"

    def number(self, name: str) -> float | None:
        value = self._one(name, False)
        if value is None:
            return None
        text = self._decode(name, value)
        if not _FLOAT.fullmatch(text):
            raise bad_field(name)
        return float(text)

    def text_list(self, name: str) -> list[str] | None:
        values = self._data.get(name)
        if values is None or values == [None]:
            return None
        return [self._decode(name, v) for v in values if v is not None]

    def take_base64(self, name: str) -> bytes:
        """Remove and return a base64 field, so that the caller holds the only reference to it."""
        value = self._one(name, True)
        del self._data[name]
        if value is None:
            raise bad_field(name)
        return value

    def take_attachments(self) -> list[tuple[str | None, str | None, bytes]]:
        grouped: dict[int, dict[str, bytes | None]] = {}
        for key in [k for k in self._data if k.startswith("attachments")]:
            values = self._data.pop(key)
            match = _ATTACHMENT_KEY.fullmatch(key)
            if match is None or len(values) != 1:
                raise bad_field("attachments")
            grouped.setdefault(int(match.group(1)), {})[match.group(2)] = values[0]
            if len(grouped) > MAX_ATTACHMENTS:
                raise MessageTooLarge("too many attachments")
        out = []
        for index in sorted(grouped):
            item = grouped[index]
            data = item.get("data")
            if data is None:
                raise bad_field("attachments")
            filename, content_type = item.get("filename"), item.get("content_type")
            out.append(
                (
                    None if filename is None else self._decode("attachments", filename),
                    None if content_type is None else self._decode("attachments", content_type),
                    data,
                )
            )
        return out


Fields = JsonFields | FormFields
