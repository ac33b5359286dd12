#!/usr/bin/env bash
# Builds the packages of npu-supervisor into $OUT (default dist/): `make package` runs it.
#   npu-supervisor_VERSION_ARCH.deb           dpkg-deb
#   npu-supervisor-VERSION-1.ARCH.rpm         rpmbuild (Debian's `rpm` package; installed when missing)
#   npu-supervisor-VERSION-linux-ARCH.tar.gz  the same tree: `tar -C / -xzf ...`
# Each carries the stripped binaries in /usr/bin, the systemd units in /usr/lib/systemd/system, the example
# configuration as /etc/npu-supervisor/config.toml (a conffile: an edited one is kept on upgrade) and
# config.toml.example, and README.md + PROTOCOL.md (with toml++'s license) in /usr/share/doc/npu-supervisor.
#
# The binaries are built with --static-swift-stdlib (in .build-static, apart from the usual .build), so a host
# needs no Swift toolchain: only glibc, libstdc++/libgcc and libsystemd (checked with ldd below; the packages
# depend on them).
#
# Variables: OUT=dist; BUILD_DIR (skip the build and package the executables found there); ALLOW_DYNAMIC=1
# (accept binaries linked against the Swift runtime: only for the test of this script, with a debug build);
# FAST=1 (fastest compression: for that test; release packages use xz / gzip -9).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-dist}
SWIFT=${SWIFT:-swift}
VERSION=$(sed -nE 's/^public let npuSupervisorRelease = "(.*)"/\1/p' Sources/WireProtocol/Release.swift)
[ -n "$VERSION" ] || { echo "package: no version in Sources/WireProtocol/Release.swift" >&2; exit 1; }
DEB_ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
RPM_ARCH=$(uname -m)
EXES=(npu-supervisord npu-supervisorctl npu-worker npu-cgroup-exec)
say() { echo "package: $*"; }

if [ -z "${BUILD_DIR:-}" ]; then
    say "building with --static-swift-stdlib (several minutes the first time)"
    "$SWIFT" build -c release --static-swift-stdlib --scratch-path .build-static
    BUILD_DIR=.build-static/release
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=$work/bin
mkdir -p "$bin"
for exe in "${EXES[@]}"; do
    [ -x "$BUILD_DIR/$exe" ] || { echo "package: $BUILD_DIR/$exe is missing" >&2; exit 1; }
    strip -o "$bin/$exe" "$BUILD_DIR/$exe"
    if [ "${ALLOW_DYNAMIC:-0}" != 1 ] && ldd "$bin/$exe" | grep -q 'libswift\|libFoundation\|lib_FoundationICU\|libdispatch'; then
        echo "package: $exe links the Swift runtime dynamically; build it with --static-swift-stdlib:" >&2
        ldd "$bin/$exe" >&2
        exit 1
    fi
done

# One staged tree, laid out by the same script as `make install`.
root=$work/root
PREFIX=/usr SYSCONFDIR=/etc UNITDIR=/usr/lib/systemd/system DESTDIR=$root BUILD_DIR=$bin scripts/install.sh >/dev/null
install -m 0644 deploy/packaging/README.packaged.md "$root/usr/share/doc/npu-supervisor/README.packaged.md"
# The binaries contain toml++ (MIT): its notice goes with them.
install -m 0644 Sources/CTOMLParser/LICENSE "$root/usr/share/doc/npu-supervisor/LICENSE-tomlplusplus"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# .deb
deb=$work/deb
cp -a "$root" "$deb"
mkdir -p "$deb/DEBIAN"
size=$(du -sk "$deb" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$DEB_ARCH/" -e "s/@SIZE@/$size/" deploy/packaging/debian/control \
    >"$deb/DEBIAN/control"
echo /etc/npu-supervisor/config.toml >"$deb/DEBIAN/conffiles"
install -m 0755 deploy/packaging/debian/postinst "$deb/DEBIAN/postinst"
install -m 0755 deploy/packaging/debian/postrm "$deb/DEBIAN/postrm"
if [ "${FAST:-0}" = 1 ]; then DEBZ=(-Zgzip -z1); RPMZ=w1.gzdio; GZIP_LEVEL=-1; else DEBZ=(-Zxz); RPMZ=w9.gzdio; GZIP_LEVEL=-9; fi
dpkg-deb --root-owner-group "${DEBZ[@]}" --build "$deb" "$OUT/npu-supervisor_${VERSION}_${DEB_ARCH}.deb" >/dev/null
say "$OUT/npu-supervisor_${VERSION}_${DEB_ARCH}.deb"

# .rpm (rpmbuild packages the staged tree as it is: no build, no second strip, no debuginfo)
if ! command -v rpmbuild >/dev/null 2>&1; then
    say "installing Debian's rpm package (rpmbuild)"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rpm >/dev/null
fi
top=$work/rpm
mkdir -p "$top"/{BUILD,RPMS,SPECS,SOURCES,SRPMS}
rpmbuild -bb --quiet \
    --define "_topdir $top" --define "_npu_root $root" --define "_npu_version $VERSION" \
    --define "_build_id_links none" --define "__os_install_post %{nil}" --define "debug_package %{nil}" \
    --define "_binary_payload $RPMZ" \
    --target "$RPM_ARCH" deploy/packaging/rpm/npu-supervisor.spec >/dev/null
rpm=$(find "$top/RPMS" -name '*.rpm' | head -1)
cp "$rpm" "$OUT/"
say "$OUT/$(basename "$rpm")"

# tarball: the same tree, extract at /
tar -C "$root" --owner=0 --group=0 --numeric-owner -cf - . | gzip $GZIP_LEVEL >"$OUT/npu-supervisor-${VERSION}-linux-${RPM_ARCH}.tar.gz"
say "$OUT/npu-supervisor-${VERSION}-linux-${RPM_ARCH}.tar.gz"
