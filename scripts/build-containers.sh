#!/usr/bin/env bash
# Builds the images of the compose stacks: the node (Dockerfile), and Orthanc, MLflow and PostgreSQL (docker/*/).
# Every image starts from debian:bookworm-slim; where there is none and none can be pulled, it is made with
# debootstrap (as root, from Debian's mirror).
#
#   CA_BUNDLE  CA certificates for pip inside the builds (default: $PIP_CERT, else pip's global.cert)
#   PIP_CONF   a pip configuration file for the builds (default: none)
#   TAG        the images' tag (default: local)
#   NO_CACHE   1: build every layer again (from scratch, but for the base image)
#
# Both files reach the builds as BuildKit secrets, mounted only while pip runs: no image keeps them. A torch CPU
# wheel in the host's pip find-links is handed to the node's build (docker/wheels/), so pip needs no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=debian:bookworm-slim
TAG=${TAG:-local}
LOGS=build/containers
TORCH_WHEEL_PATTERN='torch-2.13.0+cpu-cp311-cp311-manylinux*_x86_64.whl'   # the Makefile's pin, Debian's Python

die() { echo "build-containers: $*" >&2; exit 1; }

# A docker client that builds with BuildKit (secrets): one with the buildx plugin, or one older than 23.0, whose
# built-in BuildKit needs no plugin (Debian's docker.io 20.10).
buildkit_client() {
  local client major
  for client in docker /usr/bin/docker; do
    command -v "$client" >/dev/null 2>&1 || continue
    if "$client" buildx version >/dev/null 2>&1; then echo "$client"; return; fi
    major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 23 )); then echo "$client"; return; fi
  done
  die "no docker client here builds with BuildKit: install the buildx plugin, or Debian's docker.io"
}

make_base_image() {
  command -v debootstrap >/dev/null || die "no $BASE_IMAGE image, none can be pulled, and debootstrap is missing"
  [ "$(id -u)" -eq 0 ] || die "making $BASE_IMAGE with debootstrap needs root"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "making $BASE_IMAGE with debootstrap"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$LOGS/debootstrap.log" 2>&1 \
    || { tail -20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
  # the sources of the official image: the release, its updates and its security updates
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  # nothing of this machine: its name server and host name are the container engine's to give
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/etc/resolv.conf "$root"/etc/hostname
  tar -C "$root" -c . | docker import --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  trap - EXIT
}

stage_torch_wheel() {
  local links directory wheel
  links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
  for directory in $links; do
    for wheel in "$directory"/$TORCH_WHEEL_PATTERN; do
      [ -f "$wheel" ] || continue
      if [ ! -f "docker/wheels/$(basename "$wheel")" ]; then
        cp "$wheel" docker/wheels/.partial && mv docker/wheels/.partial "docker/wheels/$(basename "$wheel")"
      fi
      return
    done
  done
}

# build NAME DOCKERFILE CONTEXT: the image dicom-node[-NAME]:TAG, its log in build/containers/NAME.log. The image
# it replaces is removed where nothing else uses it, so that builds again and again do not fill the disk.
build() {
  local name=$1 dockerfile=$2 context=$3 image=dicom-node:$TAG started replaced
  [ "$name" = node ] || image="dicom-node-$name:$TAG"
  replaced=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  started=$SECONDS
  if ! DOCKER_BUILDKIT=1 "$CLIENT" build --network host --progress plain "${OPTIONS[@]}" \
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --file "$dockerfile" --tag "$image" "$context" >"$LOGS/$name.log" 2>&1; then
    tail -30 "$LOGS/$name.log" >&2
    die "building $image failed (whole log: $LOGS/$name.log)"
  fi
  echo "built $image in $((SECONDS - started)) s"
  if [ -n "$replaced" ] && [ "$replaced" != "$(docker image inspect --format '{{.Id}}' "$image")" ]; then
    docker rmi "$replaced" >/dev/null 2>&1 || true
  fi
}

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (start dockerd, as root)"
mkdir -p "$LOGS"
CLIENT=$(buildkit_client)

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  docker pull "$BASE_IMAGE" >/dev/null 2>&1 || make_base_image
fi

CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}}
OPTIONS=()
[ "${NO_CACHE:-0}" = 1 ] && OPTIONS+=(--no-cache)
if [ -n "$CA_BUNDLE" ]; then
  [ -f "$CA_BUNDLE" ] || die "CA_BUNDLE $CA_BUNDLE is not a file"
  OPTIONS+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi
if [ -n "${PIP_CONF:-}" ]; then
  [ -f "$PIP_CONF" ] || die "PIP_CONF $PIP_CONF is not a file"
  OPTIONS+=(--secret "id=pip_conf,src=$PIP_CONF")
fi
stage_torch_wheel

# The node's build waits mostly on downloads: the others run beside it (and it stops when one of them fails).
build node Dockerfile . &
node_build=$!
trap 'pkill -P "$node_build" || true; kill "$node_build" 2>/dev/null || true' EXIT
build orthanc docker/orthanc/Dockerfile docker/orthanc
build mlflow docker/mlflow/Dockerfile docker/mlflow
build postgres docker/postgres/Dockerfile docker/postgres
wait "$node_build"
trap - EXIT
