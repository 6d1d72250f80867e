#!/usr/bin/env bash
# Build the CPU OCI image of bento-lmm with buildah: no Docker daemon, no Docker Hub.
#
#   scripts/image.sh [--bento TAG] [--config FILE] [--tag IMAGE:TAG] [--export PATH]
#                    [--rebuild-base] [--base-only]
#   ./dev image ...        (the same, after ./dev's setup and model build)
#
#   1. tools        scripts/system-deps.sh image: buildah, debootstrap, debian-archive-keyring
#                   installed with apt-get when missing (needs root)
#   2. base image   localhost/bento-lmm-base:bookworm: debootstrap bookworm minbase (Debian's
#                   python3 is 3.11), the host CA bundle (PyPI is reached through a TLS-intercepting
#                   proxy), uv. Made once and reused while its recipe (this script's settings and
#                   the CA bundle) is unchanged; --rebuild-base makes it again.
#   3. Bento        `bentoml build --arg-file CONFIG` of this checkout (bentofile.yaml) unless
#                   --bento names one. The config is baked into the Bento (BentoML 1.4 build args).
#   4. containerize `bentoml containerize --backend buildah` with BUILDAH_ISOLATION=chroot. The CPU
#                   torch wheel is bind-mounted at /wheels for the build only (bentofile.yaml
#                   python.find_links), so the multi-GB CUDA build of torch is never pulled.
#   5. report       image id, size and tags (IMAGE:TAG and IMAGE:latest); --export PATH writes an
#                   OCI archive (load it with `buildah pull oci-archive:PATH` or `skopeo copy oci-archive:...`).
#
# Environment: BENTOML_HOME (stores), BENTOML (bentoml executable), TORCH_WHEEL (the CPU wheel;
# otherwise searched in $PIP_FIND_LINKS and /opt/wheels), DEBIAN_MIRROR, HOST_CA_BUNDLE,
# BASE_IMAGE (default: bentofile.yaml's docker.base_image), UV_VERSION, WORK_DIR (scratch space,
# default /var/tmp/bento-lmm-image).
# Run the image (podman run cannot set rlimits here; chroot isolation shares the host network):
#   buildah from --name lmm IMAGE
#   buildah run --isolation chroot lmm -- /home/bentoml/bento/env/docker/entrypoint.sh serve --port 3000
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

# The base image is the one bentofile.yaml builds on (docker.base_image).
BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^[[:space:]]*base_image:[[:space:]]*\([^[:space:]#]*\).*/\1/p' \
  bentofile.yaml | head -1)}
[ -n "$BASE_IMAGE" ] || { echo "[image] error: no docker.base_image in bentofile.yaml" >&2; exit 1; }
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
UV_VERSION=${UV_VERSION:-0.13.9}
WORK_DIR=${WORK_DIR:-/var/tmp/bento-lmm-image}
# ca-certificates: the host bundle is installed as a local CA, so BentoML's apt-get step (which
# reinstalls ca-certificates and reruns update-ca-certificates) keeps it.
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
CONFIG=configs/default.yaml
BENTO=""
IMAGE=""
EXPORT=""
REBUILD_BASE=0
BASE_ONLY=0
T_BASE=0 T_BENTO=0 T_CONTAINERIZE=0 T_EXPORT=0

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --bento) BENTO=${2:?--bento TAG}; shift 2 ;;
    --config) CONFIG=${2:?--config FILE}; shift 2 ;;
    --tag) IMAGE=${2:?--tag IMAGE:TAG}; shift 2 ;;
    --export) EXPORT=${2:?--export PATH}; shift 2 ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --base-only) BASE_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if [ -n "$IMAGE" ] && [[ "${IMAGE##*/}" != *:* ]]; then die "--tag wants IMAGE:TAG, got $IMAGE"; fi

if [ -z "${BENTOML:-}" ]; then
  if [ -x "$ROOT/.venv/bin/bentoml" ]; then BENTOML=$ROOT/.venv/bin/bentoml
  else BENTOML=$(command -v bentoml) || die "bentoml not found: run ./dev setup"; fi
fi
export BENTOML_DO_NOT_TRACK=True

CLEANUP_CTR=""
cleanup() {
  if [ -n "$CLEANUP_CTR" ]; then buildah rm "$CLEANUP_CTR" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK_DIR/rootfs" "$WORK_DIR/rootfs.tar" "$WORK_DIR/wheels"
}
trap cleanup EXIT

