"""Content-Type on every store whose SDK shows it: served through a website, a SAS or signed
link, `.html` stays a page.  The type comes from the name (Python's ``mimetypes``) for single
PUTs, multipart uploads and renames alike, or is the one of ``-o content_type=`` (the daemon
sets ``fixed_content_type``); a copy that keeps the metadata keeps the type too."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cloudfs.backends import Backend, Payload
from tests.servers import Target

from .test_contract import run

pytestmark = pytest.mark.backends("s3", "azure", "gcs", "b2", "swift")


def _azure(target: Target, key: str) -> str:
    return str(target.sdk.get_blob_client(key).get_blob_properties().content_settings.content_type)


def _gcs(target: Target, key: str) -> str:
    return str(target.sdk.bucket(target.extra["bucket"]).get_blob(key).content_type)


def _s3(target: Target, key: str) -> str:
    return str(target.sdk.head_object(Bucket=target.extra["bucket"], Key=key)["ContentType"])


def _b2(target: Target, key: str) -> str:
    return str(target.sdk.get_file_info_by_name(key).content_type)


def _swift(target: Target, key: str) -> str:
    return str(target.sdk.head_object(target.extra["container"], key)["content-type"])


STORED_TYPE: dict[str, Callable[[Target, str], str]] = {
    "azure": _azure, "gcs": _gcs, "s3": _s3, "b2": _b2, "swift": _swift}


def stored_types(target: Target, keys: list[str]) -> dict[str, str]:
    """The Content-Type of each key, read with the store's own SDK."""
    return {key: STORED_TYPE[target.backend](target, key) for key in keys}


def write_rename_and_copy(backend: Backend) -> None:
    """A page and a multipart photo (a Swift SLO, an Azure block list, a composed GCS object),
    both renamed as the mount renames a file (with its metadata), and a plain copy."""
    async def go() -> None:
        await backend.put("site/index.html", Payload.from_bytes(b"<p>hi</p>"), {"mode": "33188"})
        uid = await backend.mpu_create("site/photo.jpg", {})
        part = await backend.mpu_part("site/photo.jpg", uid, 1, Payload.from_bytes(b"\xff\xd8jpeg"))
        await backend.mpu_complete("site/photo.jpg", uid, [part])
        await backend.put("site/data.unknownext", Payload.from_bytes(b"?"), {})
        await backend.put("site/page.html", Payload.from_bytes(b"<p>page</p>"), {})
        await backend.move("site/index.html", "site/style.css", {"mode": "33188"})
        await backend.move("site/photo.jpg", "site/photo.png", {"mode": "33188"})
        await backend.copy("site/page.html", "site/kept.bin")  # metadata kept: so is the type

    run(go)


def test_content_type_follows_the_name(backend_name: str, target: Target, backend: Backend) -> None:
    write_rename_and_copy(backend)
    assert stored_types(target, ["site/data.unknownext", "site/page.html", "site/style.css",
                                 "site/photo.png", "site/kept.bin"]) == {
        "site/data.unknownext": "application/octet-stream", "site/page.html": "text/html",
        "site/style.css": "text/css", "site/photo.png": "image/png", "site/kept.bin": "text/html"}
    assert run(backend.head, "site/style.css").metadata == {"mode": "33188"}
    assert run(backend.get_range, "site/photo.png") == b"\xff\xd8jpeg"


def test_fixed_content_type(backend_name: str, target: Target, backend: Backend) -> None:
    """-o content_type=TYPE replaces the guess on every object written, renames included."""
    backend.fixed_content_type = "application/x-cloudfs-test"
    write_rename_and_copy(backend)
    keys = ["site/data.unknownext", "site/page.html", "site/style.css", "site/photo.png", "site/kept.bin"]
    assert stored_types(target, keys) == dict.fromkeys(keys, "application/x-cloudfs-test")
