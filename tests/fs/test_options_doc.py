"""The option table users read in docs/ is the one the code carries, and every option's bad
values are refused through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cloudfs.cli import build_parser
from cloudfs.options import OPTIONS, markdown_table
from tests.mounting import CLOUDFS, mounted


def test_docs_options_match_code() -> None:
    doc = Path(__file__).parents[2] / "docs" / "options.md"
    assert doc.read_text() == markdown_table(), "regenerate: python -m cloudfs.options > docs/options.md"


def test_help_lists_every_option() -> None:
    mount = build_parser()._subparsers._group_actions[0].choices["mount"]  # type: ignore[union-attr]
    text = mount.format_help()
    for name in OPTIONS:
        assert name in text


# Every option in the table, with values `cloudfs mount` must refuse before mounting anything:
# one line on stderr, exit code 2, never a traceback (and never a hang: -o connections=0 hung).
# "{tmp}" is the test's tmp_path.  An option added to OPTIONS without bad values fails
# test_every_option_has_bad_values.
BAD_VALUES: dict[str, list[tuple[str, str]]] = {
    "ro": [("1", "takes no value")],
    "nonempty": [("yes", "takes no value")],
    "allow_other": [("1", "takes no value")],
    "uid": [("-1", "at least 0"), ("root", "not a number"), ("4294967295", "not a valid")],
    "gid": [("-1", "at least 0"), ("x", "not a number")],
    "cache_dir": [("", "needs a path"), ("/proc/nope", "cache directory /proc/nope"),
                  ("{tmp}/a-file", "not a directory"), ("{tmp}/a-file/below", "cache directory")],
    "cache_size": [("-1G", "not a size"), ("0", "at least 1"), ("lots", "not a size"),
                   ("1M", "at least 4 blocks")],
    "min_free": [("-1", "not a size"), ("x", "not a size")],
    "dir_cache_entries": [("-1", "at least 0"), ("many", "not a number")],
    "meta_cache_entries": [("-1", "at least 0"), ("1e9x", "not a number")],
    "max_dirty": [("0", "at least 1"), ("-5M", "not a size"), ("1T", "must not exceed cache_size")],
    "block_size": [("0", "between 64K and 1G"), ("2G", "between 64K and 1G"), ("-8M", "not a size")],
    "writeback_delay": [("-5", "not a duration"), ("soon", "not a duration")],
    "dir_cache_time": [("-1", "not a duration"), ("forever", "not a duration")],
    "sync_upload": [("maybe", "expected no value")],
    "attr_timeout": [("-1", "not a duration"), ("x", "not a duration")],
    "readahead": [("-1", "at least 0"), ("many", "not a number")],
    "transfers": [("0", "at least 1"), ("-2", "at least 1")],
    "connections": [("0", "at least 1"), ("-1", "at least 1"), ("1.5", "not a number")],
    "retries": [("0", "at least 1"), ("x", "not a number")],
    "timeout": [("0", "more than 0"), ("-3", "not a duration"), ("x", "not a duration")],
    "log_file": [("", "needs a path"), ("{tmp}", "not a file that can be written"),
                 ("/nonexistent-dir/x.log", "not a file that can be written")],
    "debug": [("perhaps", "expected no value")],
    "noatime": [("1", "takes no value")],
    "noexec": [("1", "takes no value")],
    "nosuid": [("1", "takes no value")],
    "metadata_timeout": [("0", "more than 0"), ("x", "not a duration")],
    "umask": [("8", "not an octal mode"), ("7777", "0 to 0777")],
    "file_mode": [("rw", "not an octal mode"), ("1777", "0 to 0777")],
    "dir_mode": [("-1", "0 to 0777")],
    "metrics": [("nonsense", "expected HOST:PORT"), ("127.0.0.1:99999", "expected HOST:PORT")],
    "content_type": [("html", "not auto nor a media type"), ("", "not auto nor a media type")],
}


# Backend options (`cloudfs mount --help` lists them per store): the URLs need no server, the
# values are refused before any connection.
BACKEND_BAD_VALUES: list[tuple[str, str, str]] = [
    ("s3://bucket", "endpoint=s3.example.com", "http(s):// URL"),
    ("s3://bucket", "path_style=maybe", "path_style=maybe"),
    ("s3://bucket", "profile=no-such-profile-here", "no-such-profile-here"),
    ("s3://bucket", "storage_class=COLD", "storage_class=COLD: not one of"),
    ("s3://bucket", "sse=c", "sse=c needs -o sse_c_key_file"),
    ("s3://bucket", "sse=c,sse_c_key_file=/nonexistent/key", "sse_c_key_file=/nonexistent/key"),
    ("s3://bucket", "acl=everyone", "acl=everyone: not one of"),
    ("s3://bucket", "requester_pays=maybe", "requester_pays takes"),
    ("s3://bucket", "ca_bundle=/nonexistent/ca.pem", "no such file"),
    ("gs://bucket", "endpoint=localhost:4443", "http(s):// URL"),
    ("gs://bucket", "anonymous=perhaps", "anonymous=perhaps"),
    ("az://acct/container", "endpoint=blob.example.com", "http(s):// URL"),
    ("b2://bucket-name", "endpoint=nowhere", "http(s):// URL"),
    ("b2://bucket-name", "b2_hard_delete=sometimes", "b2_hard_delete=sometimes"),
    ("swift://container", "endpoint=http://x", "unknown mount option"),
    ("swift://container", "tls_verify=perhaps", "tls_verify takes"),
    ("gs://bucket", "ca_bundle=/nonexistent/ca.pem", "no such file"),
    ("az://acct/container", "ca_bundle=/etc/cloudfs-ca.pem,tls_verify=0", "contradict"),
]


def test_every_option_has_bad_values() -> None:
    assert set(BAD_VALUES) == set(OPTIONS)


# `cloudfs mount` for every case, each in a process of its own with its own exit code and stderr,
# run as the console script runs it (`sys.exit(main())`, an uncaught exception is a traceback and
# rc 1), but forked from one interpreter that imported cloudfs.cli once: the CLI's start-up (~0.6 s
# of CPU for its imports) is paid once instead of once per case.  A case that hangs is killed
# by SIGALRM after 60 s (rc -14): -o connections=0 hung.
FORKED_CLI = r"""
import json, os, signal, sys, traceback
from cloudfs.cli import main

