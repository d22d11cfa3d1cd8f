"""Interoperability through a real mount: objects written with each store's own SDK (shaped as
s3fs, rclone, gsutil, gcsfuse, blobfuse2, the b2 CLI and the swift CLI write them) appear
correctly, and what the mount writes reads back with the plain SDK."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import CLOUDFS, Mount
from tests.servers import Target, require

SWIFT_META = "x-object-meta-"


class Raw:
    """Put/get objects with the store's own SDK, bypassing cloudfs."""

    def __init__(self, target: Target) -> None:
        self.t = target

    def put(self, key: str, data: bytes, meta: dict[str, str] | None = None) -> None:
        meta = meta or {}
        kind, sdk = self.t.backend, self.t.sdk
        if kind == "s3":
            sdk.put_object(Bucket=self.t.url[5:], Key=key, Body=data, Metadata=meta)
        elif kind == "azure":
            sdk.upload_blob(key, data, metadata=meta, overwrite=True)
        elif kind == "gcs":
            blob = sdk.bucket(self.t.extra["bucket"]).blob(key)
            blob.metadata = meta
            blob.upload_from_string(data)
        elif kind == "b2":
            sdk.upload_bytes(data, b2_name(key), file_info=meta)
        elif kind == "swift":
            sdk.put_object(self.t.extra["container"], key, data,
                           headers={f"X-Object-Meta-{k}": v for k, v in meta.items()})
        else:
            path = self.t.extra["root"] / key
            path.parent.mkdir(parents=True, exist_ok=True)
            if key.endswith("/"):  # the local backend's directory marker
                path.mkdir(exist_ok=True)
                os.setxattr(path, "user.cloudfs.dir", b"1")
            else:
                path.write_bytes(data)
            if meta:
                os.setxattr(path, "user.cloudfs.meta", json.dumps(meta).encode())

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        kind, sdk = self.t.backend, self.t.sdk
        if kind == "s3":
            r = sdk.get_object(Bucket=self.t.url[5:], Key=key)
            return r["Body"].read(), r["Metadata"]
        if kind == "azure":
            blob = sdk.get_blob_client(key)
            return blob.download_blob().readall(), dict(blob.get_blob_properties().metadata)
        if kind == "gcs":
            blob = sdk.bucket(self.t.extra["bucket"]).get_blob(key)
            return blob.download_as_bytes(), dict(blob.metadata or {})
        if kind == "b2":
            downloaded = sdk.download_file_by_name(b2_name(key))
            out = io.BytesIO()
            downloaded.save(out)
            return out.getvalue(), dict(downloaded.download_version.file_info)
        if kind == "swift":
            headers, body = sdk.get_object(self.t.extra["container"], key)
            # Swift stores "_" and "-" in metadata names alike (WSGI folds them) and answers in
            # lower case, so names are compared in cloudfs's spelling.
            return body, {k[len(SWIFT_META):].replace("-", "_"): v for k, v in headers.items()
                          if k.startswith(SWIFT_META)}
        path = self.t.extra["root"] / key
        meta = json.loads(os.getxattr(path, "user.cloudfs.meta")) if path.is_file() else {}
        return (path.read_bytes() if path.is_file() else b""), meta

    def exists(self, key: str) -> bool:
        try:
            self.get(key)
            return True
        except Exception:
            return False


def b2_name(key: str) -> str:
    """B2 names cannot end in '/': a folder is marked as its web UI does, with ``.bzEmpty``."""
    return key + ".bzEmpty" if key.endswith("/") else key


@pytest.fixture
def raw(target: Target) -> Raw:
    return Raw(target)


def settle() -> None:
    time.sleep(1.2)  # attr_timeout=1 in test mounts: new objects become visible


def test_s3fs_style_objects_appear(mnt: Mount, raw: Raw) -> None:
    raw.put("tool/s3fs-exec", b"#!/bin/sh\n", {"mode": "33261", "uid": "1000", "gid": "100",
                                               "mtime": "1600000000.500000000"})
    raw.put("tool/plain", b"no metadata at all")
    raw.put("tool/emptydir/", b"", {"mode": "16832"})  # 0700 directory marker
    settle()
    st = (mnt.path / "tool" / "s3fs-exec").stat()
    assert st.st_mode == stat.S_IFREG | 0o755
    assert (st.st_uid, st.st_gid) == (1000, 100)
    assert st.st_mtime_ns == 1_600_000_000_500_000_000
    assert (mnt.path / "tool" / "plain").read_bytes() == b"no metadata at all"
    assert stat.S_IMODE((mnt.path / "tool" / "plain").stat().st_mode) == 0o644
    assert sorted(os.listdir(mnt.path / "tool")) == ["emptydir", "plain", "s3fs-exec"]
    assert stat.S_ISDIR((mnt.path / "tool" / "emptydir").stat().st_mode)


