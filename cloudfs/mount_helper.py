"""``mount.cloudfs``: the mount(8) helper, and installing it (and the systemd units).

mount(8) runs ``/sbin/mount.TYPE SOURCE MOUNTPOINT [-sfnv] [-N ns] [-o options] [-t TYPE]`` for
``mount -t cloudfs`` and for fstab lines of type ``cloudfs``; type ``fuse.cloudfs`` runs
``/sbin/mount.fuse.cloudfs`` (or mount.fuse3, which calls us the same way).  mount(8) only
looks in /sbin, hence :func:`install`.

The helper removes the options that belong to mount(8) and systemd, keeps ``ro``, and execs
``cloudfs mount SOURCE MOUNTPOINT -o REST``.  That command forks before trio starts; the child
makes the FUSE mount and only then calls setsid(), and the parent exits 0 once the main loop
runs.  So the helper returns exactly when the mount is usable and the filesystem keeps
serving in the background.  Two things here must stay that way (see issue 7):

* the helper never calls setsid() and never stats or opens the mountpoint: under a systemd
  ``.automount`` only systemd's own process group may touch the path while the automount is
  pending, so either would deadlock until systemd's mount timeout;
* the helper execs, so the exit status mount(8) sees is that of ``cloudfs mount``.

Options:

* dropped because mount(8)/systemd own them: ``_netdev``, ``auto``, ``noauto``, ``nofail``,
  ``defaults``, ``user``, ``users``, ``nouser``, ``owner``, ``group``, ``comment=*``, ``x-*``,
  ``X-*`` (including every ``x-systemd.*``);
* dropped because they are the default or refused: ``rw``, ``exec``, ``async``, ``dev``,
  ``suid``, ``nodev``, ``nosuid`` — a cloudfs mount is always ``nosuid,nodev`` (mount.fuse3
  adds ``dev,suid`` when root mounts ``fuse.cloudfs``; they are not honoured);
* ``ro`` is kept (the last of ``ro``/``rw`` wins);
* ``noatime``, ``relatime``, ``strictatime`` and ``noexec`` go to ``cloudfs mount -o``, which
  passes ``noatime`` and ``noexec`` to the kernel mount (``relatime`` is the default; libfuse
  cannot set ``strictatime``, so it is accepted and ignored);
* ``env_file=PATH`` is consumed here: the KEY=VALUE credentials file is read with the same
  permission rule as profiles (owner-only) and exported to ``cloudfs mount``;
* everything else goes to ``cloudfs mount -o``, which rejects what it does not know;
  with ``-s`` (sloppy) options that neither cloudfs nor the URL's backend knows are dropped.

Flags: ``-f`` fake (print the command, mount nothing), ``-n`` no mtab (accepted; there is no
mtab to write), ``-v`` verbose (print the filtered options and the command on stderr),
``-s`` sloppy, ``-N`` namespace (refused), ``-t`` type (``cloudfs`` or ``fuse.cloudfs``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROG = "mount.cloudfs"
TYPES = ("cloudfs", "fuse.cloudfs")
HELPER_NAMES = ("mount.cloudfs", "mount.fuse.cloudfs")
MARKER = "# cloudfs-mount-helper: written by `cloudfs install-helper`, removed by `cloudfs uninstall-helper`"
UNIT_BIN = "/usr/local/bin/cloudfs"  # the ExecStart path written in systemd/*.service
UNIT_MARKER = "# cloudfs-unit"  # first line of the shipped units: uninstall_units removes only ours

# Options mount(8) or systemd act on; they mean nothing to the filesystem.
MOUNT_OWNED = {"_netdev", "auto", "noauto", "nofail", "defaults", "user", "users", "nouser", "owner", "group"}
MOUNT_OWNED_PREFIXES = ("x-", "X-", "comment=")
# Generic VFS flags that are the default for cloudfs, or that it always overrides.
DEFAULTS_OR_REFUSED = {"rw", "exec", "async", "dev", "suid", "nodev", "nosuid"}
HELPER_OPTIONS = {"env_file"}


class UsageError(Exception):
    pass


@dataclass
class Invocation:
    source: str
    mountpoint: str
    fstype: str = "cloudfs"
    fake: bool = False
    no_mtab: bool = False
    verbose: bool = False
    sloppy: bool = False
    options: list[str] = field(default_factory=list)  # raw -o items, in order


@dataclass
class Filtered:
    passed: list[str]  # what goes to `cloudfs mount -o`
    dropped: list[str]  # what we removed, for -v
    env_file: str | None = None


def helper_type(argv0: str) -> str:
    """``mount.fuse.cloudfs`` -> ``fuse.cloudfs``; anything else is plain ``cloudfs``."""
    name = os.environ.get("CLOUDFS_HELPER_NAME") or os.path.basename(argv0)
    return "fuse.cloudfs" if name == "mount.fuse.cloudfs" else "cloudfs"


def parse_argv(args: list[str], argv0: str = PROG) -> Invocation:
    """Parse the helper calling convention; flags may come before, between or after the operands."""
    positional: list[str] = []
    inv = Invocation(source="", mountpoint="", fstype=helper_type(argv0))
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            positional.extend(args[i:])
            break
        if a.startswith("-") and len(a) > 1:
            j = 1
            while j < len(a):
                c = a[j]
                j += 1
                if c in "sfnv":
                    inv.sloppy |= c == "s"
                    inv.fake |= c == "f"
                    inv.no_mtab |= c == "n"
                    inv.verbose |= c == "v"
                elif c in "otN":
                    val = a[j:]
                    if not val:
                        if i >= len(args):
                            raise UsageError(f"option -{c} needs an argument")
                        val = args[i]
                        i += 1
                    if c == "o":
                        inv.options.extend(x for x in val.split(",") if x)
                    elif c == "t":
                        if val not in TYPES:
                            raise UsageError(f"unsupported filesystem type {val!r} (expected cloudfs)")
                        inv.fstype = val
                    else:
                        raise UsageError("mounting in another mount namespace (-N) is not supported")
                    break
                else:
                    raise UsageError(f"unknown flag -{c}")
        else:
            positional.append(a)
    if len(positional) != 2:
        raise UsageError("expected SOURCE and MOUNTPOINT")
    inv.source, inv.mountpoint = positional
    if inv.fstype == "fuse.cloudfs" and inv.source.startswith("cloudfs#"):
        inv.source = inv.source[len("cloudfs#") :]  # old fuse fstab style "cloudfs#URL"
    return inv


def filter_options(items: list[str], known: set[str] | None = None, sloppy: bool = False) -> Filtered:
    """Split mount options into what ``cloudfs mount`` gets and what is dropped.

    ``known`` is the set of option names ``cloudfs mount -o`` accepts, if the CLI publishes it;
    with ``sloppy`` an unknown option is then dropped instead of passed (and refused).
    """
    passed: dict[str, str] = {}  # name -> item, keeping the last value and first position
    dropped: list[str] = []
    env_file = None
    ro = False
    for item in items:
        name, _, value = item.partition("=")
        if name in MOUNT_OWNED or item.startswith(MOUNT_OWNED_PREFIXES):
            dropped.append(item)
        elif name in ("ro", "rw"):
            ro = name == "ro"
            if name == "rw":
                dropped.append(item)
        elif name in DEFAULTS_OR_REFUSED:
            dropped.append(item)
        elif name == "env_file":
            if not value:
                raise UsageError("env_file= needs a path")
            env_file = value
        elif known is not None and name not in known and sloppy:
            dropped.append(item)
        else:
            passed.pop(name, None)
            passed[name] = item
    out = (["ro"] if ro else []) + list(passed.values())
    return Filtered(passed=out, dropped=dropped, env_file=env_file)


def cli_known_options(source: str) -> set[str] | None:
    """Option names ``cloudfs mount -o`` accepts for this URL (the CLI's table plus the backend's)."""
    try:
        from urllib.parse import urlsplit

        from cloudfs.backends import backend_class
        from cloudfs.options import KERNEL_FLAGS, OPTIONS

        return {"ro", "rw", *OPTIONS, *KERNEL_FLAGS, *backend_class(urlsplit(source).scheme).options}
    except Exception:
        return None


def cloudfs_command() -> list[str]:
    """How to run the ``cloudfs`` CLI of this installation (the console script beside python)."""
    exe = Path(sys.executable).parent / "cloudfs"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from cloudfs.cli import main; sys.exit(main())"]


def build_command(inv: Invocation, filtered: Filtered) -> list[str]:
    cmd = [*cloudfs_command(), "mount", inv.source, inv.mountpoint]
    if filtered.passed:
        cmd += ["-o", ",".join(filtered.passed)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else PROG
    prog = os.path.basename(argv0) if os.path.basename(argv0) in HELPER_NAMES else PROG
    try:
        inv = parse_argv(args, argv0)
        known = cli_known_options(inv.source) if inv.sloppy else None
        filtered = filter_options(inv.options, known, inv.sloppy)
        env = dict(os.environ)
        env.pop("CLOUDFS_HELPER_NAME", None)
        if filtered.env_file:
            from cloudfs.profile import ProfileError, load_env_file

            try:
                env.update(load_env_file(filtered.env_file))
            except ProfileError as e:
                raise UsageError(str(e)) from None
        cmd = build_command(inv, filtered)
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        print(f"usage: {prog} SOURCE MOUNTPOINT [-sfnv] [-o options]", file=sys.stderr)
        return 1
    if inv.verbose or inv.fake:
        if filtered.dropped:
            print(f"{prog}: ignoring options: {','.join(filtered.dropped)}", file=sys.stderr)
        print(f"{prog}: {'would run' if inv.fake else 'running'}: {' '.join(cmd)}", file=sys.stderr)
    if inv.fake:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(cmd[0], cmd, env)  # the exit status mount(8) sees is cloudfs mount's
    except OSError as e:
        print(f"{prog}: cannot run {cmd[0]}: {e.strerror}", file=sys.stderr)
        return 1
    return 1  # not reached


# --- installing the helper -------------------------------------------------------------------


def _helper_target() -> str:
    script = Path(sys.executable).parent / "mount.cloudfs"
    if script.is_file() and os.access(script, os.X_OK):
        return f"exec {_sh_quote(str(script))} \"$@\""
    return f"exec {_sh_quote(sys.executable)} -m cloudfs.mount_helper \"$@\""


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _wrapper(name: str) -> str:
    return (
        "#!/bin/sh\n"
        f"{MARKER}\n"
        f"CLOUDFS_HELPER_NAME={name}\n"
        "export CLOUDFS_HELPER_NAME\n"
        f"{_helper_target()}\n"
    )


def _is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def install(prefix: str | os.PathLike[str] = "/sbin", *, force: bool = False) -> list[str]:
    """Write ``PREFIX/mount.cloudfs`` and ``PREFIX/mount.fuse.cloudfs`` pointing at this installation.

    They are two-line shell wrappers that exec this venv's ``mount.cloudfs`` console script
    (so upgrading the venv needs no reinstall).  A file of that name that we did not write is
    left alone unless ``force``.  Returns the paths written.
    """
    prefix = Path(prefix)
    if not prefix.is_dir():
        raise FileNotFoundError(f"{prefix} is not a directory")
    written = []
    for name in HELPER_NAMES:
        dest = prefix / name
        if (dest.exists() or dest.is_symlink()) and not _is_ours(dest) and not force:
            raise FileExistsError(f"{dest} exists and was not installed by cloudfs (use force to replace it)")
        tmp = prefix / f".{name}.cloudfs-tmp"
        tmp.write_text(_wrapper(name))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        written.append(str(dest))
    return written


def uninstall(prefix: str | os.PathLike[str] = "/sbin") -> list[str]:
    """Remove the helpers :func:`install` wrote; files we did not write stay.  Returns the paths removed."""
    removed = []
    for name in HELPER_NAMES:
        dest = Path(prefix) / name
        if _is_ours(dest):
            dest.unlink()
            removed.append(str(dest))
    return removed


# --- installing the systemd units -------------------------------------------------------------


def units_dir() -> Path:
    """The ``systemd/`` directory of the source tree this module belongs to."""
    d = Path(__file__).resolve().parent.parent / "systemd"
    if not (d / "cloudfs@.service").is_file():
        raise FileNotFoundError(f"unit files not found in {d} (install from a source checkout)")
    return d


def render_unit(text: str, cloudfs_bin: str | None = None) -> str:
    """Point a shipped unit's ExecStart/ExecStop at this installation's ``cloudfs``."""
    return text.replace(UNIT_BIN, cloudfs_bin or cloudfs_command()[0])


def install_units(
    dest: str | os.PathLike[str] = "/etc/systemd/system",
    *,
    user: bool = False,
    cloudfs_bin: str | None = None,
) -> list[str]:
    """Copy ``cloudfs@.service`` (the user variant with ``user=True``) into ``dest``.

    ``/usr/local/bin/cloudfs`` in the unit is replaced with this installation's console
    script (or ``cloudfs_bin``).  Run ``systemctl daemon-reload`` (``--user``) afterwards.
    """
    if cloudfs_bin is None and len(cloudfs_command()) != 1:
        raise FileNotFoundError("no `cloudfs` console script beside the Python interpreter; pass cloudfs_bin")
    src = units_dir() / ("user" if user else "") / "cloudfs@.service"
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    target = out / src.name
    target.write_text(render_unit(src.read_text(), cloudfs_bin))
    os.chmod(target, 0o644)
    return [str(target)]


def uninstall_units(dest: str | os.PathLike[str] = "/etc/systemd/system") -> list[str]:
    target = Path(dest) / "cloudfs@.service"
    if target.exists() and UNIT_MARKER in target.read_text():
        target.unlink()
        return [str(target)]
    return []


if __name__ == "__main__":
    sys.exit(main())