def run(argv):
    sys.argv = argv
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    return code

results = []
for argv in json.load(sys.stdin):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        signal.alarm(60)
        code = 1
        try:
            code = run(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code & 0xFF)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    results.append([os.waitstatus_to_exitcode(status), err])
json.dump(results, sys.stdout)
"""


def test_bad_option_values_are_one_line_rc2(tmp_path: Path) -> None:
    bucket, mnt = tmp_path / "bucket", tmp_path / "mnt"
    bucket.mkdir()
    mnt.mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    cases = [(f"file://{bucket}", f"{name}={value.replace('{tmp}', str(tmp_path))}", text)
             for name, values in BAD_VALUES.items() for value, text in values] + BACKEND_BAD_VALUES
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "B2_APPLICATION_KEY_ID": "x", "B2_APPLICATION_KEY": "y"}
    argvs = []
    for url, opts, _text in cases:
        if not opts.startswith("cache_dir="):
            opts += f",cache_dir={tmp_path / 'cache'}"
        argvs.append([CLOUDFS, "mount", url, str(mnt), "-o", opts])
    try:
        r = subprocess.run([sys.executable, "-c", FORKED_CLI], input=json.dumps(argvs), capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        results = json.loads(r.stdout)
        assert len(results) == len(cases)
        failures = []
        for (_url, _opts, text), argv, (rc, stderr) in zip(cases, argvs, results, strict=True):
            lines = stderr.strip().splitlines()
            if rc != 2 or len(lines) != 1 or text not in stderr:
                failures.append(f"-o {argv[-1]}: rc {rc}: {stderr.strip()}")
        assert not mounted(mnt), "a bad option mounted"
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert not failures, "\n".join(failures)
