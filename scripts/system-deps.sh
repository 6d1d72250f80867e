#!/usr/bin/env bash
# System (Debian) packages the project's tools call, installed when missing, then their versions.
#
#   scripts/system-deps.sh [--check] [GROUP ...]      (./dev system-deps GROUP ...)
#
# Groups (default: all):
#   image     buildah, debootstrap, debian-archive-keyring: scripts/image.sh and tests/container
#             (the base image is debootstrapped; images are built and run with buildah, never
#             podman or a Docker daemon)
#   browser   chromium: tests/integration/test_swagger_ui.py drives the Swagger UI in it
#             (headless, through Playwright; Playwright's own browser download is not used)
#
# Installing needs root and apt-get. --check installs nothing and exits 1 if anything is
# missing. Each line printed is "[deps] TOOL VERSION", so a CI log shows what its tests ran with.
set -euo pipefail

GROUPS_ALL=(image browser)
declare -A PACKAGES=(
  [image]="buildah debootstrap debian-archive-keyring"
  [browser]="chromium"
)
# One command per group that proves its tools run, not just that the packages are there.
declare -A PROBE=(
  [image]="buildah --version && debootstrap --version"
  # Debian's launcher warns on stderr when findmnt lists /dev/shm twice; show stderr on failure only
  [browser]="chromium --version 2>/dev/null || chromium --version"
)
CHECK=0
groups=()
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) [ -n "${PACKAGES[$arg]:-}" ] || { echo "[deps] unknown group $arg (${!PACKAGES[*]})" >&2; exit 2; }
       groups+=("$arg") ;;
  esac
done
[ ${#groups[@]} -gt 0 ] || groups=("${GROUPS_ALL[@]}")

installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

missing=()
for group in "${groups[@]}"; do
  for pkg in ${PACKAGES[$group]}; do
    installed "$pkg" || missing+=("$pkg")
  done
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$CHECK" = 1 ]; then echo "[deps] missing: ${missing[*]}" >&2; exit 1; fi
  [ "$(id -u)" = 0 ] || { echo "[deps] missing ${missing[*]}: run as root to install them" >&2; exit 1; }
  command -v apt-get >/dev/null || { echo "[deps] missing ${missing[*]} and no apt-get" >&2; exit 1; }
  echo "[deps] installing ${missing[*]} (apt-get) ..." >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/dev/null
fi

for group in "${groups[@]}"; do
  for pkg in ${PACKAGES[$group]}; do
    echo "[deps] $pkg $(dpkg-query -W -f '${Version}' "$pkg")"
  done
done
for group in "${groups[@]}"; do
  echo "[deps] $group: $(bash -c "${PROBE[$group]}" 2>&1 | tr '\n' ' ')"
done
