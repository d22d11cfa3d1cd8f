"""``cloudfs``: mount, unmount and inspect cloud buckets."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from . import __version__
from .daemon import MountError, mount, prepare, unmount
from .options import OPTIONS

SCHEMES_HELP = """bucket URLs:
  file:///path/to/dir        a local directory acting as a bucket
  s3://BUCKET[/PREFIX]       AWS S3 or an S3-compatible store (-o endpoint=URL)
  az://ACCOUNT/CONTAINER[/PREFIX]  Azure Blob Storage
  gs://BUCKET[/PREFIX]       Google Cloud Storage
credentials come from each store's usual environment variables and files, never the URL."""


def _options_help() -> str:
    width = max(map(len, OPTIONS))
    lines = [f"  {name.ljust(width)}  {text}" for name, text in OPTIONS.items()]
    return "mount options (-o name[=value],...):\n" + "\n".join(lines) + \
        "\n  backend options: endpoint, region, path_style, profile (s3); endpoint (az); " \
        "endpoint, project, anonymous (gs); endpoint, b2_hard_delete (b2)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudfs", description="Mount cloud object storage as a directory.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=SCHEMES_HELP)
    parser.add_argument("--version", action="version", version=f"cloudfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount a bucket", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=SCHEMES_HELP + "\n\n" + _options_help())
    m.add_argument("url", nargs="?", help="bucket URL, e.g. s3://bucket/prefix or file:///srv/bucket")
    m.add_argument("mountpoint", nargs="?", help="an existing empty directory (see -o nonempty)")
    m.add_argument("-o", dest="options", action="append", metavar="OPTS", help="comma-separated options")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (log to stderr)")
    m.add_argument("--profile", help="mount the profile /etc/cloudfs/NAME.conf (or a path)")
    u = sub.add_parser("umount", help="upload pending data, then unmount (waits)")
    u.add_argument("mountpoint", nargs="?")
    u.add_argument("--profile", help="unmount the mountpoint of this profile")
    u.add_argument("--lazy", action="store_true",
                   help="detach now even if programs still use the mount (they keep what they have open)")
    st = sub.add_parser("status", help="show cache use, pending uploads and backend requests "
                                       "(of every mount when no mountpoint is given)")
    st.add_argument("mountpoint", nargs="?")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    sy = sub.add_parser("sync", help="upload everything pending now and wait until it is stored")
    sy.add_argument("mountpoint")
    sy.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    w = sub.add_parser("warm", help="fetch files into the cache (folders: everything below)")
    w.add_argument("paths", nargs="+")
    c = sub.add_parser("cache", help="list or remove cache directories (never ones in use or with "
                                      "pending uploads)")
    csub = c.add_subparsers(dest="cache_command", required=True)
    cl = csub.add_parser("list", help="cache directories, their store, size and pending uploads")
    cl.add_argument("--dir", help="where to look (default: where default cache directories live)")
    cl.add_argument("--json", action="store_true", help="machine-readable output")
    cc = csub.add_parser("clean", help="remove cache directories that are not in use and hold "
                                       "nothing to upload")
    cc.add_argument("paths", nargs="*", help="these cache directories (default: every one in --dir)")
    cc.add_argument("--dir", help="where to look (default: where default cache directories live)")
    cc.add_argument("--older-than", help="only those unused for this long, e.g. 30d, 12h")
    h = sub.add_parser("install-helper", help="install /sbin/mount.cloudfs for mount(8) and fstab")
    h.add_argument("--prefix", default="/sbin")
    h2 = sub.add_parser("uninstall-helper", help="remove /sbin/mount.cloudfs")
    h2.add_argument("--prefix", default="/sbin")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "umount":
            mountpoint = args.mountpoint
            if args.profile:
                mountpoint = mountpoint or _load_profile(args.profile).mountpoint
            if not mountpoint:
                raise MountError("usage: cloudfs umount MOUNTPOINT (or --profile NAME)", 2)
            unmount(mountpoint, lazy=args.lazy)
            return 0
        if args.command == "status":
            return _status(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "sync":
            return _sync(args.mountpoint, args.timeout)
        if args.command == "warm":
            return _warm(args.paths)
        from . import mount_helper
        if args.command == "install-helper":
            mount_helper.install(args.prefix)
        else:
            mount_helper.uninstall(args.prefix)
        return 0
    except MountError as exc:
        print(f"cloudfs: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _status(args: argparse.Namespace) -> int:
    import json

    from . import status
    from .daemon import pid_file, run_dir

    if args.mountpoint is None:
        every = status.every_mount(run_dir())
        if args.json:
            print(json.dumps(every, indent=2))
        else:
            print("\n\n".join(status.render(st) for st in every) if every else "no cloudfs mounts")
        return 0
    try:
        st = status.query(status.socket_path(pid_file(args.mountpoint)))
    except OSError:
        raise MountError(f"{args.mountpoint}: no cloudfs mount answers there", 1) from None
    print(json.dumps(st, indent=2) if args.json else status.render(st))
    return 0


def _progress(total: int, desc: str) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)


def _sync(mountpoint: str, timeout: float | None) -> int:
    """Upload every pending file now; return once none is pending (0), or all that remain
    failed a try since, or ``timeout`` passed (1)."""
    from . import status
    from .daemon import _syncfs, pid_file

    sock = status.socket_path(pid_file(mountpoint))
    _syncfs(mountpoint)  # the kernel's dirty pages reach the mount first
    try:
        st = status.query(sock, "sync")
    except OSError:
        raise MountError(f"{mountpoint}: no cloudfs mount answers there", 1) from None
    start = st["uploads"]["uploaded_bytes"]
    bar = _progress(st["uploads"]["pending_bytes"], "cloudfs: uploading")
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while (pending := st["uploads"]["pending_files"]) and len(st["uploads"]["errors"]) < pending:
            if deadline is not None and time.monotonic() > deadline:
                raise MountError(f"{mountpoint}: {pending} file(s) still uploading after {timeout:g}s", 1)
            time.sleep(0.2)
            st = status.query(sock)
            if bar is not None:
                bar.n = min(bar.total, st["uploads"]["uploaded_bytes"] - start)
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    if pending:
        key, error = next(iter(st["uploads"]["errors"].items()))
        raise MountError(f"{mountpoint}: {pending} file(s) could not be uploaded and stay queued "
                         f"({key}: {error})", 1)
    return 0


def _warm(paths: list[str]) -> int:
    """Read files through the mount so their blocks are in the cache."""
    files: list[tuple[str, int]] = []
    for path in paths:
        if os.path.isdir(path):
            for dirpath, _dirs, names in os.walk(path):
                files += [(p, os.path.getsize(p)) for p in (os.path.join(dirpath, n) for n in sorted(names))
                          if os.path.isfile(p)]
        elif os.path.isfile(path):
            files.append((path, os.path.getsize(path)))
        else:
            raise MountError(f"{path}: no such file or folder", 2)
    total = sum(size for _, size in files)
    bar = _progress(total, "cloudfs: warming")
    try:
        for path, _size in files:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1024 * 1024):
                    if bar is not None:
                        bar.update(len(chunk))
    except OSError as exc:
        raise MountError(f"{exc.filename}: {exc.strerror}", 1) from None
    finally:
        if bar is not None:
            bar.close()
    print(f"warmed {len(files)} file(s), {total} bytes", file=sys.stderr)
    return 0


