#!/bin/bash
# Install what the provisioning tests need on a Debian 12 controller, as root.
# Safe to run again: every step skips what is already there.
#
#   bash tests/provisioning/install-deps.sh [PYTHON]
#
# PYTHON is the interpreter that runs pytest (default: python3).
set -euo pipefail

python=${1:-python3}

# Controller tools: nspawn test hosts and their disks, plus haproxy and
# promtool (package prometheus) for the validate: commands the tests run here.
packages=(debootstrap systemd-container xfsprogs parted openssh-client iproute2
          util-linux haproxy prometheus)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

"$python" -m pip install -q ansible-core ansible-runner ansible-lint

# community.general and ansible.posix without Galaxy: the `ansible` package on
# PyPI bundles them, and only those two folders are extracted from its wheel.
collections=${ANSIBLE_COLLECTIONS_HOME:-$HOME/.ansible/collections}
if [ ! -f "$collections/ansible_collections/community/general/MANIFEST.json" ] \
    || [ ! -f "$collections/ansible_collections/ansible/posix/MANIFEST.json" ]; then
    download=$(mktemp -d)
    trap 'rm -rf "$download"' EXIT
    "$python" -m pip download -q --no-deps "ansible==12.3.0" -d "$download"
    mkdir -p "$collections"
    "$python" - "$download" "$collections" <<'PY'
import glob
import sys
import zipfile

download, collections = sys.argv[1:]
wheel = zipfile.ZipFile(glob.glob(f"{download}/ansible-*.whl")[0])
wanted = ("ansible_collections/community/general/", "ansible_collections/ansible/posix/")
wheel.extractall(collections, [name for name in wheel.namelist() if name.startswith(wanted)])
PY
fi
