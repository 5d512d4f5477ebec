#!/bin/sh
# Build a Debian 12 (bookworm) base image from scratch with debootstrap and import it into Docker:
# for machines that cannot pull from Docker Hub. Needs root and debootstrap (apt-get install debootstrap).
#
#   deploy/docker/debian-base.sh IMAGE [MIRROR]
#
# MIRROR defaults to the first Debian mirror apt uses here (/etc/apt/sources.list*), else deb.debian.org.
set -eu
image=${1:?usage: debian-base.sh IMAGE [MIRROR]}
mirror=${2:-$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
    | head -n1 | tr -d ' ')}
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
# nothing of the build machine's apt state goes into the image
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$image"
