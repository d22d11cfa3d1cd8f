"""Azure backend against Azurite: interop with the Azure SDK and blobfuse2, credentials, errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from cloudfs.backends import Backend, Payload, open_backend
from cloudfs.backends.azure import AzureBackend, decode_meta_key, encode_meta_key
from cloudfs.backends.base import RetryPolicy
from cloudfs.backends.errors import (
    AuthenticationFailed,
    BackendError,
    BucketNotFound,
    ConfigError,
    NameTooLong,
    NotFound,
    Transient,
)
from tests.servers import Target
from tests.servers.process import free_port

from .test_contract import list_all, put, run

pytestmark = pytest.mark.backends("azure")

WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="


def conn_string(target: Target, key: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={target.extra['account']};AccountKey={key};"
            f"BlobEndpoint={target.extra['endpoint']};")


def test_sdk_blobs_and_blobfuse_folders_show_through(backend_name: str, target: Target,
                                                      backend: Backend) -> None:
    c = target.sdk
    c.upload_blob("folder", b"", metadata={"hdi_isfolder": "true"})
    c.upload_blob("folder/child.txt", b"child", metadata={"Mode": "33188"})
    c.upload_blob("emptyfolder", b"", metadata={"hdi_isfolder": "true"})
    c.upload_blob("link", b"folder/child.txt", metadata={"is_symlink": "true"})
    c.upload_blob("plain.txt", b"plain")

    keys, prefixes = list_all(backend, "")
    assert keys == ["link", "plain.txt"]
    assert prefixes == ["emptyfolder/", "folder/"]
    keys, prefixes = list_all(backend, "folder/")
    assert keys == ["folder/child.txt"] and prefixes == []
    keys, _ = list_all(backend, "", None)
    assert keys == ["emptyfolder/", "folder/", "folder/child.txt", "link", "plain.txt"]

    info = run(backend.head, "folder/")
    assert info.key == "folder/" and info.size == 0 and info.metadata == {}
    assert run(backend.head, "emptyfolder/").key == "emptyfolder/"
    with pytest.raises(NotFound):
        run(backend.head, "folder")  # the folder blob is a directory, not a file
    assert run(backend.get_range, "folder/") == b""
    link = run(backend.head, "link")
    assert link.metadata == {"is_symlink": "true"}
    assert run(backend.get_range, "link") == b"folder/child.txt"
    assert run(backend.head, "folder/child.txt").metadata == {"mode": "33188"}

    page = run(backend.list_page, "", "/")
    by_key = {o.key: o for o in page.objects}
    assert by_key["link"].metadata == {"is_symlink": "true"}  # listings carry metadata

    # Deleting the marker removes the blobfuse2 folder blob, not a file of the same name.
    run(backend.delete, "emptyfolder/")
    assert [b.name for b in c.list_blobs(name_starts_with="emptyfolder")] == []


def test_folder_blob_and_its_prefix_merge_across_pages(backend_name: str, target: Target,
                                                       backend: Backend) -> None:
    c = target.sdk
    c.upload_blob("d/f", b"", metadata={"hdi_isfolder": "true"})
    for name in ("d/f-1", "d/f-2", "d/f-3", "d/f/x", "d/g"):
        c.upload_blob(name, b"x")
    for limit in (1, 2, 3, 1000):
        keys, prefixes = list_all(backend, "d/", "/", limit)
        assert keys == ["d/f-1", "d/f-2", "d/f-3", "d/g"], limit
        assert prefixes == ["d/f/"], limit


def test_backend_writes_read_back_with_sdk(backend_name: str, target: Target, backend: Backend) -> None:
    c = target.sdk
    meta = {"mode": "33188", "uid": "1000", "content-type": "text/plain", "1st": "a", "ü": "b",
            "a_x2d_": "c"}
    etag = put(backend, "w/file.txt", b"hello azure", meta)
    props = c.get_blob_client("w/file.txt").get_blob_properties()
    assert props.etag == etag
    assert props.size == 11
    assert c.download_blob("w/file.txt").readall() == b"hello azure"
    stored = dict(props.metadata)
    assert stored["mode"] == "33188" and stored["uid"] == "1000"
    assert all(k.isascii() and (k[0].isalpha() or k[0] == "_") and k.replace("_", "").isalnum()
               for k in stored)
    assert run(backend.head, "w/file.txt").metadata == meta

    put(backend, "w/dir/", b"", {"mode": "16877"})
    marker = c.get_blob_client("w/dir/").get_blob_properties()
    assert marker.size == 0 and marker.metadata["hdi_isfolder"] == "true"
    assert run(backend.head, "w/dir/").metadata == {"mode": "16877"}

    # Multipart upload commits one block blob, parts in order.
    async def mpu() -> None:
        uid = await backend.mpu_create("w/big", {"mode": "33188"})
        p2 = await backend.mpu_part("w/big", uid, 2, Payload.from_bytes(b"world"))
        p1 = await backend.mpu_part("w/big", uid, 1, Payload.from_bytes(b"hello "))
        await backend.mpu_complete("w/big", uid, [p2, p1])

    run(mpu)
    assert c.download_blob("w/big").readall() == b"hello world"
    blocks, uncommitted = c.get_blob_client("w/big").get_block_list("all")
    assert len(blocks) == 2 and not uncommitted
    assert len({len(b.id) for b in blocks}) == 1

    run(backend.copy, "w/file.txt", "w/copy.txt")
    assert c.download_blob("w/copy.txt").readall() == b"hello azure"
    assert run(backend.head, "w/copy.txt").metadata == meta


def test_unknown_upload_id_is_not_found(backend_name: str, backend: Backend) -> None:
    with pytest.raises(NotFound):
        run(backend.mpu_complete, "u", "0" * 32, [])


def test_metadata_name_encoding_round_trips() -> None:
    for name in ("mode", "hdi_isfolder", "is_symlink", "content-type", "1st", "ü", "a_x2d_", "_x41_",
                 "x.y z", "__", "a-b-c"):
        enc = encode_meta_key(name)
        assert enc.isascii() and (enc[0].isalpha() or enc[0] == "_")
        assert enc.replace("_", "").isalnum() or set(enc) == {"_"}
        assert decode_meta_key(enc) == name
    assert encode_meta_key("mode") == "mode"


def test_bad_account_key_fails_check_without_leaking(backend_name: str, target: Target,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (WRONG_KEY, "not base64 at all!!"):
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn_string(target, key))
        b = open_backend(target.url)
        try:
            with pytest.raises(AuthenticationFailed) as err:
                run(b.check)
        finally:
            b.close()
        text = f"{err.value} {err.value!r} {b.describe()}"
        assert key not in text and key[:12] not in text
        assert target.extra["key"][:12] not in text


def test_key_and_sas_from_environment(backend_name: str, target: Target,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_BLOB_ENDPOINT", target.extra["endpoint"])
    monkeypatch.setenv("AZURE_STORAGE_KEY", target.extra["key"])
    b = open_backend(target.url)
    try:
        run(b.check)
        put(b, "k", b"by key")
    finally:
        b.close()

    sas = generate_container_sas(
        target.extra["account"], target.extra["container"], account_key=target.extra["key"],
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, add=True,
                                           create=True),
        expiry=datetime.now(UTC) + timedelta(hours=1))
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + sas)
    b = open_backend(target.url)
    try:
        run(b.check)
        assert run(b.get_range, "k") == b"by key"
        put(b, "s", b"by sas", {"mode": "33188"})
        run(b.copy, "s", "s2")
        assert run(b.get_range, "s2") == b"by sas"
        assert list_all(b, "")[0] == ["k", "s", "s2"]
        # A failure message never shows the SAS signature.
        with pytest.raises(NotFound) as err:
            run(b.head, "missing")
        assert "sig=" not in str(err.value)
    finally:
        b.close()


def test_connection_string_for_another_account(backend_name: str, target: Target,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       conn_string(target, target.extra["key"]).replace("devstoreaccount1;", "other;", 1))
    with pytest.raises(ConfigError) as err:
        open_backend(target.url)
    assert "other" in str(err.value) and target.extra["key"][:12] not in str(err.value)


def test_missing_container(backend_name: str, target: Target) -> None:
    b = open_backend(f"az://{target.extra['account']}/no-such-container")
    try:
        with pytest.raises(BucketNotFound):
            run(b.check)
        with pytest.raises(BucketNotFound):
            run(b.head, "x")
    finally:
        b.close()


def test_closed_port_fails_fast(backend_name: str, target: Target) -> None:
    b = AzureBackend(target.extra["account"], "c1", endpoint=f"http://127.0.0.1:{free_port()}/devstoreaccount1",
                     credential={"account_name": target.extra["account"], "account_key": target.extra["key"]},
                     retry=RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.05, call_timeout=5),
                     connection_timeout=1, read_timeout=1)
    start = time.monotonic()
    try:
        with pytest.raises(BackendError) as err:
            run(b.check)
    finally:
        b.close()
    assert isinstance(err.value, Transient)
    assert time.monotonic() - start < 5
    assert target.extra["key"][:12] not in str(err.value)


def test_name_too_long(backend_name: str, backend: Backend) -> None:
    with pytest.raises(NameTooLong):
        put(backend, "é" * 513, b"")  # 1026 bytes
    put(backend, "é" * 512, b"ok")  # exactly 1024 bytes
    assert run(backend.get_range, "é" * 512) == b"ok"


def test_bad_urls(backend_name: str, target: Target) -> None:
    for url in ("az://devstoreaccount1", "az://devstoreaccount1/Bad_Name", "az://host.example.com/c"):
        with pytest.raises(ConfigError):
            open_backend(url)
    with pytest.raises(ConfigError):
        open_backend(target.url, {"endpoint": "http://127.0.0.1:1/acct?sig=secret"})


def test_prefix_mount(backend_name: str, target: Target) -> None:
    target.sdk.upload_blob("pre/f", b"", metadata={"hdi_isfolder": "true"})
    target.sdk.upload_blob("outside", b"x")
    b = open_backend(target.url + "/pre")
    try:
        assert b.describe().startswith(f"{target.url}/pre/ at 127.0.0.1:")  # Azurite's endpoint
        put(b, "a/b", b"ab")
        assert target.sdk.download_blob("pre/a/b").readall() == b"ab"
        assert list_all(b, "") == ([], ["a/", "f/"])
        assert run(b.head, "f/").key == "f/"
    finally:
        b.close()
