#!/usr/bin/env bash
# Set up remotefs on a Debian/Ubuntu machine: the system packages it needs (only when missing)
# and a virtualenv in .venv with remotefs installed. Safe to run again; fast when nothing is
# missing. Usage: scripts/setup.sh [test]   ("test" adds the test tools and test packages)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
want_tests=${1:-}
venv="$here/.venv"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

# A Python >= 3.11 with venv and headers (pyfuse3 compiles against libfuse3).
pick_python() {
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

packages=(fuse3 libfuse3-dev pkg-config gcc)
if [ "$want_tests" = "test" ]; then
    # systemd: systemd-analyze verifies the unit file (not run as init by the tests)
    packages+=(unzip e2fsprogs util-linux mount fio curl systemd openssl)
fi
python=$(pick_python || true)
if [ -z "$python" ]; then
    packages+=(python3.11 python3.11-venv python3.11-dev)
elif [ "$(dpkg -S "$(readlink -f "$python")" 2>/dev/null | cut -d: -f1)" != "" ]; then
    # A Debian/Ubuntu python: its venv module and headers are separate packages.
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    packages+=("python${version}-venv" "python${version}-dev")
fi

mapfile -t need < <(missing_packages "${packages[@]}")
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing system packages: ${need[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python=${python:-$(pick_python)}

if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    "$python" -m venv "$venv"
fi
extra=""
[ "$want_tests" = "test" ] && extra="[test]"
stamp="$venv/.installed$extra"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    echo "setup: installing remotefs$extra into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here$extra"
    touch "$stamp"
fi
