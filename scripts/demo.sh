#!/usr/bin/env bash
# `make demo`: mount a local-disk bucket with a few sample files and show it.
set -euo pipefail
cd "$(dirname "$0")/.."
bucket=${1:-$HOME/cloudfs-demo/bucket}
mnt=${2:-$HOME/cloudfs-demo/mnt}
mkdir -p "$bucket" "$mnt"
if [ -z "$(ls -A "$bucket" 2>/dev/null | grep -v '^.cloudfs-tmp$')" ]; then
  mkdir -p "$bucket/photos/2026" "$bucket/docs"
  echo "Welcome to cloudfs: this bucket is the directory $bucket" > "$bucket/README.txt"
  printf 'name,size\nalpha,1\nbeta,2\n' > "$bucket/docs/table.csv"
  head -c 1048576 /dev/urandom > "$bucket/photos/2026/random.bin"
fi
if grep -q " $(realpath "$mnt") " /proc/self/mountinfo; then
  echo "already mounted on $mnt"
else
  .venv/bin/cloudfs mount "file://$(realpath "$bucket")" "$mnt"
fi
echo "Mounted file://$(realpath "$bucket") on $mnt:"
ls -lR "$mnt"
echo
echo "Try: echo hi > $mnt/new.txt; ls -l $bucket    Stop with: make demo-stop"
