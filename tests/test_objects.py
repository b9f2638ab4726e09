"""The object store's behaviour, the same tests against the filesystem, moto, and a real Ceph RGW.

What a user of the bridge would notice: a stored message is never overwritten by a retry (create-only,
also under concurrent creators), records can be updated, listings find a mailbox's objects and only
those, hostile keys never reach the disk or the bucket, and a broken store becomes StorageUnavailable
(so Postal gets a 503 and retries) quickly instead of hanging or bouncing mail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bridge.store.objects import (
    FileObjectStore,
    ObjectStore,
    S3ObjectStore,
    StorageUnavailable,
    open_object_store,
)
from tests.servers import CephRGW, MotoS3Server

BRIDGE_DIR = Path(__file__).resolve().parent.parent / "bridge"
# Child processes import the store modules without running bridge/__init__.py (which wires the web app):
# empty stand-ins for the two packages, so only the store's own imports (and boto3 for s3) run.
_STORE_ONLY = f"""
import sys, types
for _name, _path in (("bridge", {str(BRIDGE_DIR)!r}), ("bridge.store", {str(BRIDGE_DIR / "store")!r})):
    _package = types.ModuleType(_name)
    _package.__path__ = [_path]
    sys.modules[_name] = _package
"""

PAGE = 7  # S3 listing page size in these tests, so a handful of keys spans several pages

BAD_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "mail/../../outside",
    "mail/./x",
    ".",
    "..",
    "mail//x",
    "mail/",
    "mail x",
    "mail\\x",
    "mail\x00x",
    "mail\nx",
    "m\u00e4il",
    "mail/%2e%2e",
    "mail/a~b",
]


def s3_store(
    endpoint: str, bucket: str, access_key: str, secret_key: str, prefix: str = "", page_size: int = 1000
) -> S3ObjectStore:
    return S3ObjectStore(
        bucket,
        prefix,
        endpoint_url=endpoint,
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        list_page_size=page_size,
    )


@pytest.fixture(params=["file", "moto", pytest.param("ceph", marks=pytest.mark.ceph)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same store interface on each backend, empty at the start of the test."""
    if request.param == "file":
        return FileObjectStore(tmp_path / "objects")
    if request.param == "moto":
        b = request.getfixturevalue("s3_bucket")
        return s3_store(b["endpoint"], b["bucket"], b["access_key"], b["secret_key"], page_size=PAGE)
    rgw: CephRGW = request.getfixturevalue("ceph_rgw")
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    created = s3_store(rgw.endpoint, bucket, rgw.access_key, rgw.secret_key, page_size=PAGE)
    created.ensure_bucket()
    return created


# --------------------------------------------------------------------------------------------------
# Behaviour shared by every backend


def test_create_then_get_round_trip(store: ObjectStore) -> None:
    body = bytes(range(256)) * 3 + b"\r\n.\r\n\x00"
    assert store.create("mail/alice@example.com/m1", body) is True
    assert store.get("mail/alice@example.com/m1") == body
    assert store.create("mail/alice@example.com/empty", b"") is True
    assert store.get("mail/alice@example.com/empty") == b""
    assert store.get("mail/alice@example.com/absent") is None
    assert store.get("mail/nobody@example.com/m1") is None


def test_create_on_existing_key_keeps_the_first_content(store: ObjectStore) -> None:
    assert store.create("records/m1", b"first") is True
    assert store.create("records/m1", b"second") is False
    assert store.create("records/m1", [b"third"]) is False
    assert store.get("records/m1") == b"first"