# -- 1. tools --------------------------------------------------------------------------------
ensure_tools() {
  [ "$(id -u)" = 0 ] || die "run as root: debootstrap and chroot-isolated builds need it"
  # The one list of the image path's system packages (installed when missing).
  bash "$ROOT/scripts/system-deps.sh" image | sed 's/^\[deps\]/[image] tools:/' >&2 \
    || die "could not install the image tools (scripts/system-deps.sh image)"
}

# -- 2. base image ---------------------------------------------------------------------------
base_recipe() {  # changes whenever the base image would come out different
  { echo "bookworm minbase $BASE_PACKAGES uv=$UV_VERSION recipe=2"; sha256sum < "$HOST_CA_BUNDLE"; } \
    | sha256sum | cut -c1-16
}

build_base() {
  [ -s "$HOST_CA_BUNDLE" ] || die "host CA bundle $HOST_CA_BUNDLE not found (set HOST_CA_BUNDLE)"
  local recipe have t0 rootfs ctr
  recipe=$(base_recipe)
  have=$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "bento-lmm.base-recipe"}}' \
    "$BASE_IMAGE" 2>/dev/null || true)
  if [ "$REBUILD_BASE" = 0 ] && [ "$have" = "$recipe" ]; then
    log "base image $BASE_IMAGE is up to date (recipe $recipe), reusing it"
    return
  fi
  if [ -n "$have" ] && [ "$REBUILD_BASE" = 0 ]; then
    log "base image $BASE_IMAGE has recipe $have, want $recipe: rebuilding it"
  fi
  t0=$(now)
  rootfs="$WORK_DIR/rootfs"
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  log "debootstrap --variant=minbase --include=$BASE_PACKAGES bookworm ($DEBIAN_MIRROR) ..."
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" \
    > "$WORK_DIR/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK_DIR/debootstrap.log" >&2; die "debootstrap failed (log: $WORK_DIR/debootstrap.log)"; }
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  log "debootstrap done in $(( $(now) - t0 ))s ($(du -sh "$rootfs" | cut -f1))"

  ctr=$(buildah from scratch)
  CLEANUP_CTR=$ctr
  tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$WORK_DIR/rootfs.tar" .
  rm -rf "$rootfs"
  buildah add "$ctr" "$WORK_DIR/rootfs.tar" / >/dev/null
  rm -f "$WORK_DIR/rootfs.tar"
  buildah copy "$ctr" "$HOST_CA_BUNDLE" /usr/local/share/ca-certificates/host-ca-bundle.crt >/dev/null
  log "base: adding the host CA bundle and uv $UV_VERSION ..."
  # update-ca-certificates merges the host bundle into /etc/ssl/certs/ca-certificates.crt
  # (its rehash step warns about multi-certificate files: harmless).
  buildah run --isolation chroot "$ctr" -- sh -euc "
    update-ca-certificates >/dev/null 2>&1
    python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore -q \
      --cert /etc/ssl/certs/ca-certificates.crt uv==$UV_VERSION
    echo \"[image] base: \$(python3 --version), \$(uv --version)\" >&2"
  # SSL_CERT_FILE is what uv (BentoML's installer) reads; pip and requests have their own.
  # uv must use Debian's Python 3.11, never download one.
  buildah config \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env UV_PYTHON_DOWNLOADS=never \
    --env UV_PYTHON_PREFERENCE=only-system \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label bento-lmm.base-recipe="$recipe" \
    --label org.opencontainers.image.title=bento-lmm-base \
    --label org.opencontainers.image.description="Debian bookworm minbase, Python 3.11, host CA bundle, uv" \
    "$ctr"
  buildah commit --rm --quiet "$ctr" "$BASE_IMAGE" >/dev/null
  CLEANUP_CTR=""
  T_BASE=$(( $(now) - t0 ))
  log "base image $BASE_IMAGE built in ${T_BASE}s, $(image_size "$BASE_IMAGE")"
}

image_size() {  # as buildah reports it, e.g. "2.1 GB"
  buildah images --json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["size"])'
}

# -- 3. Bento --------------------------------------------------------------------------------
build_bento() {
  local t0 out
  t0=$(now)
  if [ -n "$BENTO" ]; then
    BENTO=$("$BENTOML" get "$BENTO" -o json \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["name"]+":"+d["version"])') \
      || die "no Bento $BENTO in the store (BENTOML_HOME=${BENTOML_HOME:-~/bentoml})"
    log "using Bento $BENTO"
    return
  fi
  log "bentoml build --arg-file $CONFIG ..."
  out=$("$BENTOML" build -o tag --arg-file "$CONFIG") || die "bentoml build failed"
  BENTO=$(printf '%s\n' "$out" | sed -n 's/^__tag__://p' | tail -1)
  [ -n "$BENTO" ] || die "bentoml build printed no tag: $out"
  T_BENTO=$(( $(now) - t0 ))
  log "built Bento $BENTO in ${T_BENTO}s"
}