def test_s3fs_style_folder_marker_mode(mnt: Mount, raw: Raw) -> None:
    require(mnt.target, "folder_attributes")
    raw.put("tool/emptydir/", b"", {"mode": "16832"})  # 0700 directory marker
    settle()
    assert (mnt.path / "tool" / "emptydir").stat().st_mode == stat.S_IFDIR | 0o700


@pytest.mark.backends("local", "s3")
def test_modes_of_objects_without_metadata_come_from_the_options(target: Target, raw: Raw,
                                                                 tmp_path: Path) -> None:
    raw.put("plain/file", b"no metadata at all")
    raw.put("plain/own", b"s3fs", {"mode": "33188"})
    explicit = {"umask": "077", "file_mode": "0640", "dir_mode": "0750"}
    for options, file_mode, dir_mode in (({"umask": "077"}, 0o600, 0o700), (explicit, 0o640, 0o750)):
        m = Mount(target, tmp_path / "mnt", tmp_path / "cache", options)
        m.start()
        try:
            assert stat.S_IMODE((m.path / "plain" / "file").stat().st_mode) == file_mode
            assert stat.S_IMODE((m.path / "plain").stat().st_mode) == dir_mode
            assert stat.S_IMODE(m.path.stat().st_mode) == dir_mode
            assert stat.S_IMODE((m.path / "plain" / "own").stat().st_mode) == 0o644  # its own mode
        finally:
            m.cleanup()
    for bad in ("umask=8", "file_mode=1777", "dir_mode=rwx"):
        proc = subprocess.run([CLOUDFS, "mount", target.url, str(tmp_path / "mnt"), "-o", bad],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **target.env})
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (bad, proc.stderr)


def test_rclone_style_objects_appear(mnt: Mount, raw: Raw) -> None:
    raw.put("rc/file", b"rclone", {"mtime": "1354040105.5", "mode": "100664"})
    settle()
    st = (mnt.path / "rc" / "file").stat()
    assert st.st_mtime_ns == 1_354_040_105_500_000_000  # .5 s, not 5 ns
    assert st.st_mode == stat.S_IFREG | 0o664


def test_s3fs_symlink_object(mnt: Mount, raw: Raw) -> None:
    raw.put("ln", b"target/file", {"mode": str(stat.S_IFLNK | 0o777)})
    settle()
    assert os.readlink(mnt.path / "ln") == "target/file"


@pytest.mark.backends("azure")
def test_blobfuse2_folder_and_symlink(mnt: Mount, raw: Raw) -> None:
    raw.put("bf", b"", {"hdi_isfolder": "true"})
    raw.put("bf-link", b"bf", {"is_symlink": "true"})
    settle()
    assert stat.S_ISDIR((mnt.path / "bf").stat().st_mode)
    assert os.listdir(mnt.path / "bf") == []
    assert os.readlink(mnt.path / "bf-link") == "bf"


@pytest.mark.backends("gcs")
def test_gcsfuse_and_gsutil_metadata(mnt: Mount, raw: Raw) -> None:
    raw.put("g/fuse", b"x", {"gcsfuse_mtime": "2024-01-02T03:04:05.123456789Z"})
    raw.put("g/util", b"y", {"goog-reserved-file-mtime": "1700000000", "goog-reserved-posix-mode": "600"})
    settle()
    assert (mnt.path / "g" / "fuse").stat().st_mtime_ns == 1_704_164_645_123_456_789
    st = (mnt.path / "g" / "util").stat()
    assert st.st_mtime_ns == 1_700_000_000 * 10**9 and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.backends("b2")
def test_b2_cli_and_web_ui_files(mnt: Mount, raw: Raw) -> None:
    raw.put("b2/cli.txt", b"uploaded by b2", {"src_last_modified_millis": "1600000000123"})
    raw.put("b2/folder/", b"")  # the web UI's "create folder": b2/folder/.bzEmpty
    raw.put("b2/gone", b"hidden")
    mnt.target.sdk.hide_file("b2/gone")
    settle()
    st = (mnt.path / "b2" / "cli.txt").stat()
    assert st.st_size == len(b"uploaded by b2") and st.st_mtime_ns == 1_600_000_000_123_000_000
    assert sorted(os.listdir(mnt.path / "b2")) == ["cli.txt", "folder"]  # hidden files never show
    assert os.listdir(mnt.path / "b2" / "folder") == []
    assert not (mnt.path / "b2" / "gone").exists()


