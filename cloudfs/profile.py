"""Per-mount configuration files ("profiles") for ``cloudfs mount --profile`` and ``cloudfs@NAME.service``.

A profile is a TOML file, by default ``/etc/cloudfs/NAME.conf``::

    url = "s3://my-bucket/photos"
    mountpoint = "/mnt/photos"
    options = { cache_size = "20G", allow_other = true }   # or: options = "allow_other,cache_size=20G"
    environment_file = "/etc/cloudfs/photos.env"           # optional, KEY=VALUE lines

    [environment]                                          # optional, inline credentials
    AWS_ACCESS_KEY_ID = "..."
    AWS_SECRET_ACCESS_KEY = "..."

Options: a table maps ``name = value``; ``true`` means a flag (``ro``), ``false`` leaves it
out, anything else is turned into a string.  A flag is stored as the empty string in
:attr:`Profile.options` (``{"ro": ""}``), the same thing ``-o ro`` means.

Permission rule (the file is read by root and may hold secrets):

* An environment file always counts as credentials.  It must be a regular file owned by
  root or by the user loading it, and must not be readable or writable by group or others
  (``chmod 600``).
* A profile with a non-empty ``[environment]`` table holds credentials and follows the same
  rule.  A profile without credentials may be world-readable (``0644``).
* No profile may be writable by group or others or owned by another user, with or without
  credentials: whoever can edit it decides what root mounts and which file it reads.

A violation is refused with :class:`ProfileError` naming the file, its mode and the fix.

``NAME_OR_PATH``: anything containing ``/`` (or ending in ``.conf``) is a path; a bare name
is looked up as ``$CLOUDFS_CONFIG_DIR/NAME.conf`` (default directory ``/etc/cloudfs``).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_DIR = "/etc/cloudfs"
KNOWN_KEYS = {"url", "mountpoint", "options", "environment_file", "environment"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(ValueError):
    """A profile or environment file that cannot be used; the message says why and what to do."""


@dataclass
class Profile:
    url: str
    mountpoint: str
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    path: str = ""  # where it was loaded from, for messages
    environment_file: str | None = None  # as written in the profile; its variables are in env


def config_dir() -> Path:
    return Path(os.environ.get("CLOUDFS_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def resolve(name_or_path: str) -> Path:
    """Map ``photos`` to ``/etc/cloudfs/photos.conf``; leave real paths alone."""
    if "/" in name_or_path or name_or_path.endswith(".conf"):
        return Path(name_or_path)
    if not _NAME_RE.match(name_or_path) or ".." in name_or_path:
        raise ProfileError(
            f"invalid profile name {name_or_path!r}: use letters, digits and _.@+- "
            f"(or give a path to the file)"
        )
    return config_dir() / f"{name_or_path}.conf"


def check_private(path: Path, st: os.stat_result, what: str, *, secret: bool) -> None:
    """Apply the permission rule above to an open file's stat result."""
    if not stat.S_ISREG(st.st_mode):
        raise ProfileError(f"{what} {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise ProfileError(
            f"{what} {path} is owned by uid {st.st_uid}; it must be owned by root or by uid {os.geteuid()}"
        )
    if mode & 0o022:
        raise ProfileError(
            f"{what} {path} is writable by group or others (mode {mode:04o}); run: chmod go-w {path}"
        )
    if secret and mode & 0o044:
        raise ProfileError(
            f"{what} {path} holds credentials but is readable by group or others (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )


def _read_checked(path: Path, what: str) -> tuple[bytes, os.stat_result]:
    # Check the file we actually read (fstat of the open descriptor), not the path.
    try:
        # O_NONBLOCK: a FIFO planted in place of the file must not hang the mount.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ProfileError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ProfileError(f"cannot open {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ProfileError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read(), st


def parse_env_file(text: str, path: Path | str = "<env>") -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines the way systemd's ``EnvironmentFile=`` does for simple files.

    Blank lines and lines starting with ``#`` or ``;`` are ignored, an ``export `` prefix is
    allowed, and a value wrapped in matching single or double quotes is unquoted.
    """
    env: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME_RE.match(key):
            raise ProfileError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def load_env_file(path: Path | str) -> dict[str, str]:
    """Read a credentials file, refusing it unless only its owner can read it."""
    p = Path(path)
    data, st = _read_checked(p, "environment file")
    check_private(p, st, "environment file", secret=True)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ProfileError(f"environment file {p} is not UTF-8 text") from None
    return parse_env_file(text, p)


def parse_options(value: object, path: Path | str = "<profile>") -> dict[str, str]:
    """Turn an ``options`` string (``"ro,cache_size=5G"``) or table into ``{name: value}``."""
    opts: dict[str, str] = {}
    if isinstance(value, str):
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            k, _, v = item.partition("=")
            opts[k.strip()] = v.strip()
        return opts
    if isinstance(value, dict):
        for k, v in value.items():
            if v is True:
                opts[k] = ""
            elif v is False:
                continue
            elif isinstance(v, str | int | float):
                opts[k] = str(v)
            else:
                raise ProfileError(f"{path}: option {k!r} must be a string, number or boolean")
        return opts
    raise ProfileError(f"{path}: 'options' must be a string like \"ro,cache_size=5G\" or a table")


def parse_profile(data: bytes | str, path: Path | str = "<profile>") -> tuple[Profile, bool]:
    """Parse profile text; returns the profile and whether the file itself holds credentials."""
    try:
        doc = tomllib.loads(data.decode() if isinstance(data, bytes) else data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    unknown = set(doc) - KNOWN_KEYS
    if unknown:
        raise ProfileError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    url = doc.get("url")
    if not isinstance(url, str) or not url:
        raise ProfileError(f"{path}: 'url' is required (e.g. url = \"s3://bucket/prefix\")")
    mountpoint = doc.get("mountpoint")
    if not isinstance(mountpoint, str) or not os.path.isabs(mountpoint):
        raise ProfileError(f"{path}: 'mountpoint' is required and must be an absolute path")
    options = parse_options(doc.get("options", {}), path)
    inline = doc.get("environment", {})
    if not isinstance(inline, dict):
        raise ProfileError(f"{path}: [environment] must be a table of NAME = \"value\"")
    env: dict[str, str] = {}
    for k, v in inline.items():
        if not _ENV_NAME_RE.match(k) or not isinstance(v, str):
            raise ProfileError(f"{path}: environment entry {k!r} must be NAME = \"string\"")
        env[k] = v
    env_file = doc.get("environment_file")
    if env_file is not None and (not isinstance(env_file, str) or not env_file):
        raise ProfileError(f"{path}: 'environment_file' must be a path")
    prof = Profile(url=url, mountpoint=os.path.normpath(mountpoint), options=options, env=env,
                   path=str(path), environment_file=env_file)  # fmt: skip
    return prof, bool(env)


def load_profile(name_or_path: str) -> Profile:
    """Load and check a profile; raises :class:`ProfileError` with a message fit for users."""
    path = resolve(name_or_path)
    data, st = _read_checked(path, "profile")
    prof, has_secrets = parse_profile(data, path)
    check_private(path, st, "profile", secret=has_secrets)
    if prof.environment_file:
        ef = Path(prof.environment_file)
        if not ef.is_absolute():
            ef = path.parent / ef
        file_env = load_env_file(ef)
        prof.env = {**file_env, **prof.env}  # the inline table wins
    return prof
