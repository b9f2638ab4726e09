"""moto's S3 server, with create-only writes (``If-None-Match: *``) made atomic as on real S3.

moto checks that the key is absent and stores the object in two steps, on a thread per request, so
two PUTs of one key at once can both pass the check (seen under load: two copies of one Postal
delivery both answered ``stored``). AWS S3 and Ceph RGW decide such a race for exactly one writer
(the other gets 412 or 409); the bridge's dedupe relies on that, so the suite's emulator must too.
One lock around moto's PutObject handler gives it that guarantee; nothing else is changed.
"""

from __future__ import annotations

import threading
from typing import Any

from moto.s3.responses import S3Response
from moto.server import main

_lock = threading.Lock()
_put_object = S3Response.put_object


def _atomic_put_object(self: S3Response) -> Any:
    with _lock:
        return _put_object(self)


S3Response.put_object = _atomic_put_object  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
