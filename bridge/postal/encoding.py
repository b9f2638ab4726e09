"""Errors and strict base64 for Postal payloads: what every part of the parser shares.

Exceptions, and what the web layer answers (Postal bounces the sender on any 4xx but 429):

    PayloadError     -> 400  signed but malformed (bad JSON/form, wrong types, missing fields, bad base64)
    MessageTooLarge  -> 413  what Postal sent is over the configured limit, or a Hash has too many parts

Exception messages name fields, never their content (mail is private, and Postal shows our answer).
"""

from __future__ import annotations

import binascii
import re

__all__ = ["MessageTooLarge", "PayloadError", "decode_base64", "decoded_length"]


class PayloadError(ValueError):
    """Signed by Postal but malformed: answer 400. The message is short and never quotes the payload."""


class MessageTooLarge(PayloadError):
    """The decoded message is over the configured limit: answer 413."""


_B64_TAIL_STR = re.compile(r"={1,2}[\r\n]*")
_B64_TAIL_BYTES = re.compile(rb"={1,2}[\r\n]*")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"


def decode_base64(text: str | bytes, *, field: str, limit: int | None = None) -> bytes:
    """Decode base64 as Ruby's Base64.encode64 writes it (newlines every 60 characters), strictly.

    Newlines (LF or CRLF) may appear anywhere or not at all; any other non-alphabet character, misplaced
    padding or a truncated quantum is a PayloadError. The decoded length is computed and checked against
    ``limit`` before anything is allocated. No copy of a valid ``text`` is made before decoding.
    """
    if isinstance(text, str):
        valid = True  # checked after decoding, by length: cheaper than scanning a 34 MB string
        pad_at = text.find("=")
        tail_ok = pad_at == -1 or _B64_TAIL_STR.fullmatch(text, pad_at) is not None
        pad_count = 0 if pad_at == -1 else text.count("=", pad_at)
        chars = len(text) - text.count("\n") - text.count("\r")
    else:
        valid = not text.translate(None, _B64_ALPHABET)  # what is left is not base64
        pad_at = text.find(b"=")
        tail_ok = pad_at == -1 or _B64_TAIL_BYTES.fullmatch(text, pad_at) is not None
        pad_count = 0 if pad_at == -1 else text.count(b"=", pad_at)
        chars = len(text) - text.count(b"\n") - text.count(b"\r")
    if not (valid and tail_ok) or chars % 4:
        raise PayloadError(f"invalid base64: {field}")
    if limit is not None and chars // 4 * 3 - pad_count > limit:
        raise MessageTooLarge(f"{field} over the size limit")
    try:
        decoded = binascii.a2b_base64(text)
    except (binascii.Error, ValueError):
        raise PayloadError(f"invalid base64: {field}") from None
    # a2b_base64 skips characters outside the alphabet: any such character makes the output shorter
    # than the characters counted above promise, so this check is the strictness, without a scan.
    if len(decoded) != chars // 4 * 3 - pad_count:
        raise PayloadError(f"invalid base64: {field}")
    return decoded


def decoded_length(text: str | bytes) -> int:
    """How many bytes ``text`` decodes to, counted without decoding (a size check before the work).

    Exact for valid base64; for invalid text decode_base64 refuses it later anyway.
    """
    if isinstance(text, str):
        pad_at = text.find("=")
        pad_count = 0 if pad_at == -1 else text.count("=", pad_at)
        chars = len(text) - text.count("\n") - text.count("\r")
    else:
        pad_at = text.find(b"=")
        pad_count = 0 if pad_at == -1 else text.count(b"=", pad_at)
        chars = len(text) - text.count(b"\n") - text.count(b"\r")
    return max(chars // 4 * 3 - pad_count, 0)
