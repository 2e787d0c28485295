#!/usr/bin/env bash
# Set up remotefs on a Debian/Ubuntu machine: the system packages it needs (only when missing),
# a virtualenv in .venv with remotefs installed, and `remotefs` on the PATH. Safe to run again;
# fast when nothing is missing.
#
#   scripts/setup.sh [test]      "test" adds the test tools and test packages
#   scripts/setup.sh bench       "test", plus the peers the benchmarks measure (httpdirfs, rclone)
#
# Python (choose_python below; the first rule that gives one wins):
#   1. PYTHON=/path/to/python3.X, when set (it must be 3.11 or newer).
#   2. The first `python3` on PATH that is 3.11 or newer and can build remotefs:
#      - a distribution's python3 (dpkg owns it): its venv module and headers are the generic
#        packages python3-venv and python3-dev, installed when missing;
#      - any other python3 (pyenv, /usr/local, ...) is used as it is when it has venv,
#        ensurepip and Python.h. Nothing is installed for it.
#   3. The distribution's python3 package, when apt's candidate is 3.11 or newer (Debian 12:
#      3.11, Debian 13: 3.13, Ubuntu 24.04: 3.12): python3, python3-venv, python3-dev.
#   4. Otherwise the newest versioned python3.1X that the archive has, with its -venv and -dev
#      packages (Ubuntu 22.04, whose python3 is 3.10: python3.11 from the archive).
#   5. Otherwise stop with one line that says what to install.
# On a fresh Debian this is /usr/bin/python3 with python3-venv and python3-dev.
#
# PATH: the virtualenv's bin/remotefs is linked as /usr/local/bin/remotefs (root) or
# ~/.local/bin/remotefs (other users), and set-up says so. A remotefs there that is not such a
# link is never replaced (a link to a removed checkout's .venv is). REMOTEFS_LINK=no skips it.
#
# The functions can be sourced without running anything (tests/test_setup_*.py do that).
set -euo pipefail

# Every Python minor version the versioned fallback asks apt about, newest first.
PYTHON_MINORS=(19 18 17 16 15 14 13 12 11)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

apt_updated=""
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
}

# "3.11" for a Python command, or nothing when it does not run.
python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

# True when a "X.Y" version is 3.11 or newer.
at_least_311() {
    local major=${1%%.*} minor=${1#*.}
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    [ "$major" -gt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -ge 11 ]; }
}

# True when the file behind a command belongs to a Debian package.
distribution_python() {
    dpkg -S "$(readlink -f "$1")" >/dev/null 2>&1
}

# True when a (non-distribution) Python can create a virtualenv with pip and compile extensions.
python_can_build() {
    "$1" -c 'import ensurepip, os, sys, sysconfig, venv
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        >/dev/null 2>&1
}

# apt's candidate version of each package, as "PACKAGE VERSION" lines (none for unknown ones).
apt_candidates() {
    LC_ALL=C apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/ {pkg = substr($0, 1, length($0) - 1)}
             $1 == "Candidate:" && $2 != "(none)" {print pkg, $2}'
}

# Fills the array candidate: package -> apt's candidate version.
declare -A candidate=()
load_candidates() {
    local pkg ver
    candidate=()
    while read -r pkg ver; do candidate[$pkg]=$ver; done < <(apt_candidates "$@")
}

