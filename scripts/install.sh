#!/usr/bin/env bash
# Install everything kvmtests needs on a fresh Debian machine (run as root): apt packages, then the
# Python package with its dependencies.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
	echo "scripts/install.sh: run as root (apt-get and /dev/kvm need it)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
grep -v '^#' "$here/scripts/apt-packages.txt" | xargs apt-get install -y -qq --no-install-recommends >/dev/null
python3 -m pip install -q -e "$here"
echo "kvmtests installed: run 'pytest -n auto' in $here (as root)"