def test_concurrent_creators_exactly_one_wins(store: ObjectStore) -> None:

    def creator(i: int, key: str, barrier: threading.Barrier, results: dict[int, bool]) -> None:
        barrier.wait()
        results[i] = store.create(key, f"writer {i}".encode())

    for round_ in range(3):
        key = f"race/{round_}"
        barrier = threading.Barrier(8)
        results: dict[int, bool] = {}
        threads = [threading.Thread(target=creator, args=(i, key, barrier, results)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, created in results.items() if created]
        assert len(results) == 8
        assert len(winners) == 1, results
        assert store.get(key) == f"writer {winners[0]}".encode()


# A creator in its own process: loads the store, says "ready", waits for "go" on stdin, then creates.
_RACER = (
    _STORE_ONLY
    + """
from bridge.store import filesystem
store = filesystem.FileObjectStore(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
print(store.create("mail/a@b.c/m", ("process " + sys.argv[3]).encode() * 1000), flush=True)
"""
)


def test_filesystem_creators_in_separate_processes_exactly_one_wins(tmp_path: Path) -> None:
    """gunicorn workers and RQ workers are separate processes sharing one directory."""
    root = tmp_path / "objects"
    FileObjectStore(root)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, "-", str(root), str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(8)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline() == b"ready\n"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write(b"go\n")
            racer.stdin.flush()
        outcome = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    winners = [i for i, created in enumerate(outcome) if created == b"True"]
    assert sorted(set(outcome)) == [b"False", b"True"] and len(winners) == 1, outcome
    assert FileObjectStore(root).get("mail/a@b.c/m") == f"process {winners[0]}".encode() * 1000
    assert [p.name for p in (root / "mail" / "a@b.c").iterdir()] == ["m"]


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("mailboxes/alice@example.com", b'{"v":1}')
    store.put("mailboxes/alice@example.com", b'{"v":2}')
    assert store.get("mailboxes/alice@example.com") == b'{"v":2}'
    assert store.create("mailboxes/alice@example.com", b"x") is False
    assert store.create("records/r", b"created") is True
    store.put("records/r", [b"upd", b"ated"])
    assert store.get("records/r") == b"updated"


def test_delete(store: ObjectStore) -> None:
    store.create("handshakes/h1", b"doc")
    store.delete("handshakes/h1")
    assert store.get("handshakes/h1") is None
    store.delete("handshakes/h1")  # absent is fine
    store.delete("never/existed")
    assert store.create("handshakes/h1", b"again") is True
    assert store.get("handshakes/h1") == b"again"


def test_list_by_prefix_sorted_full_keys(store: ObjectStore) -> None:
    keys = [
        "mail/alice@example.com/2",
        "mail/alice@example.com/1",
        "mail/alice@example.com/sub/3",
        "mail/alice@example.com.evil/1",
        "mail/alice@example.com-x",
        "mail/bob@example.com/1",
        "records/1",
    ]
    for key in keys:
        assert store.create(key, key.encode())
    assert list(store.list("mail/alice@example.com/")) == [
        "mail/alice@example.com/1",
        "mail/alice@example.com/2",
        "mail/alice@example.com/sub/3",
    ]
    assert list(store.list("mail/al")) == [
        "mail/alice@example.com-x",
        "mail/alice@example.com.evil/1",
        "mail/alice@example.com/1",
        "mail/alice@example.com/2",
        "mail/alice@example.com/sub/3",
    ]
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("mail/carol@example.com/")) == []
    assert list(store.list("nothing")) == []


def test_list_paginates(store: ObjectStore) -> None:
    """S3 stores here list PAGE keys per request (S3's default is 1000): listings must follow the pages."""
    keys = [f"many/{i:05d}" for i in range(4 * PAGE + 1)]
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(lambda k: store.create(k, b"."), keys))
    assert list(store.list("many/")) == keys


def test_chunked_create_equals_joined_bytes(store: ObjectStore) -> None:
    chunks = [b"Received: from x\r\n", b"", os.urandom(70_000), bytearray(b"\x00\xff"), memoryview(b"end")]
    assert store.create("mail/c@d.e/chunked", chunks) is True
    assert store.get("mail/c@d.e/chunked") == b"".join(bytes(c) for c in chunks)
    assert store.create("mail/c@d.e/no-chunks", []) is True
    assert store.get("mail/c@d.e/no-chunks") == b""


def test_bad_keys_rejected(store: ObjectStore) -> None:
    """Every operation refuses every hostile key before touching the disk or the bucket."""
    operations = {
        "create": lambda key: store.create(key, b"x"),
        "put": lambda key: store.put(key, b"x"),
        "get": store.get,
        "delete": store.delete,
    }
    for key in BAD_KEYS:
        for name, operation in operations.items():
            with pytest.raises(ValueError):
                operation(key)
                pytest.fail(f"{name}({key!r}) was accepted")
    assert list(store.list("")) == []


