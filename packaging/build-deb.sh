#!/usr/bin/env bash
# Build remotefs_<version>_<arch>.deb with dpkg-deb (no debhelper), for the Debian or Ubuntu
# release it runs on: Debian 12 and 13 are tested (tests/test_fresh_debian.py builds, installs,
# uses and purges it in a fresh debootstrap of each), Ubuntu 22.04+ by package names.
#
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: dist/ in the repository)
#   apt install ./dist/remotefs_*.deb
#
# Layout of the package:
#   /usr/lib/remotefs/                    a private virtualenv: remotefs and its dependencies
#                                         (pyfuse3 compiled here against libfuse3-dev)
#   /usr/bin/remotefs                     -> ../lib/remotefs/bin/remotefs
#   /usr/sbin/mount.remotefs              -> ../lib/remotefs/bin/mount.remotefs (mount -t remotefs)
#   /lib/systemd/system/remotefs@.service systemd/remotefs@.service, running /usr/bin/remotefs
#   /lib/systemd/system/remotefs-serve@.service  the same for systemd/remotefs-serve@.service
#   /usr/share/man/man1/remotefs.1.gz     generated from the argparse parser of every sub-command
#   /usr/share/doc/remotefs/              example.conf, serve-example.conf, README.md,
#                                         README.systemd.md, copyright
#
# The virtualenv is built in a staging directory, not at /usr/lib/remotefs (that path may belong
# to an installed remotefs, and a build must not touch the system). Virtualenvs are not
# relocatable, so the few places that name the staging path are rewritten and the build fails
# if any file still names it: the shebangs of bin/* and pyvenv.cfg. Byte-code is compiled
# after that, with the final paths, so that nothing is written under /usr/lib/remotefs at run
# time (which would keep `apt remove` from removing the directory).
#
# Python: the virtualenv runs on a Debian-packaged interpreter, /usr/bin/python3.X, never one
# from PATH (pyenv, /usr/local). Its bin/python is a symlink to it, its site-packages is
# lib/python3.X and the compiled extensions are for that ABI, so the package depends on that
# exact interpreter package, python3.X, rather than on "python3 (>= 3.X), python3 (<< 3.X+1)":
# it keeps working when the default python3 moves to a newer minor (python3.X stays installed
# because of the dependency), and it can be built on Ubuntu 22.04, whose python3 is 3.10, with
# python3.11 from the archive. By default the interpreter is chosen as scripts/setup.sh chooses
# it, on the system's PATH only (/usr/bin/python3 when it is 3.11+, else a python3.1X from the
# archive, installed if missing). Choose it with PYTHON=/usr/bin/python3.12.
#
# Depends (packaging/deb-depends.sh): python3.X, fuse3, and what dpkg-shlibdeps finds for the
# compiled extensions, so the libfuse3 package is the one pyfuse3 was linked with: libfuse3-3 on
# Debian 12 and Ubuntu, libfuse3-4 on Debian 13. The package installs on the release it was
# built on (and on later ones that still ship those libraries).
#
# Needs network access to PyPI. Missing build tools are installed with apt-get (as root, or
# through sudo). pip's cache is used, so a rebuild does not compile pyfuse3 again.
set -euo pipefail
umask 022
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LC_ALL=C.UTF-8
# Only the packaged code may be imported (not a source tree named by the caller's PYTHONPATH).
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$here/dist}
target=/usr/lib/remotefs

die() {
    echo "build-deb: $*" >&2
    exit 1
}

command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian package: dpkg)"

# -- the interpreter ------------------------------------------------------------------------
# scripts/setup.sh's choice, on the system's PATH only: /usr/bin/python3 when it is 3.11+,
# else the distribution's python3 package or a versioned python3.1X from the archive.
# shellcheck source=scripts/setup.sh
source "$here/scripts/setup.sh"
if [ -z "${PYTHON:-}" ]; then
    PATH=/usr/sbin:/usr/bin:/sbin:/bin choose_python || die "$choose_error"
    missing=()
    mapfile -t missing < <(missing_packages "${python_packages[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "build-deb: installing ${missing[*]}" >&2
        apt_update_once
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    python=$chosen_python
else
    python=$PYTHON
fi
[ -x "$python" ] || die "$python does not exist"
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
at_least_311 "$pyver" || die "$python is Python $pyver; remotefs needs 3.11 or newer"
# The venv's bin/python points at the versioned interpreter, owned by package python3.X.
python=/usr/bin/python$pyver
[ -x "$python" ] || die "$python does not exist"
dpkg -S "$(readlink -f "$python")" >/dev/null 2>&1 ||
    die "$python is not from a Debian package: the .deb must run on the system's Python"
python_package=python$pyver

# -- build dependencies ---------------------------------------------------------------------
missing=()
for pkg in "python$pyver-venv" "python$pyver-dev" libfuse3-dev pkg-config gcc dpkg-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-deb: installing build dependencies: ${missing[*]}" >&2
    apt_update_once
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$here/pyproject.toml")
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-remotefs maintainers <maintainers@users.noreply.b-seed-f5cb0cf6.example>}
deb="$out/remotefs_${version}_${arch}.deb"