def _cache(args: argparse.Namespace) -> int:
    import json

    import humanfriendly

    from . import cache_dirs

    base = args.dir or cache_dirs.default_base()
    if args.cache_command == "list":
        found = [cache_dirs.describe(p) for p in cache_dirs.candidates(base)]
        if args.json:
            print(json.dumps([d.as_dict() for d in found], indent=2))
        for d in found if not args.json else []:
            state = "in use" if d.in_use else "idle"
            pending = f", {d.pending_files} file(s) to upload" if d.pending_files else ""
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.last_used))
            print(f"{d.path}: {d.store or '?'}, {humanfriendly.format_size(d.bytes, binary=True)}, "
                  f"{state}{pending}, last used {used}")
        if not found and not args.json:
            print(f"no cache directories in {base}")
        return 0
    older = None
    if args.older_than:
        try:
            older = humanfriendly.parse_timespan(args.older_than)
        except humanfriendly.InvalidTimespan:
            raise MountError(f"--older-than {args.older_than}: not a duration (e.g. 30d, 12h)", 2) from None
    kept = 0
    for path in args.paths or cache_dirs.candidates(base):
        why = cache_dirs.clean(os.path.abspath(path), older)
        if why is None:
            print(f"removed {path}")
        else:
            kept += 1
            print(f"kept {path}: {why}", file=sys.stderr)
    return 1 if kept and args.paths else 0


def _load_profile(name: str) -> Any:
    from .profile import load_profile

    try:
        return load_profile(name)
    except (OSError, ValueError) as exc:
        raise MountError(f"profile {name}: {exc}", 2) from None


def _mount(args: argparse.Namespace) -> int:
    url, mountpoint, options = args.url, args.mountpoint, list(args.options or [])
    if args.profile:
        prof = _load_profile(args.profile)
        os.environ.update(prof.env)
        url = url or prof.url
        mountpoint = mountpoint or prof.mountpoint
        options = [",".join(f"{k}={v}" if v else k for k, v in prof.options.items()), *options]
    if not url or not mountpoint:
        raise MountError("usage: cloudfs mount URL MOUNTPOINT [-o options] (or --profile NAME)", 2)
    plan = prepare(url, mountpoint, options)
    return mount(plan, args.foreground)


if __name__ == "__main__":
    sys.exit(main())