# Sets chosen_python (a path) and python_packages (apt packages it needs); on failure returns 1
# with choose_error set to one line that says what to install.
choose_python() {
    chosen_python=""
    python_packages=()
    choose_error=""
    local path version dir real seen=" " found=""

    if [ -n "${PYTHON:-}" ]; then
        path=$(command -v "$PYTHON" || true)
        if [ -z "$path" ]; then
            choose_error="PYTHON=$PYTHON is not an executable"
            return 1
        fi
        version=$(python_version "$path")
        if ! at_least_311 "$version"; then
            choose_error="PYTHON=$PYTHON is Python ${version:-(it does not run)}; remotefs needs 3.11 or newer"
            return 1
        fi
        chosen_python=$path
        distribution_python "$path" && python_packages=("python$version-venv" "python$version-dev")
        return 0
    fi

    # Every python3 on PATH, in PATH order.
    local -a dirs
    IFS=: read -ra dirs <<<"$PATH"
    for dir in "${dirs[@]}"; do
        path=${dir:-.}/python3
        if [ ! -x "$path" ] || [ -d "$path" ]; then continue; fi
        real=$(readlink -f "$path")
        case "$seen" in *" $real "*) continue ;; esac
        seen="$seen$real "
        version=$(python_version "$path")
        found="$found, $path (${version:-does not run})"
        at_least_311 "$version" || continue
        if distribution_python "$path"; then
            chosen_python=$path
            python_packages=(python3-venv python3-dev)
            return 0
        fi
        if python_can_build "$path"; then
            chosen_python=$path
            return 0
        fi
        echo "setup: not using $path ($version): it lacks venv, ensurepip or Python.h" >&2
    done

    # Nothing usable is installed: ask the distribution's archive.
    if ! command -v apt-cache >/dev/null 2>&1; then
        choose_error="no Python 3.11+ found${found:+ (found${found#,})} and no apt-cache to install one; install Python 3.11 or newer with venv, or set PYTHON=/path/to/python3.X"
        return 1
    fi
    local wanted=(python3) minor
    for minor in "${PYTHON_MINORS[@]}"; do
        wanted+=("python3.$minor" "python3.$minor-venv" "python3.$minor-dev")
    done
    load_candidates "${wanted[@]}"
    if [ -z "${candidate[python3]:-}" ]; then
        # A fresh system may have no package lists yet.
        apt_update_once
        load_candidates "${wanted[@]}"
    fi
    # Debian versions look like 3.13.5-1 (an epoch would be "N:").
    version=${candidate[python3]:-}
    version=${version#*:}
    version=$(echo "$version" | sed -n 's/^\([0-9]*\.[0-9]*\).*/\1/p')
    if at_least_311 "$version"; then
        chosen_python=/usr/bin/python3
        python_packages=(python3 python3-venv python3-dev)
        return 0
    fi
    for minor in "${PYTHON_MINORS[@]}"; do
        if [ -n "${candidate[python3.$minor]:-}" ] && [ -n "${candidate[python3.$minor-venv]:-}" ] &&
            [ -n "${candidate[python3.$minor-dev]:-}" ]; then
            chosen_python=/usr/bin/python3.$minor
            python_packages=("python3.$minor" "python3.$minor-venv" "python3.$minor-dev")
            return 0
        fi
    done
    choose_error="no Python 3.11+ found${found:+ (found${found#,})}, and apt offers python3 ${version:-(none)} and no python3.11 or newer: install Python 3.11+ with venv and headers (for example python3.11, python3.11-venv and python3.11-dev from another archive) and run again, or set PYTHON=/path/to/python3.X"
    return 1
}

# Link VENV/bin/remotefs into DIR (default: /usr/local/bin for root, ~/.local/bin otherwise).
# Never replaces a remotefs there unless it is our link or a link to a removed .venv.
link_on_path() {
    local venv=$1 dir=${2:-} target link current
    if [ -z "$dir" ]; then
        if [ "$(id -u)" -eq 0 ]; then dir=/usr/local/bin; else dir=$HOME/.local/bin; fi
    fi
    target=$venv/bin/remotefs
    link=$dir/remotefs
    if [ -L "$link" ]; then
        current=$(readlink "$link")
        if [ "$current" = "$target" ]; then
            return 0
        fi
        if [ ! -e "$link" ] && [[ "$current" == */.venv/bin/remotefs ]]; then
            echo "setup: replacing $link, a link to the removed $current" >&2
            rm -f "$link"
        else
            echo "setup: $link is a link to $current, not to this checkout: left alone (run $target, or replace the link)" >&2
            return 0
        fi
    elif [ -e "$link" ]; then
        echo "setup: $link exists and is not a link to this checkout: left alone (run $target)" >&2
        return 0
    fi
    mkdir -p "$dir"
    ln -s "$target" "$link"
    echo "setup: linked $link -> $target, so \`remotefs\` runs from anywhere (delete the link to undo; REMOTEFS_LINK=no skips this)" >&2
    case ":$PATH:" in
    *":$dir:"*) ;;
    *) echo "setup: $dir is not on your PATH: add it (Debian's ~/.profile does at the next login)" >&2 ;;
    esac
}