# -- 4. containerize -------------------------------------------------------------------------
find_torch_wheel() {
  local version dir whl
  version=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements/base.txt | head -1)
  [ -n "$version" ] || die "no torch==VERSION pin in requirements/base.txt"
  if [ -n "${TORCH_WHEEL:-}" ]; then
    [ -f "$TORCH_WHEEL" ] || die "TORCH_WHEEL=$TORCH_WHEEL does not exist"
    echo "$TORCH_WHEEL"; return
  fi
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    dir=${dir#file://}
    for whl in "$dir"/torch-"$version"+cpu-cp311-cp311-*linux*_x86_64.whl; do
      if [ -f "$whl" ]; then echo "$whl"; return; fi
    done
  done
  die "no torch-$version+cpu cp311 wheel in ${PIP_FIND_LINKS:-} /opt/wheels; set TORCH_WHEEL" \
      "(pip download --no-deps torch==$version+cpu --index-url https://download.pytorch.org/whl/cpu)"
}

containerize() {
  local t0 wheel wheels version
  wheel=$(find_torch_wheel)
  wheels="$WORK_DIR/wheels"
  rm -rf "$wheels"
  mkdir -p "$wheels"
  ln "$wheel" "$wheels/" 2>/dev/null || cp "$wheel" "$wheels/"
  version=${BENTO#*:}
  IMAGE=${IMAGE:-localhost/${BENTO%%:*}:$version}
  log "torch wheel $(basename "$wheel"), bind-mounted at /wheels for the build"
  log "bentoml containerize $BENTO --backend buildah -t $IMAGE (BUILDAH_ISOLATION=chroot) ..."
  t0=$(now)
  # BUILDAH_LAYERS: unchanged steps (apt-get, uv venv, the pip install while the requirements
  # stay the same) come from the layer cache on the next build.
  BUILDAH_ISOLATION=chroot BUILDAH_LAYERS=true \
    "$BENTOML" containerize "$BENTO" --backend buildah --image-tag "$IMAGE" \
      --opt "volume=$wheels:/wheels:ro" \
      --opt label=org.opencontainers.image.title=bento-lmm \
      --opt "label=org.opencontainers.image.description=bento-lmm Bento $BENTO, CPU" \
      --opt label=org.opencontainers.image.version="$version" \
      --opt label=org.opencontainers.image.base.name="$BASE_IMAGE" \
      --opt label=com.bentoml.bento="$BENTO" \
    || die "bentoml containerize failed"
  T_CONTAINERIZE=$(( $(now) - t0 ))
  rm -rf "$wheels"
  buildah tag "$IMAGE" "${IMAGE%:*}:latest"
  log "containerized in ${T_CONTAINERIZE}s"
}

# -- 5. report / export ----------------------------------------------------------------------
report() {
  local id size
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE")
  size=$(image_size "$IMAGE")
  log "image: $IMAGE (also ${IMAGE%:*}:latest)"
  log "image id: $id"
  log "image size: $size"
  if [ -n "$EXPORT" ]; then
    local t0
    t0=$(now)
    mkdir -p "$(dirname "$EXPORT")"
    rm -f "$EXPORT"
    log "exporting OCI archive $EXPORT ..."
    buildah push --quiet "$IMAGE" "oci-archive:$EXPORT:$IMAGE" >/dev/null
    T_EXPORT=$(( $(now) - t0 ))
    log "exported $EXPORT ($(du -h "$EXPORT" | cut -f1)) in ${T_EXPORT}s"
  fi
  log "run: buildah from --name lmm $IMAGE && buildah run --isolation chroot lmm -- \\"
  log "       /home/bentoml/bento/env/docker/entrypoint.sh serve --port 3000"
  log "timings: base=${T_BASE}s bento=${T_BENTO}s containerize=${T_CONTAINERIZE}s" \
      "export=${T_EXPORT}s total=$(( $(now) - T0 ))s"
  # One machine-readable line on stdout, for scripts and tests.
  printf 'IMAGE=%s IMAGE_ID=%s BENTO=%s\n' "$IMAGE" "$id" "$BENTO"
}

mkdir -p "$WORK_DIR"
T0=$(now)
ensure_tools
build_base
if [ "$BASE_ONLY" = 1 ]; then log "done in $(( $(now) - T0 ))s"; exit 0; fi
build_bento
containerize
report
