#!/usr/bin/env bash
# Install everything cloudfs and its tests need on a fresh Debian machine (run as root):
# FUSE, the peers used by benchmarks, Node.js for Azurite, OpenStack Swift and memcached for
# the swift backend tests, a virtualenv with cloudfs (editable) and the Python test servers,
# and Azurite from npm.
#
# --runtime: only what cloudfs itself needs (FUSE, and a venv with cloudfs and its SDKs), and
# quietly: `make demo` and `make install` use it; `make test` installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=0
[ "${1:-}" = "--runtime" ] && runtime=1

RUNTIME_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv)
APT_PACKAGES=("${RUNTIME_PACKAGES[@]}" attr
              rclone s3fs fio util-linux systemd psmisc procps nodejs npm
              swift swift-proxy swift-object swift-container swift-account memcached)
((runtime)) && APT_PACKAGES=("${RUNTIME_PACKAGES[@]}")

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A machine that already has node/npm from elsewhere (e.g. nodesource) keeps them.
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
read -r -a missing <<< "${missing[*]}"
if ((${#missing[@]})); then
  echo "install-deps: apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ((runtime)); then
  # Already there (a previous run, or `make test`): nothing to do, nothing printed.
  if ! .venv/bin/python -c 'import cloudfs.cli, pyfuse3' 2>/dev/null; then
    echo "install-deps: installing cloudfs and its runtime dependencies into .venv"
    .venv/bin/pip install -q -e .
  fi
  exit 0
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

# Azurite (Azure Blob protocol server) for the azure backend tests.
if [ ! -x .deps/npm/node_modules/.bin/azurite-blob ]; then
  mkdir -p .deps/npm
  npm install --silent --no-audit --no-fund --prefix .deps/npm azurite@3 >/dev/null
fi
echo "install-deps: ready"
