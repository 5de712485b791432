#!/usr/bin/env bash
# Make, without any container registry, a Debian base image the Dockerfiles can build FROM:
# debootstrap of the Debian release the images use, Debian's Python 3 (with venv and pip, as the
# Python images have), this host's extra CA certificates, imported into Docker under TAG.
#
# Usage: images/local-base.sh TAG [SUITE] [MIRROR]     (as root: debootstrap and chroot need it)
#   TAG     image name to create, e.g. swapper-base:bookworm; nothing is done if it exists
#   SUITE   Debian release (default bookworm, the release of python:3.12-slim-bookworm)
#   MIRROR  Debian mirror (default http://deb.debian.org/debian)
#
# Then: docker build --build-arg PYTHON_IMAGE=TAG -f images/cpu/Dockerfile .
# Certificates in /usr/local/share/ca-certificates are trusted inside the image, so apt and pip in
# the build work behind a TLS-intercepting proxy. Environment: DOCKER (the client, default docker),
# SECURITY_MIRROR (default: MIRROR with debian-security for debian).
set -euo pipefail

tag=${1:?image tag}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

if "$docker" image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"
  exit 0
fi
for tool in debootstrap chroot; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install debootstrap)" >&2; exit 2; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/swapper-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
fs=$work/rootfs

debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,python3-pip \
  "$suite" "$fs" "$mirror"

# the suites Debian's own images list, so builds get security and point-release updates
security=${SECURITY_MIRROR:-${mirror%/debian}/debian-security}
cat >"$fs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security $suite-security main
EOF

if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
  cp -a /usr/local/share/ca-certificates/. "$fs/usr/local/share/ca-certificates/"
fi
chroot "$fs" update-ca-certificates >/dev/null
rm -rf "$fs"/var/lib/apt/lists/* "$fs"/var/cache/apt/*.bin "$fs"/var/cache/apt/archives/*.deb

tar -C "$fs" --numeric-owner -c . \
  | "$docker" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
      --message "debootstrap --variant=minbase $suite ($mirror) + python3" - "$tag" >/dev/null
echo "$tag"