main() {
    local here want_tests venv
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    want_tests=${1:-}
    venv="$here/.venv"
    local peers=()
    if [ "$want_tests" = "bench" ]; then
        # The benchmarks (bench/) measure remotefs beside its peers where they are installed.
        want_tests=test
        peers=(httpdirfs rclone)
    fi

    packages=(fuse3 libfuse3-dev pkg-config gcc)
    if [ "$want_tests" = "test" ]; then
        # systemd: systemd-analyze verifies the unit file.
        # attr: getfattr in the README's quick start. dpkg-dev: dpkg-shlibdeps for the .deb's
        # Depends. debootstrap: the fresh-machine test's Debian trees. systemd-container:
        # systemd-nspawn boots those trees with systemd as PID 1 (tests/test_systemd_live.py).
        # python3-venv: the library test builds a virtualenv without pyfuse3 from python3.
        # ffmpeg (ffprobe), chromium and a font: the HTTP server's tests play a video through
        # it in headless Chromium and probe an MP4 over it (tests/test_serve_media.py).
        packages+=(unzip e2fsprogs util-linux mount fio curl systemd openssl attr dpkg-dev debootstrap
            systemd-container python3-venv ffmpeg chromium fonts-dejavu-core)
        # The format hints' tests make images with the real tools: mksquashfs/unsquashfs,
        # xorriso, genisoimage/isoinfo, zip, and sfdisk (package fdisk) for partitioned disks.
        packages+=(squashfs-tools xorriso genisoimage zip fdisk)
        # Directory listings are read from the servers that write them, each started by the
        # tests with its own configuration (tests/listing_servers.py): nginx, Apache 2,
        # lighttpd, and Caddy where the release packages it.
        packages+=(nginx apache2 lighttpd "${peers[@]}")
        if ! command -v caddy >/dev/null 2>&1; then
            apt_update_once
            load_candidates caddy
            [ -n "${candidate[caddy]:-}" ] && packages+=(caddy)
        fi
    fi
    if ! choose_python; then
        echo "setup: $choose_error" >&2
        exit 1
    fi
    packages+=("${python_packages[@]}")

    mapfile -t need < <(missing_packages "${packages[@]}")
    if [ "${#need[@]}" -gt 0 ]; then
        echo "setup: installing system packages: ${need[*]}" >&2
        apt_update_once
        # The test servers (nginx, Apache, lighttpd, Caddy) are started by the tests with their
        # own configuration; their packages must not start the system's services (both nginx
        # and Apache would take port 80). Where nothing forbids it yet, a policy-rc.d does so
        # for this install only.
        local policy=/usr/sbin/policy-rc.d own_policy=""
        if [ "$want_tests" = "test" ] && [ ! -e "$policy" ]; then
            printf '#!/bin/sh\n# remotefs setup: no service starts during this install\nexit 101\n' |
                as_root tee "$policy" >/dev/null
            as_root chmod 755 "$policy"
            own_policy=1
        fi
        local status=0
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || status=$?
        [ -n "$own_policy" ] && as_root rm -f "$policy"
        [ "$status" -eq 0 ] || exit "$status"
    fi
    local python=$chosen_python version
    version=$(python_version "$python")
    if ! at_least_311 "$version"; then
        echo "setup: $python is not a working Python 3.11+ after installing ${python_packages[*]}" >&2
        exit 1
    fi

    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating $venv with $python (Python $version)" >&2
        "$python" -m venv "$venv"
    fi
    local extra="[mount,serve]" stamp
    [ "$want_tests" = "test" ] && extra="[mount,serve,test]"
    stamp="$venv/.installed$extra"
    if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
        echo "setup: installing remotefs$extra into $venv" >&2
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here$extra"
        touch "$stamp"
    fi

    if [ "${REMOTEFS_LINK:-yes}" != "no" ]; then
        link_on_path "$venv"
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