@pytest.mark.backends("b2")
def test_b2_rm_hides_and_hard_delete_removes_versions(target: Target, tmp_path: Path) -> None:
    def versions(name: str) -> list[str]:
        return [v.action for v in target.sdk.list_file_versions(name)]

    for options, expected in (({}, ["hide", "upload"]), ({"b2_hard_delete": ""}, [])):
        m = Mount(target, tmp_path / "mnt", tmp_path / "cache", options)
        m.start()
        try:
            name = f"rm-{len(options)}"
            (m.path / name).write_bytes(b"versioned")
            m.remount()
            os.unlink(m.path / name)
            m.stop()
        finally:
            m.cleanup()
        assert versions(name) == expected


def test_mount_writes_plain_objects(mnt: Mount, raw: Raw) -> None:
    (mnt.path / "out").mkdir()
    (mnt.path / "out" / "data.txt").write_bytes(b"plain bytes")
    os.chmod(mnt.path / "out" / "data.txt", 0o640)
    os.utime(mnt.path / "out" / "data.txt", ns=(1_700_000_000_000_000_001,) * 2)
    os.symlink("data.txt", mnt.path / "out" / "link")
    ctime = os.lstat(mnt.path / "out" / "data.txt").st_ctime_ns
    mnt.stop()
    body, meta = raw.get("out/data.txt")
    assert body == b"plain bytes"
    assert meta["mode"] == str(stat.S_IFREG | 0o640)  # s3fs: decimal st_mode with type bits
    assert meta["mtime"] == "1700000000.000000001"  # all 9 fraction digits
    assert meta["ctime"] == f"{ctime // 10**9}.{ctime % 10**9:09d}"  # s3fs's key, mtime's form
    assert meta["uid"] == str(os.getuid())
    body, meta = raw.get("out/link")
    assert body == b"data.txt" and int(meta["mode"]) == stat.S_IFLNK | 0o777
    if mnt.target.backend != "local":
        assert raw.exists("out/")  # the directory marker


def test_foreign_metadata_survives_chmod(mnt: Mount, raw: Raw) -> None:
    raw.put("keep", b"k", {"mtime": "1600000000", "owner_note": "from another tool"})
    settle()
    os.chmod(mnt.path / "keep", 0o600)
    _, meta = raw.get("keep")
    assert meta["owner_note"] == "from another tool"
    assert int(meta["mode"]) == stat.S_IFREG | 0o600


@pytest.mark.backends("s3")
def test_s3_write_options_through_the_mount(target: Target, tmp_path: Path) -> None:
    """-o storage_class and acl reach every object the mount writes, renames included, and the
    Content-Type follows the name (a bucket served as a website works)."""
    m = Mount(target, tmp_path / "mnt", tmp_path / "cache", {"storage_class": "STANDARD_IA",
                                                            "acl": "public-read"})
    m.start()
    try:
        (m.path / "page.html").write_bytes(b"<p>hi</p>")
        (m.path / "photo.jpg").write_bytes(b"\xff\xd8")
        m.stop()
        m.start()
        os.rename(m.path / "page.html", m.path / "index.html")
        m.stop()
    finally:
        m.kill()
    bucket = target.extra["bucket"]
    for key, content_type in (("index.html", "text/html"), ("photo.jpg", "image/jpeg")):
        head = target.sdk.head_object(Bucket=bucket, Key=key)
        assert (head.get("StorageClass"), head["ContentType"]) == ("STANDARD_IA", content_type), key
        grants = target.sdk.get_object_acl(Bucket=bucket, Key=key)["Grants"]
        assert any(g["Grantee"].get("URI", "").endswith("/AllUsers") for g in grants), key


@pytest.mark.backends("s3", "azure", "gcs", "b2", "swift")
def test_an_object_and_a_folder_of_the_same_name_show_the_object(mnt: Mount, raw: Raw) -> None:
    """Another tool wrote both `x` and `x/inner`: the listing shows one `x`, the object, as a
    lookup does; the log says once that the folder is not reachable."""
    raw.put("shadow/x", b"the object")
    raw.put("shadow/x/inner", b"below the folder")
    raw.put("shadow/y", b"y")
    settle()
    for _ in range(2):
        with os.scandir(mnt.path / "shadow") as it:
            kinds = {e.name: e.is_dir(follow_symlinks=False) for e in it}
        assert kinds == {"x": False, "y": False}
        assert stat.S_ISREG((mnt.path / "shadow" / "x").stat().st_mode)
        assert (mnt.path / "shadow" / "x").read_bytes() == b"the object"
    assert mnt.log().count("shadow/x is both an object and a folder") == 1
