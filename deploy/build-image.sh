#!/bin/sh
# Builds the plcsense worker image for linux/amd64 and linux/arm64 with docker buildx and pushes it with
# provenance and SBOM attestations. A multi-platform image cannot be loaded into the local image store:
# for a local test, build one platform with --load.
#
#   deploy/build-image.sh registry.example/plcsense                  # tag: the version in pyproject.toml
#   deploy/build-image.sh registry.example/plcsense:0.1.0-rc1
#   deploy/build-image.sh plcsense:local --platform linux/arm64 --load
#   deploy/build-image.sh registry.example/plcsense --dry-run         # print the command only
#
# Building for the other architecture needs a buildx builder that can: the docker-container driver with
# QEMU emulation (docker run --privileged --rm tonistiigi/binfmt --install arm64,amd64; docker buildx create
# --use), or native nodes of both architectures (docker buildx create --append). The image installs
# wheels only (--only-binary), so emulated builds compile nothing.
set -eu

usage() {
    echo "usage: $0 IMAGE[:TAG] [--platform LIST] [--load] [--dry-run]"
}

root=$(cd "$(dirname "$0")/.." && pwd)
image=""
platforms=linux/amd64,linux/arm64
load=""
dry_run=""
while [ $# -gt 0 ]; do
    case $1 in
        --platform) [ $# -ge 2 ] || { usage >&2; exit 2; }; platforms=$2; shift 2 ;;
        --load) load=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) image=$1; shift ;;
    esac
done
[ -n "$image" ] || { usage >&2; exit 2; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
case ${image##*/} in
    *:*) ;;
    *) image="$image:$version" ;;
esac

if [ -n "$load" ]; then
    case $platforms in
        *,*) echo "--load takes one platform (e.g. --platform linux/arm64)" >&2; exit 2 ;;
    esac
    output="--load"
else
    output="--push --provenance=mode=max --sbom=true"
fi

# shellcheck disable=SC2086 # $output holds several options on purpose
set -- docker buildx build --platform "$platforms" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg CREATED="$created" \
    --tag "$image" $output --file "$root/Dockerfile" "$root"

if [ -n "$dry_run" ]; then
    echo "$@"
    exit 0
fi
exec "$@"