def test_bad_list_prefixes_rejected(store: ObjectStore) -> None:
    for prefix in ["../", "/", "mail/../", "mail//", "a b/", "mail/x~", "/etc/"]:
        with pytest.raises(ValueError):
            list(store.list(prefix))
            pytest.fail(f"list({prefix!r}) was accepted")


def test_check_passes_on_a_healthy_store(store: ObjectStore) -> None:
    store.check()


# --------------------------------------------------------------------------------------------------
# Filesystem specifics


def test_filesystem_keeps_objects_inside_its_root_and_leaves_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FileObjectStore(root)
    for key in BAD_KEYS:
        with pytest.raises(ValueError):
            store.create(key, b"x")
    assert store.create("mail/a@b.c/1", b"one")
    store.put("mail/a@b.c/1", b"two")
    assert store.create("mail/a@b.c/1", b"three") is False
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "objects",
        "objects/mail",
        "objects/mail/a@b.c",
        "objects/mail/a@b.c/1",
    ]


def test_filesystem_key_that_is_another_keys_directory_is_refused(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "objects")
    assert store.create("a/b", b"object")
    with pytest.raises(ValueError):
        store.create("a/b/c", b"under an object")
    assert store.create("x/y/z", b"deep")
    with pytest.raises(ValueError):
        store.create("x/y", b"over a directory")
    with pytest.raises(ValueError):
        store.put("x/y", b"over a directory")
    assert store.get("x/y") is None
    assert store.get("a/b/c") is None
    assert list(store.list("")) == ["a/b", "x/y/z"]


def test_filesystem_without_fsync_behaves_the_same(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "objects", fsync=False)
    assert store.create("k", [b"a", b"b"]) is True
    assert store.create("k", b"c") is False
    assert store.get("k") == b"ab"


def test_filesystem_root_gone_is_unavailable_not_empty(tmp_path: Path) -> None:
    """A vanished store (unmounted, deleted) must not look like an empty one: that would re-store mail."""
    root = tmp_path / "objects"
    store = FileObjectStore(root)
    assert store.create("mail/a@b.c/1", b"x")
    shutil.rmtree(root)
    root.write_bytes(b"not a directory")
    for call in (
        lambda: store.create("mail/a@b.c/2", b"x"),
        lambda: store.put("mail/a@b.c/2", b"x"),
        lambda: store.get("mail/a@b.c/1"),
        lambda: list(store.list("mail/")),
        store.check,
    ):
        with pytest.raises(StorageUnavailable):
            call()


# A child process runs the store with limited rights: root ignores directory permissions, so it drops
# CAP_DAC_OVERRIDE first (setpriv), and a file-size limit stands in for a full disk. The child loads
# only the store modules.
_CHILD = (
    _STORE_ONLY
    + """
import resource, signal
from bridge.store import filesystem, objects
if sys.argv[3] == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
store = filesystem.FileObjectStore(sys.argv[2])
outcomes = []
for name, call in [
    ("create", lambda: store.create("mail/a@b.c/2", [b"x" * 5000, b"y" * 5000])),
    ("put", lambda: store.put("records/r", b"z" * 10000)),
    ("check", store.check),
]:
    try:
        call()
        outcomes.append(name + "=ok")
    except objects.StorageUnavailable:
        outcomes.append(name + "=unavailable")
print(" ".join(outcomes))
"""
)


def _run_child(root: Path, mode: str) -> str:
    command = [sys.executable, "-c", _CHILD, "-", str(root), mode]
    if os.geteuid() == 0 and mode == "readonly":
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result.stdout.decode().strip()