work=$(mktemp -d "${TMPDIR:-/tmp}/remotefs-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
[[ "$work" =~ ^[A-Za-z0-9/._-]+$ ]] || die "the temporary directory $work has unusual characters"
stage=$work/root
venv=$stage$target

# -- the virtualenv -------------------------------------------------------------------------
echo "build-deb: building remotefs $version in a $python_package virtualenv" >&2
# A clean copy of the sources: building in the repository would leave build/ and egg-info there.
mkdir -p "$work/src"
cp -a "$here/pyproject.toml" "$here/README.md" "$here/src" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-compile "$work/src[mount,serve]"
# Tools for changing the environment have no place in a package's private runtime.
"$venv/bin/python" -m pip uninstall -q -y pip setuptools
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1 "$venv"/bin/pip* "$venv"/bin/easy_install*
find "$venv" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$venv"/lib/python*/site-packages/remotefs-*.dist-info/direct_url.json

# Relocate from the staging path to /usr/lib/remotefs: shebangs (pip writes either
# "#!$venv/bin/python" or, for long paths, a /bin/sh exec line naming it) and pyvenv.cfg.
grep -rlF "$venv" "$venv/bin" "$venv/pyvenv.cfg" | while read -r file; do
    [ -L "$file" ] || sed -i "s|$venv|$target|g" "$file"
done

# -- commands, unit, man page, documentation ------------------------------------------------
mkdir -p "$stage/usr/bin" "$stage/usr/sbin" "$stage/lib/systemd/system" \
    "$stage/usr/share/man/man1" "$stage/usr/share/man/man8" "$stage/usr/share/doc/remotefs"
ln -s ../lib/remotefs/bin/remotefs "$stage/usr/bin/remotefs"
ln -s ../lib/remotefs/bin/mount.remotefs "$stage/usr/sbin/mount.remotefs"

unit=$stage/lib/systemd/system/remotefs@.service
sed -e 's|/usr/local/bin/remotefs|/usr/bin/remotefs|g' \
    -e 's|(see example.conf next to this file, and systemd/README.md)|(see example.conf and README.systemd.md in /usr/share/doc/remotefs)|' \
    -e 's|^# ExecStart and ExecStop expect the remotefs command in /usr/local/bin.*|# Installed by the remotefs package: the command is /usr/bin/remotefs.|' \
    -e '/^# virtualenv.s bin\/remotefs will do); change both paths otherwise\.$/d' \
    -e 's|^#   install -m 644 systemd/remotefs@.service /etc/systemd/system/$|#   mkdir -p /etc/remotefs; cp /usr/share/doc/remotefs/example.conf /etc/remotefs/NAME.conf|' \
    "$here/systemd/remotefs@.service" >"$unit"
! grep -q /usr/local "$unit" || die "the unit still names /usr/local: $(grep -n /usr/local "$unit")"
unit=$stage/lib/systemd/system/remotefs-serve@.service
sed -e 's|/usr/local/bin/remotefs|/usr/bin/remotefs|g' \
    -e 's|(see$|(see serve-example.conf and README.systemd.md in /usr/share/doc/remotefs).|' \
    -e '/^# serve-example.conf next to this file, and systemd\/README.md). No mount, no FUSE.$/d' \
    -e 's|^# ExecStart and ExecReload expect the remotefs command in /usr/local/bin.*|# Installed by the remotefs package: the command is /usr/bin/remotefs.|' \
    -e '/^# virtualenv.s bin\/remotefs will do); change both paths otherwise\.$/d' \
    -e 's|^#   install -m 644 systemd/remotefs-serve@.service /etc/systemd/system/$|#   cp /usr/share/doc/remotefs/serve-example.conf /etc/remotefs/NAME.serve.conf|' \
    "$here/systemd/remotefs-serve@.service" >"$unit"
! grep -q /usr/local "$unit" || die "the unit still names /usr/local: $(grep -n /usr/local "$unit")"

# The page is generated by the packaged code itself: it documents what is shipped.
"$venv/bin/python" "$here/packaging/make_manpage.py" "$stage/usr/share/man/man1/remotefs.1"
echo ".so man1/remotefs.1" >"$stage/usr/share/man/man8/mount.remotefs.8"
gzip -9n "$stage/usr/share/man/man1/remotefs.1" "$stage/usr/share/man/man8/mount.remotefs.8"

doc=$stage/usr/share/doc/remotefs
install -m 644 "$here/systemd/example.conf" "$doc/example.conf"
install -m 644 "$here/systemd/serve-example.conf" "$doc/serve-example.conf"
install -m 644 "$here/README.md" "$doc/README.md"
install -m 644 "$here/systemd/README.md" "$doc/README.systemd.md"
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: remotefs"
    echo
    echo "Files: *"
    echo "License: MIT"
    echo
    echo "Files: usr/lib/remotefs/lib/*"
    echo "Comment: Python packages bundled in remotefs's private virtualenv. The license of"
    echo " each is in its *.dist-info directory there:"
    for meta in "$venv"/lib/python*/site-packages/*.dist-info/METADATA; do
        name=$(sed -n 's/^Name: //p' "$meta" | head -1)
        ver=$(sed -n 's/^Version: //p' "$meta" | head -1)
        license=$(sed -n 's/^License-Expression: //p; s/^License: //p' "$meta" | head -1)
        [ -n "$license" ] || license=$(sed -n 's/^Classifier: License :: \(OSI Approved :: \)\{0,1\}//p' "$meta" | head -1)
        echo " $name $ver: ${license:-see its dist-info}"
    done
    echo "License: various (see above)"
} >"$doc/copyright"

# -- byte-code, compiled for the final paths --------------------------------------------------
# Timestamp-based .pyc files stay valid because dpkg restores the mtimes of the .py files.
"$python" -m compileall -q -j 0 -s "$stage" -p / "$venv/lib" >/dev/null ||
    die "byte-compiling the virtualenv failed"

# Nothing may still name the staging directory (binary files included).
if leftovers=$(grep -rlF "$stage" "$stage"); then
    die "files still name the staging directory:"$'\n'"$leftovers"
fi

# -- control files --------------------------------------------------------------------------
# The interpreter, fuse3, and the shared libraries of the compiled extensions with their minimum
# versions (dpkg-shlibdeps): see packaging/deb-depends.sh.
mapfile -d '' extensions < <(find "$venv" -name '*.so*' -type f -print0)
depends=$("$here/packaging/deb-depends.sh" "$python_package" "${extensions[@]}") ||
    die "could not compute the package's dependencies"
echo "build-deb: Depends: $depends" >&2

mkdir -p "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<EOF
Package: remotefs
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $depends
Section: utils
Priority: optional
Description: mount remote HTTP(S) files as read-only local files
 remotefs is a FUSE filesystem that shows the URLs listed in a file as
 ordinary read-only files, and downloads only the bytes that programs read.
 Downloaded blocks are kept in a persistent cache that survives restarts and
 crashes; cached parts stay readable while the origin is unreachable.
 .
 Includes the remotefs command, the mount.remotefs helper for mount(8) and
 fstab (type fuse.remotefs), the systemd unit remotefs@.service, and
 remotefs serve with its unit remotefs-serve@.service: the same files over
 HTTP (Range requests, for players and browsers) from the same cache.
EOF

cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
# Make systemd see remotefs@.service (skipped where systemd is not running, e.g. containers).
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null 2>&1 || true
fi
EOF

cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# Running remotefs@ services would lose their code: stop (unmount) them on removal, not upgrade.
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop 'remotefs@*.service' 'remotefs-serve@*.service' >/dev/null 2>&1 || true
fi
EOF

cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
case "$1" in
remove | purge)
    # Byte-code Python wrote at run time (e.g. after a .py was edited) is not in the package
    # and would keep /usr/lib/remotefs from being removed. Caches (/var/cache/remotefs, users'
    # ~/.cache/remotefs) are user data and are left alone.
    if [ -d /usr/lib/remotefs ]; then
        find /usr/lib/remotefs -name '*.pyc' -type f -delete
        find /usr/lib/remotefs -depth -type d -empty -delete
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null 2>&1 || true
    fi
    ;;
esac
EOF
chmod 755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

mkdir -p "$out"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
