#!/usr/bin/env bash
# Print the Depends field of the remotefs package, computed from what was built:
#
#   packaging/deb-depends.sh PYTHON_PACKAGE FILE...
#   e.g. packaging/deb-depends.sh python3.13 /path/to/venv/lib/python3.13/site-packages/**/*.so
#
# - PYTHON_PACKAGE (python3.X): the exact interpreter the virtualenv was built with. Its
#   extensions are built for that ABI, so the package depends on that interpreter package.
# - fuse3: fusermount3 and /etc/fuse.conf, which libfuse3 uses at run time (not a library
#   dependency, so dpkg-shlibdeps cannot see it).
# - dpkg-shlibdeps on the compiled extensions (FILE...): the packages of the shared libraries
#   they link, with the minimum versions of the symbols they use. This is what makes the
#   package install on the release it was built on: pyfuse3 built on Debian 12 links
#   libfuse3.so.3 (libfuse3-3), built on Debian 13 libfuse3.so.4 (libfuse3-4).
#
# Fails when no FILE links libfuse3 (pyfuse3 missing from FILE...), or when dpkg-shlibdeps
# cannot map a library to a package.
set -euo pipefail

die() {
    echo "deb-depends: $*" >&2
    exit 1
}

[ "$#" -ge 2 ] || die "usage: $0 PYTHON_PACKAGE FILE..."
python_package=$1
shift
[[ "$python_package" =~ ^python3\.[0-9]+$ ]] || die "'$python_package' is not a python3.X package name"
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps is missing (Debian package: dpkg-dev)"

files=()
for file in "$@"; do
    [ -f "$file" ] || die "$file does not exist"
    files+=("$(readlink -f "$file")")
done

# dpkg-shlibdeps wants to run in a source package: give it an empty one.
work=$(mktemp -d "${TMPDIR:-/tmp}/deb-depends.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/debian"
: >"$work/debian/control"
if ! (cd "$work" && dpkg-shlibdeps --warnings=0 -O "${files[@]}") >"$work/out" 2>"$work/err"; then
    die "dpkg-shlibdeps failed: $(grep -v "should already be installed in their package's directory" "$work/err" | tr '\n' ' ')"
fi
shlibs=$(sed -n 's/^shlibs:Depends=//p' "$work/out")
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no shared libraries in: $*"

# One dependency per line, without duplicates of our own two.
deps=$(echo "$shlibs" | tr ',' '\n' | sed 's/^ *//; s/ *$//' | grep -v '^$' |
    grep -v -E "^($python_package|fuse3)( |$)" || true)
echo "$deps" | grep -q -E '^libfuse3-[0-9]+( |$)' ||
    die "none of the files links libfuse3 (is pyfuse3's extension among them?): $*"

echo "$python_package, fuse3, $(echo "$deps" | paste -sd, - | sed 's/,/, /g')"