def test_filesystem_read_only_directory_is_unavailable(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FileObjectStore(root)
    assert store.create("mail/a@b.c/1", b"x")
    for directory in (root, root / "mail", root / "mail" / "a@b.c"):
        directory.chmod(0o555)
    try:
        assert _run_child(root, "readonly") == "create=unavailable put=unavailable check=unavailable"
    finally:
        for directory in (root, root / "mail", root / "mail" / "a@b.c"):
            directory.chmod(0o755)
    assert store.get("mail/a@b.c/1") == b"x"


def test_filesystem_disk_full_is_unavailable_and_leaves_no_partial_object(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    FileObjectStore(root)
    assert _run_child(root, "fsize") == "create=unavailable put=unavailable check=ok"
    store = FileObjectStore(root)
    assert store.get("mail/a@b.c/2") is None
    assert list(store.list("")) == []
    assert [p for p in root.rglob("*") if p.is_file()] == []


# --------------------------------------------------------------------------------------------------
# S3 specifics


def test_s3_prefix_isolates_and_maps_keys(s3_bucket: dict[str, str]) -> None:
    b = s3_bucket
    tenant = s3_store(b["endpoint"], b["bucket"], b["access_key"], b["secret_key"], prefix="tenant-a")
    whole = s3_store(b["endpoint"], b["bucket"], b["access_key"], b["secret_key"])
    assert tenant.create("mail/a@b.c/1", b"x")
    assert whole.create("mail/a@b.c/1", b"y")
    assert list(whole.list("")) == ["mail/a@b.c/1", "tenant-a/mail/a@b.c/1"]
    assert list(tenant.list("")) == ["mail/a@b.c/1"]
    assert tenant.get("mail/a@b.c/1") == b"x"


def test_open_object_store_reads_the_standard_aws_variables(
    s3_bucket: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = s3_bucket
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", b["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", b["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", b["secret_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", b["region"])
    store = open_object_store(f"s3://{b['bucket']}/bridge")
    assert isinstance(store, S3ObjectStore)
    store.check()
    assert store.create("k", b"v")
    direct = s3_store(b["endpoint"], b["bucket"], b["access_key"], b["secret_key"])
    assert direct.get("bridge/k") == b"v"


def test_open_object_store_file_url(tmp_path: Path) -> None:
    store = open_object_store(f"file://{tmp_path}/objects%20dir", fsync=False)
    assert isinstance(store, FileObjectStore)
    assert store.create("k", b"v")
    assert (tmp_path / "objects dir" / "k").read_bytes() == b"v"


@pytest.mark.parametrize(
    "url",
    [
        "http://bucket",
        "file://host/path",
        "file:relative/path",
        "file:///tmp/x?y=1",
        "s3://",
        "s3://Upper_Case",
        "s3://bucket/../x",
        "s3://AKIDEXAMPLE:wJalrXUtnFEMIsecret@bucket",
        "",
    ],
)
def test_open_object_store_rejects_unusable_urls(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_object_store(url)
    message = str(info.value)
    assert "\n" not in message
    assert "wJalrXUtnFEMIsecret" not in message


def test_large_chunked_body_is_streamed_not_joined(s3_bucket: dict[str, str]) -> None:
    """A 25 MB body handed over in chunks must not be copied into one more 25 MB buffer on the way out."""
    b = s3_bucket
    store = s3_store(b["endpoint"], b["bucket"], b["access_key"], b["secret_key"])
    chunks = [bytes([i]) * (1 << 20) for i in range(25)]
    store.create("warm-up", b"x")  # load botocore's models outside the measurement
    tracemalloc.start()
    try:
        assert store.create("mail/big@example.com/1", chunks) is True
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"chunked create allocated {peak / 2**20:.1f} MiB at peak"
    assert store.get("mail/big@example.com/1") == b"".join(chunks)


def test_stopped_s3_endpoint_is_unavailable_quickly(tmp_path: Path) -> None:
    server = MotoS3Server(tmp_path / "moto").start()
    try:
        store = s3_store(server.endpoint, "stopped-bucket", server.access_key, server.secret_key)
        store.ensure_bucket()
        assert store.create("k", b"v")
    finally:
        server.stop()
    for call in (
        lambda: store.create("k2", b"v"),
        lambda: store.put("k2", b"v"),
        lambda: store.get("k"),
        lambda: store.exists("k"),
        lambda: store.delete("k"),
        lambda: list(store.list("")),
        store.check,
        store.ensure_bucket,
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            call()
        assert time.monotonic() - started < 5


@pytest.fixture
def unresponsive_endpoint() -> Iterator[str]:
    """A port whose accept queue is full: connection attempts hang, like a firewalled S3 endpoint."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in [*fillers, listener]:
            s.close()


def test_unresponsive_s3_endpoint_times_out_within_seconds(unresponsive_endpoint: str) -> None:
    store = s3_store(unresponsive_endpoint, "any-bucket", "ak", "sk")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.get("k")
    elapsed = time.monotonic() - started
    assert elapsed < 6, f"took {elapsed:.1f} s"


def test_missing_bucket_is_unavailable_not_absent(s3_bucket: dict[str, str]) -> None:
    b = s3_bucket
    store = s3_store(b["endpoint"], "no-such-bucket-here", b["access_key"], b["secret_key"])
    for call in (lambda: store.get("k"), lambda: store.create("k", b"v"), store.check):
        with pytest.raises(StorageUnavailable):
            call()
    store.ensure_bucket()
    store.check()
    assert store.create("k", b"v")


@pytest.mark.ceph
def test_ceph_enforces_create_only_with_a_real_server(ceph_rgw: CephRGW) -> None:
    store = s3_store(ceph_rgw.endpoint, f"t-{uuid.uuid4().hex[:16]}", ceph_rgw.access_key, ceph_rgw.secret_key)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    assert store.create("k", b"first")
    raw = ceph_rgw.client().get_object(Bucket=store.bucket, Key="k")["Body"].read()
    assert raw == b"first"
    assert store.create("k", b"second") is False


@pytest.mark.ceph
def test_ceph_wrong_credentials_are_unavailable(ceph_rgw: CephRGW) -> None:
    good = s3_store(ceph_rgw.endpoint, f"t-{uuid.uuid4().hex[:16]}", ceph_rgw.access_key, ceph_rgw.secret_key)
    good.ensure_bucket()
    assert good.create("k", b"v")
    wrong_secret = "not-" + ceph_rgw.secret_key
    for bad in (
        s3_store(ceph_rgw.endpoint, good.bucket, ceph_rgw.access_key, wrong_secret),
        s3_store(ceph_rgw.endpoint, good.bucket, "AKUNKNOWN0000000", ceph_rgw.secret_key),
    ):
        for call in (
            lambda bad=bad: bad.get("k"),
            lambda bad=bad: bad.create("k2", b"v"),
            lambda bad=bad: bad.put("k", b"overwritten"),
            lambda bad=bad: list(bad.list("")),
            bad.check,
        ):
            with pytest.raises(StorageUnavailable) as info:
                call()
            assert ceph_rgw.secret_key not in str(info.value)
            assert wrong_secret not in str(info.value)
    assert good.get("k") == b"v"
    assert good.get("k2") is None


def test_store_modules_import_without_the_web_layer() -> None:
    """Protocol code and workers import the store; it must not pull in Flask."""
    code = _STORE_ONLY + (
        "from bridge.store import objects, filesystem, s3\n"
        "assert objects.FileObjectStore is filesystem.FileObjectStore\n"
        "assert objects.S3ObjectStore is s3.S3ObjectStore\n"
        "print('flask' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True)
    assert result.stdout.strip() == b"False"


def test_exists_without_reading(store: ObjectStore) -> None:
    assert store.exists("mail/a@b.c/1.jwe") is False
    assert store.create("mail/a@b.c/1.jwe", b"sealed")
    assert store.exists("mail/a@b.c/1.jwe") is True
    assert store.create("mail/a@b.c/empty", b"")
    assert store.exists("mail/a@b.c/empty") is True
    assert store.exists("mail/a@b.c") is False  # a prefix of other keys is no object (get says None too)
    store.delete("mail/a@b.c/1.jwe")
    assert store.exists("mail/a@b.c/1.jwe") is False
    with pytest.raises(ValueError):
        store.exists("../outside")


def test_exists_on_a_missing_bucket_or_store_is_unavailable_not_absent(
    s3_bucket: dict[str, str], tmp_path: Path
) -> None:
    """A dedupe check that said "absent" here would make a retry store its delivery again."""
    b = s3_bucket
    with pytest.raises(StorageUnavailable):
        s3_store(b["endpoint"], "no-such-bucket-here", b["access_key"], b["secret_key"]).exists("k")
    root = tmp_path / "objects"
    store = FileObjectStore(root)
    assert store.create("mail/a@b.c/1", b"x")
    shutil.rmtree(root)
    with pytest.raises(StorageUnavailable):
        store.exists("mail/a@b.c/1")
