"""Local-disk backend: a directory acts as a bucket.

Key ``a/b/c`` is the file ``ROOT/a/b/c``, so a bucket directory is browsable with ordinary
tools and files dropped into it show up in the mount.  User metadata lives in the xattr
``user.cloudfs.meta`` (JSON) of the data file; a directory marker ``a/b/`` is the directory
``ROOT/a/b`` carrying the xattr ``user.cloudfs.dir``.  Puts write a temp file in
``ROOT/.cloudfs-tmp`` and rename it into place, so readers never see half an object.  That
folder exists only while it holds something (a put in progress, an open multipart upload):
it is made on demand and removed when the backend closes empty.

Keys can never escape ROOT: every component is checked (no ``..``, ``.``, empty parts or
absolute paths) and the resolved path must stay below the root.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from typing import BinaryIO

from .base import Backend, Capabilities, ListPage, ObjectInfo, PartInfo, Payload
from .errors import (
    AlreadyExists,
    BackendError,
    BucketNotFound,
    ConfigError,
    InvalidName,
    NameTooLong,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
)

META_XATTR = "user.cloudfs.meta"
DIR_XATTR = "user.cloudfs.dir"
TMP_DIR = ".cloudfs-tmp"
CHUNK = 1024 * 1024


class LocalBackend(Backend):
    scheme = "file"
    capabilities = Capabilities(
        max_key_bytes=4096,
        max_metadata_bytes=60 * 1024,
        min_part_size=1,
        max_part_size=2**40,
        max_parts=100_000,
        listing_has_metadata=True,
        part_copy=True,
        conditional_writes=True,
        atomic_conditional_put=True,
    )

    def __init__(self, root: str, prefix: str = "", **kw: object) -> None:
        super().__init__(bucket=os.path.abspath(root), prefix=prefix, **kw)  # type: ignore[arg-type]
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, TMP_DIR)

    @classmethod
    def from_url(cls, netloc: str, path: str, options: dict[str, str]) -> LocalBackend:
        if netloc not in ("", "localhost"):
            raise ConfigError("file:// URLs name a local directory: file:///path/to/bucket")
        if not path:
            raise ConfigError("file:// URL needs a directory: file:///path/to/bucket")
        return cls(path)

    def describe(self) -> str:
        return f"file://{self.root}/{self.prefix}"

    # ------------------------------------------------------------------ helpers
    def _path(self, key: str) -> str:
        """Map a key to a path below root, refusing anything that could escape it."""
        trailing = key.endswith("/")
        parts = key.rstrip("/").split("/") if key.rstrip("/") else []
        if parts and parts[0] == TMP_DIR:
            raise InvalidName(f"{TMP_DIR} is reserved by the local backend")
        for part in parts:
            if part in ("", ".", ".."):
                raise InvalidName(f"key component {part!r} cannot be stored on local disk")
            if len(part.encode()) > 255:
                raise NameTooLong("a key component is longer than 255 bytes")
        path = os.path.join(self.root, *parts)
        real_parent = os.path.realpath(os.path.dirname(path) if parts else path)
        if not (real_parent + "/").startswith(self.root + "/") and real_parent != self.root:
            raise InvalidName("key escapes the bucket root")
        return path + ("/" if trailing and parts else "")

    @staticmethod
    def _etag(st: os.stat_result) -> str:
        raw = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
        return hashlib.md5(raw, usedforsecurity=False).hexdigest()

    @staticmethod
    def _read_meta(path: str) -> dict[str, str]:
        try:
            return json.loads(os.getxattr(path, META_XATTR, follow_symlinks=False))
        except OSError:
            return {}

    def _info(self, key: str, path: str, st: os.stat_result | None = None) -> ObjectInfo:
        st = st or os.stat(path, follow_symlinks=False)
        size = 0 if key.endswith("/") else st.st_size
        return ObjectInfo(key, size, self._etag(st), st.st_mtime, self._read_meta(path))

    def _translate(self, exc: Exception) -> BackendError | None:
        if isinstance(exc, OSError):
            name = os.path.relpath(exc.filename, self.root) if exc.filename else ""
            if exc.errno == errno.ENOENT:
                return NotFound(f"{name}: no such object")
            if exc.errno in (errno.EACCES, errno.EPERM):
                return PermissionDenied(f"{name}: permission denied")
            if exc.errno == errno.ENAMETOOLONG:
                return NameTooLong(f"{name}: name too long")
            if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY):
                return AlreadyExists(f"{name}: a file and a folder would share this name")
            return BackendError(f"local disk: {os.strerror(exc.errno or errno.EIO)}")
        return None

    # ------------------------------------------------------------------ primitives
    def _check_bucket(self) -> None:
        if not os.path.isdir(self.root):
            raise BucketNotFound(f"bucket directory {self.root} does not exist")
        probe = self._tmpfile()
        try:
            os.setxattr(probe, META_XATTR, b"{}")
        except OSError as exc:
            raise ConfigError(f"{self.root}: file system does not support user xattrs") from exc
        finally:
            os.unlink(probe)
            self._remove_tmp_dir()

    def _list_page(self, prefix: str, delimiter: str | None, token: str | None, limit: int) -> ListPage:
        keys = self._list_keys(prefix, delimiter)
        start = 0
        if token:
            # Keys are sorted: continue after the last one returned.
            start = bisect.bisect_right([k for k, _ in keys], token)
        page = ListPage()
        chunk = keys[start:start + limit]
        for key, path in chunk:
            if delimiter and key.endswith(delimiter) and key != prefix and path == "":
                page.prefixes.append(key)
                continue
            try:
                page.objects.append(self._info(key, path.rstrip("/")))
            except FileNotFoundError:
                continue
        if start + limit < len(keys):
            page.next_token = chunk[-1][0]
        return page

    def _list_keys(self, prefix: str, delimiter: str | None) -> list[tuple[str, str]]:
        """Sorted (key, path) pairs; path '' marks a common prefix."""
        head, _, name_prefix = prefix.rpartition("/")
        base = os.path.join(self.root, *(head.split("/") if head else []))
        out: list[tuple[str, str]] = []
        keybase = head + "/" if head else ""

        def walk(dirpath: str, kb: str, np: str) -> None:
            try:
                entries = list(os.scandir(dirpath))
            except (FileNotFoundError, NotADirectoryError):
                return
            for ent in entries:
                if not ent.name.startswith(np) or (not kb and ent.name == TMP_DIR):
                    continue
                key = kb + ent.name
                if ent.is_dir(follow_symlinks=False):
                    if delimiter == "/":
                        out.append((key + "/", ""))
                    else:
                        if _has_xattr(ent.path, DIR_XATTR):
                            out.append((key + "/", ent.path + "/"))
                        walk(ent.path, key + "/", "")
                elif ent.is_file(follow_symlinks=False):
                    out.append((key, ent.path))

        if name_prefix == "" and prefix and _has_xattr(base, DIR_XATTR):
            out.append((prefix, base + "/"))  # the directory marker itself, as S3 lists it
        walk(base, keybase, name_prefix)
        out.sort()
        return out

    def _head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if key.endswith("/"):
            if not _has_xattr(path, DIR_XATTR):
                raise NotFound(f"{key}: no such object")
            return self._info(key, path.rstrip("/"))
        if not os.path.isfile(path):
            raise NotFound(f"{key}: no such object")
        return self._info(key, path)

    def _get_into(self, key: str, start: int, length: int | None, out: BinaryIO,
                  if_match: str | None) -> None:
        path = self._path(key)
        if key.endswith("/"):
            return
        with open(path, "rb") as f:
            if if_match and self._etag(os.fstat(f.fileno())) != if_match:
                raise PreconditionFailed(f"{key}: changed since it was read")
            f.seek(start)
            remaining = length
            while remaining is None or remaining > 0:
                data = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not data:
                    break
                out.write(data)
                if remaining is not None:
                    remaining -= len(data)

    def _tmpfile(self) -> str:
        """A new empty temp file.  Another mount of the same folder may remove the empty
        temp folder at any moment (``_remove_tmp_dir``), so it is made again if it vanished."""
        path = os.path.join(self.tmp, uuid.uuid4().hex)
        for _ in range(3):
            os.makedirs(self.tmp, exist_ok=True)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                return path
            except FileNotFoundError:
                continue
        raise BackendError(f"local disk: {self.tmp} keeps vanishing")

    def _remove_tmp_dir(self) -> None:
        """Remove the temp folder if nothing is in it (it holds open multipart uploads)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.tmp)

    def close(self) -> None:
        self._remove_tmp_dir()

    def _check_conditions(self, key: str, path: str, if_match: str | None, if_none_match: bool) -> None:
        if not (if_match or if_none_match):
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if if_match:
                raise PreconditionFailed(f"{key}: object is gone") from None
            return
        if if_none_match:
            raise PreconditionFailed(f"{key}: object exists")
        if if_match and self._etag(st) != if_match:
            raise PreconditionFailed(f"{key}: object changed")

    def _commit(self, tmp: str, key: str, path: str, metadata: dict[str, str]) -> str:
        os.setxattr(tmp, META_XATTR, json.dumps(metadata).encode())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isdir(path):
            raise AlreadyExists(f"{key}: a folder has this name")
        os.rename(tmp, path)
        return self._etag(os.stat(path))

    def _put(self, key: str, payload: Payload, metadata: dict[str, str], if_match: str | None,
             if_none_match: bool) -> str:
        path = self._path(key)
        if key.endswith("/"):
            os.makedirs(path, exist_ok=True)
            os.setxattr(path, DIR_XATTR, b"1")
            os.setxattr(path, META_XATTR, json.dumps(metadata).encode())
            return self._etag(os.stat(path))
        tmp = self._tmpfile()
        try:
            with payload.open() as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            self._check_conditions(key, path, if_match, if_none_match)
            return self._commit(tmp, key, path, metadata)
        finally:
            _unlink_quiet(tmp)

    def _set_metadata(self, key: str, metadata: dict[str, str]) -> str:
        path = self._path(key).rstrip("/")
        os.setxattr(path, META_XATTR, json.dumps(metadata).encode())
        return self._etag(os.stat(path))

    def _copy(self, src: str, dst: str, metadata: dict[str, str] | None) -> str:
        spath, dpath = self._path(src), self._path(dst)
        if src.endswith("/"):
            meta = self._read_meta(spath.rstrip("/")) if metadata is None else metadata
            return self._put(dst, Payload.from_bytes(b""), meta, None, False)
        if not os.path.isfile(spath):
            raise NotFound(f"{src}: no such object")
        meta = self._read_meta(spath) if metadata is None else metadata
        if spath == dpath:
            return self._set_metadata(dst, meta)
        tmp = self._tmpfile()
        try:
            shutil.copyfile(spath, tmp)
            return self._commit(tmp, dst, dpath, meta)
        finally:
            _unlink_quiet(tmp)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if key.endswith("/"):
                os.removexattr(path.rstrip("/"), DIR_XATTR)
            else:
                os.unlink(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODATA, errno.ENOTDIR, errno.EISDIR):
                raise
        self._prune(os.path.dirname(path.rstrip("/")) if not key.endswith("/") else path.rstrip("/"))

    def _prune(self, directory: str) -> None:
        """Remove folders left empty, as a prefix vanishes on S3 when its last object goes."""
        while directory.startswith(self.root + "/") and not _has_xattr(directory, DIR_XATTR):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    # Multipart: parts are files in a per-upload folder, concatenated on completion.
    def _mpu_dir(self, upload_id: str) -> str:
        if not upload_id.isalnum():
            raise InvalidName("bad upload id")
        return os.path.join(self.tmp, "mpu-" + upload_id)

    def _mpu_create(self, key: str, metadata: dict[str, str]) -> str:
        self._path(key)
        upload_id = uuid.uuid4().hex
        os.makedirs(self._mpu_dir(upload_id))
        with open(os.path.join(self._mpu_dir(upload_id), "meta.json"), "w") as f:
            json.dump({"key": key, "metadata": metadata}, f)
        return upload_id

    def _part_path(self, upload_id: str, number: int) -> str:
        d = self._mpu_dir(upload_id)
        if not os.path.isdir(d):
            raise NotFound("no such multipart upload")
        return os.path.join(d, f"{number:06d}")

    def _mpu_part(self, key: str, upload_id: str, number: int, payload: Payload) -> str:
        part = self._part_path(upload_id, number)
        with payload.open() as src, open(part + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        os.rename(part + ".tmp", part)
        return self._etag(os.stat(part))

    def _mpu_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int,
                       length: int, src_etag: str | None) -> str:
        part = self._part_path(upload_id, number)
        with open(part + ".tmp", "wb") as dst:
            self._get_into(src_key, start, length, dst, src_etag)
        os.rename(part + ".tmp", part)
        return self._etag(os.stat(part))

    def _mpu_complete(self, key: str, upload_id: str, parts: list[PartInfo]) -> str:
        d = self._mpu_dir(upload_id)
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        tmp = self._tmpfile()
        try:
            with open(tmp, "wb") as dst:
                for p in parts:
                    path = self._part_path(upload_id, p.number)
                    if self._etag(os.stat(path)) != p.etag:
                        raise PreconditionFailed(f"part {p.number} does not match its ETag")
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, dst, CHUNK)
            etag = self._commit(tmp, key, self._path(key), meta["metadata"])
        finally:
            _unlink_quiet(tmp)
        shutil.rmtree(d, ignore_errors=True)
        return etag

    def _mpu_abort(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self._mpu_dir(upload_id), ignore_errors=True)


def _has_xattr(path: str, name: str) -> bool:
    try:
        os.getxattr(path, name, follow_symlinks=False)
        return True
    except OSError:
        return False


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

