#!/usr/bin/env bash
# Build a minimal Debian base image with Python 3 for the adsvc Dockerfile, for machines
# that cannot pull `python:3.11-slim` (no image registry reachable):
#
#   deploy/build-base.sh [IMAGE]        # default adsvc-base:bookworm
#   docker build --build-arg BASE=adsvc-base:bookworm -t adsvc .
#
# debootstrap (minbase variant) of the host's Debian suite from the host's own Debian
# mirror (read from /etc/apt), plus python3, python3-venv and ca-certificates, imported
# with `docker import`. Skipped when the image already exists (FORCE=1 rebuilds).
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

IMAGE="${1:-adsvc-base:bookworm}"
SUITE="${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "build-base: $IMAGE exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base: debootstrap not installed" >&2; exit 1; }

# The Debian mirror the host uses for $SUITE: deb822 sources (URIs:/Suites:) first,
# then one-line sources; default deb.debian.org.
mirror_from_host() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r "$f" ]] || continue
        awk -v suite="$SUITE" '
            /^[ \t]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
            tolower($1) == "uris:"   { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (uri != "" && ok) print uri }' "$f" | grep -m1 . && return 0
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        awk -v suite="$SUITE" '$1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit } }' "$f" | grep -m1 . && return 0
    done
    echo "http://deb.debian.org/debian"
}
MIRROR="${MIRROR:-$(mirror_from_host | head -n1)}"

ROOTFS="$(mktemp -d /tmp/adsvc-base.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "build-base: debootstrap $SUITE from $MIRROR into $ROOTFS"
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# Trim what an image does not need: package caches, docs, man pages, locales.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
    -exec rm -rf {} + 2>/dev/null || true
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
    - "$IMAGE" >/dev/null
echo "build-base: $IMAGE built in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
