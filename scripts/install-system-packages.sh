#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use as real DICOM peers and judges, and the container
# engine, Compose and debootstrap of the container tests, and Node.js for the tests' OpenID Connect provider.
# Skips apt entirely when every program is already present.
set -euo pipefail

# program -> Debian package
declare -A needed=(
  [storescu]=dcmtk
  [docker-compose]=docker-compose
  [Orthanc]=orthanc
  [dciodvfy]=dicom3tools
  [java]=default-jre-headless
  [openssl]=openssl
  [chromium]=chromium
  [dockerd]=docker.io
  [debootstrap]=debootstrap
  # the tests' OpenID Connect provider (npm's oidc-provider) needs Node.js 20 or newer: these machines have it
  [node]=nodejs
  [npm]=npm
)

missing=()
for program in "${!needed[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${needed[$program]}")
done
# PostgreSQL's server programs are not on PATH in Debian's layout.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# PixelMed's DicomSRValidator is a jar, not a program.
[ -f /usr/share/java/pixelmed.jar ] || missing+=(libpixelmed-java)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run this script as root, or install them)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
