"""``cloudfs``: mount, unmount and inspect cloud buckets."""

from __future__ import annotations

import argparse
import os
import sys
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
    st = sub.add_parser("status", help="show cache use, pending uploads and backend requests")
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="machine-readable output")
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
    from .daemon import pid_file

    try:
        st = status.query(status.socket_path(pid_file(args.mountpoint)))
    except OSError:
        raise MountError(f"{args.mountpoint}: no cloudfs mount answers there", 1) from None
    print(json.dumps(st, indent=2) if args.json else status.render(st))
    return 0


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
