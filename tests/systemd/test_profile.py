"""Profiles (/etc/cloudfs/NAME.conf), their permission rule, and sd_notify."""

from __future__ import annotations

import os
import socket

import pytest

from cloudfs import notify
from cloudfs.profile import ProfileError, load_env_file, load_profile, parse_env_file, resolve

BASIC = """\
url = "s3://my-bucket/photos"
mountpoint = "/mnt/photos"
options = { cache_size = "20G", allow_other = true, ro = false, transfers = 8 }
"""


@pytest.fixture
def confdir(tmp_path, monkeypatch):
    d = tmp_path / "etc-cloudfs"
    d.mkdir()
    monkeypatch.setenv("CLOUDFS_CONFIG_DIR", str(d))
    return d


def write(path, text, mode):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_bare_name_resolves_in_config_dir(confdir, monkeypatch):
    assert resolve("photos") == confdir / "photos.conf"
    assert resolve("./x.conf").name == "x.conf"
    assert str(resolve("/srv/p.conf")) == "/srv/p.conf"
    monkeypatch.delenv("CLOUDFS_CONFIG_DIR")
    assert str(resolve("photos")) == "/etc/cloudfs/photos.conf"
    for bad in ("..", "-x", "a b", ""):
        with pytest.raises(ProfileError):
            resolve(bad)


def test_options_table(confdir):
    write(confdir / "photos.conf", BASIC, 0o644)  # no credentials: world-readable is fine
    p = load_profile("photos")
    assert (p.url, p.mountpoint) == ("s3://my-bucket/photos", "/mnt/photos")
    assert p.options == {"cache_size": "20G", "allow_other": "", "transfers": "8"}  # flags are ""
    assert p.env == {}


def test_options_string_same_as_dash_o(confdir):
    text = 'url = "file:///srv/b"\nmountpoint = "/mnt/b/"\noptions = "ro, cache_size=5G"\n'
    write(confdir / "a.conf", text, 0o600)
    p = load_profile("a")
    assert p.options == {"ro": "", "cache_size": "5G"}
    assert p.mountpoint == "/mnt/b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mountpoint = "/mnt/x"\n', "'url' is required"),
        ('url = "s3://b"\n', "'mountpoint' is required"),
        ('url = "s3://b"\nmountpoint = "rel/x"\n', "absolute"),
        ('url = "s3://b"\nmountpoint = "/m"\nmountpiont = "/x"\n', "unknown key(s) mountpiont"),
        ('url = "s3://b"\nmountpoint = "/m"\noptions = 3\n', "'options' must be"),
        ('url = "s3://b"\nmountpoint = "/m"\noptions = { a = [1] }\n', "option 'a'"),
        ('url = "s3://b"\nmountpoint = "/m"\n[environment]\nA = 1\n', "environment entry 'A'"),
        ("url = \n", "not valid TOML"),
    ],
)
def test_invalid_profiles_are_refused_clearly(confdir, text, message):
    write(confdir / "bad.conf", text, 0o600)
    with pytest.raises(ProfileError, match=r".*") as exc:
        load_profile("bad")
    assert message in str(exc.value)
    assert str(confdir / "bad.conf") in str(exc.value)


def test_missing_profile(confdir):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("nope")


def test_profile_error_is_a_value_error():
    # the CLI reports (OSError, ValueError) from load_profile as a one-line message
    assert issubclass(ProfileError, ValueError)


INLINE = BASIC + '\n[environment]\nAWS_ACCESS_KEY_ID = "AKIA"\nAWS_SECRET_ACCESS_KEY = "s3cret"\n'


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602])
def test_inline_credentials_need_an_owner_only_profile(confdir, mode):
    write(confdir / "p.conf", INLINE, mode)
    with pytest.raises(ProfileError) as exc:
        load_profile("p")
    assert f"{mode:04o}" in str(exc.value)


def test_inline_credentials_in_private_profile(confdir):
    write(confdir / "p.conf", INLINE, 0o600)
    assert load_profile("p").env == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    write(confdir / "p.conf", INLINE, 0o400)
    assert load_profile("p").env["AWS_ACCESS_KEY_ID"] == "AKIA"


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_profile_writable_by_others_refused_even_without_credentials(confdir, mode):
    write(confdir / "p.conf", BASIC, mode)
    with pytest.raises(ProfileError, match="writable by group or others"):
        load_profile("p")


def test_profile_owned_by_someone_else_refused(confdir):
    write(confdir / "p.conf", BASIC, 0o644)
    os.chown(confdir / "p.conf", 12345, 0)
    with pytest.raises(ProfileError, match="owned by uid 12345"):
        load_profile("p")


def test_environment_file(confdir):
    text = "# creds\nexport AWS_ACCESS_KEY_ID=AKIA\n\nAWS_SECRET_ACCESS_KEY='a=b c'\n"
    text += '; comment\nAWS_REGION="eu-west-1"\n'
    envf = write(confdir / "p.env", text, 0o600)
    write(confdir / "p.conf", BASIC + 'environment_file = "p.env"\n[environment]\nAWS_REGION = "us-east-1"\n',
          0o600)  # fmt: skip
    p = load_profile("p")
    assert p.env == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "a=b c", "AWS_REGION": "us-east-1"}
    envf.chmod(0o640)
    with pytest.raises(ProfileError, match=r"environment file .*p\.env holds credentials.*chmod 600"):
        load_profile("p")


def test_environment_file_alone_keeps_profile_world_readable(confdir):
    write(confdir / "p.env", "A=1\n", 0o600)
    write(confdir / "p.conf", BASIC + f'environment_file = "{confdir}/p.env"\n', 0o644)
    assert load_profile("p").env == {"A": "1"}


def test_environment_file_missing_or_malformed(confdir):
    write(confdir / "p.conf", BASIC + 'environment_file = "/nonexistent/p.env"\n', 0o644)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("p")
    with pytest.raises(ProfileError, match=":2: expected KEY=VALUE"):
        parse_env_file("A=1\nnot an assignment\n", "x.env")
    d = confdir / "dir.env"
    d.mkdir(mode=0o700)
    with pytest.raises(ProfileError, match="not a regular file"):
        load_env_file(d)


# --- sd_notify -----------------------------------------------------------------------------


def test_sd_notify_without_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert notify.sd_notify("READY=1") is False


def test_sd_notify_path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify.sd_notify("READY=1\nSTATUS=Mounted x") is True
        s.settimeout(5)
        assert s.recv(4096) == b"READY=1\nSTATUS=Mounted x"


def test_sd_notify_abstract_socket(monkeypatch):
    name = f"cloudfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.sd_notify("STOPPING=1") is True
        s.settimeout(5)
        assert s.recv(4096) == b"STOPPING=1"


def test_sd_notify_dead_socket_does_not_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.sd_notify("READY=1") is False
