#!/usr/bin/env bash
# `make image`: builds the Dockerfile, unchanged, into OCI archives:
#   dist/auth-proxy-distroless-amd64.oci.tar, dist/auth-proxy-scratch-amd64.oci.tar,
#   dist/auth-proxy-distroless-arm64.oci.tar and dist/auth-proxy-distroless.oci.tar
#   (an OCI index of both architectures), for `docker load`, `podman load` or
#   `skopeo copy oci-archive:<file> docker://<registry>/<name>`.
#
# With a working Docker engine or Podman, they build it. Without (a CI machine,
# this repository's), Debian's buildah does, daemonless (chroot
# isolation; overlay storage where root may mount it), under dist/containers. The two base images the Dockerfile names
# cannot be pulled there: local stand-ins are built under the same names from
# Debian packages (README "Container image" says what differs from the real ones):
#   oven/bun:<pinned>-debian       Debian 12 (mmdebstrap minbase + ca-certificates)
#                                  and the pinned Bun from the npm package at /usr/local/bin/bun
#   gcr.io/distroless/base-nossl-debian12:nonroot
#                                  libc6 and its dependencies (extracted, no maintainer
#                                  scripts), the CA bundle, tzdata's zoneinfo, passwd/group
#                                  with nonroot 65532, /home/nonroot, /tmp; no shell
# The package registry `bun install` uses in the build comes from this
# machine's npm configuration (`npm config get registry`), as a build argument.
#
# arm64: the distroless target needs no RUN on arm64 (Bun cross-compiles in the
# build stage, which runs on the build machine's platform). Docker and Podman
# build it from the Dockerfile. buildah 1.28 (Debian 12) cannot: once a stage
# says `FROM --platform=$BUILDPLATFORM`, it looks the later stages' bases up
# for that platform ("image not known"). So with buildah the arm64 image is
# assembled: the Dockerfile's build stage cross-compiles the binary, which is
# copied onto the arm64 distroless base with the amd64 image's config (user,
# env, ports, healthcheck, entrypoint, labels) copied field by field;
# `make image-test` checks both the same way. The scratch target's rootfs
# stage runs ldd on arm64: it is built only where arm64 binaries run
# (binfmt_misc with qemu-aarch64), and skipped with a message elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUN_VERSION=$(node -p 'require("./package.json").devDependencies.bun')
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
REGISTRY=$(npm config get registry)
BUN_IMAGE="docker.io/oven/bun:${BUN_VERSION}-debian"
DISTROLESS_IMAGE="gcr.io/distroless/base-nossl-debian12:nonroot"
mkdir -p dist
work=dist/image-work
rm -rf "$work" && mkdir -p "$work"

build_args=(--build-arg "GIT_COMMIT=${REVISION}" --build-arg "NPM_CONFIG_REGISTRY=${REGISTRY}")
targets=(distroless-amd64 scratch-amd64)
if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  targets+=(distroless-arm64 scratch-arm64)
else
  echo "scratch-arm64 skipped: its rootfs stage runs on arm64 and this machine cannot (no binfmt_misc qemu-aarch64)"
fi

# ---------------------------------------------------------------- Docker or Podman, when they work
if docker info >/dev/null 2>&1 || { command -v podman >/dev/null && podman info >/dev/null 2>&1; }; then
  engine=docker
  docker info >/dev/null 2>&1 || engine=podman
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || targets+=(distroless-arm64)
  for target_arch in "${targets[@]}"; do
    target=${target_arch%-*} arch=${target_arch##*-}
    "$engine" build --platform "linux/${arch}" --target "$target" "${build_args[@]}" -t "auth-proxy:${target}-${arch}" .
    if [ "$engine" = podman ]; then
      podman save --format oci-archive -o "dist/auth-proxy-${target}-${arch}.oci.tar" "auth-proxy:${target}-${arch}"
    else
      # Docker 25 and later save an OCI image layout (index.json) that both load.
      docker save -o "dist/auth-proxy-${target}-${arch}.oci.tar" "auth-proxy:${target}-${arch}"
    fi
  done
  echo "multi-arch index: use 'docker buildx build --platform linux/amd64,linux/arm64' (see .github/workflows/release.yml)"
  exit 0
fi

# ---------------------------------------------------------------- buildah
for tool in buildah skopeo mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "make image needs $tool: apt-get install buildah skopeo umoci mmdebstrap" >&2; exit 1; }
done
# overlay where the kernel lets root mount it (layers shared, not copied); vfs elsewhere (a full copy a layer, slow but works anywhere).
driver=${STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
  driver=vfs
  probe=$(command buildah --root "$PWD/dist/containers/overlay-probe" --runroot "$PWD/dist/containers/overlay-probe-run" --storage-driver overlay from scratch 2>/dev/null) &&
    command buildah --root "$PWD/dist/containers/overlay-probe" --runroot "$PWD/dist/containers/overlay-probe-run" --storage-driver overlay mount "$probe" >/dev/null 2>&1 && driver=overlay
  command buildah --root "$PWD/dist/containers/overlay-probe" --runroot "$PWD/dist/containers/overlay-probe-run" --storage-driver overlay rm -a >/dev/null 2>&1 || true
fi
store="$PWD/dist/containers/$driver"
echo "buildah storage: $driver ($store)"
buildah() { command buildah --root "$store/storage" --runroot "$store/run" --storage-driver "$driver" "$@"; }
export BUILDAH_ISOLATION=chroot
# Docker's image format keeps HEALTHCHECK, which the OCI image config has no field for.
export BUILDAH_FORMAT=docker

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# Debian 12 with the pinned Bun at the path the real image has it, for the build stage (amd64).
bun_standin() {
  local name="localhost/standin-bun-amd64:${BUN_VERSION}"
  image_exists "$name" && return 0
  echo "stand-in ${BUN_IMAGE}: Debian 12 minbase + ca-certificates (mmdebstrap) + Bun ${BUN_VERSION} from the npm package"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates --architectures=amd64 bookworm "$work/bun-debian.tar"
  mkdir -p "$work/bun/usr/local/bin" "$work/bun/etc/ssl/certs"
  cp "$(readlink -f node_modules/bun/bin/bun.exe)" "$work/bun/usr/local/bin/bun"
  # This machine's trust: a registry reached through a TLS-inspecting proxy is signed by a CA only the machine's bundle has.
  cp /etc/ssl/certs/ca-certificates.crt "$work/bun/etc/ssl/certs/ca-certificates.crt"
  ln -sf bun "$work/bun/usr/local/bin/bunx"
  local container
  container=$(buildah from scratch)
  buildah add "$container" "$work/bun-debian.tar" / >/dev/null
  buildah copy "$container" "$work/bun/" / >/dev/null
  buildah config --arch amd64 --os linux --workingdir /home/bun/app --cmd /usr/local/bin/bun \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env BUN_RUNTIME_TRANSPILER_CACHE_PATH=0 \
    --env NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
    --label "org.opencontainers.image.description=auth-proxy build stand-in for ${BUN_IMAGE}" "$container"
  buildah commit --quiet --rm "$container" "$name" >/dev/null
}

# glibc, CA certificates, zoneinfo and the nonroot user: what distroless/base-nossl holds, for one architecture.
distroless_standin() {
  local arch=$1 name="localhost/standin-distroless-${1}:nonroot" root="$work/distroless-$1"
  image_exists "$name" && return 0
  echo "stand-in ${DISTROLESS_IMAGE} (${arch}): libc6 extracted by mmdebstrap, the CA bundle, zoneinfo, nonroot 65532"
  # extract: packages unpacked, no maintainer scripts run, so no arm64 code runs here either.
  mmdebstrap --quiet --variant=extract --include=libc6 --architectures="$arch" bookworm "$root"
  # What mmdebstrap leaves for a system to boot (device nodes, fstab, dpkg's state) is no part of an image.
  rm -rf "$root"/usr/share/{doc,man,info,lintian,locale} "$root"/var/{cache,lib,log} "$root"/etc/{apt,dpkg,fstab,hostname,resolv.conf} "$root"/dev/*
  mkdir -p "$root/etc/ssl/certs" "$root/usr/share" "$root/home/nonroot" "$root/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  cp -r /usr/share/zoneinfo "$root/usr/share/zoneinfo"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n' >"$root/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
  cp /etc/os-release "$root/etc/os-release"
  chown 65532:65532 "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  tar --numeric-owner -C "$root" -cf "$root.tar" .
  local container
  container=$(buildah from scratch)
  buildah add "$container" "$root.tar" / >/dev/null
  buildah config --arch "$arch" --os linux --user 65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label "org.opencontainers.image.description=auth-proxy build stand-in for ${DISTROLESS_IMAGE}" "$container"
  buildah commit --quiet --rm "$container" "$name" >/dev/null
}

bun_standin
distroless_standin amd64
distroless_standin arm64
# The Dockerfile's names point at the stand-ins; the distroless name at the architecture being built.
buildah tag "localhost/standin-bun-amd64:${BUN_VERSION}" "$BUN_IMAGE"
buildah tag "localhost/standin-distroless-amd64:nonroot" "$DISTROLESS_IMAGE"
# Docker sets BUILDARCH itself; buildah 1.28 leaves it unset. --layers lets the targets share the build stage.
bud=(bud --quiet --pull=never --layers --format docker --build-arg BUILDARCH=amd64 "${build_args[@]}")

save() {
  rm -f "dist/auth-proxy-$1-$2.oci.tar"
  # An OCI layout holding Docker's manifest and config: converted to OCI's, the config would lose HEALTHCHECK.
  buildah push --quiet --format v2s2 "localhost/auth-proxy:$1-$2" "oci-archive:dist/auth-proxy-$1-$2.oci.tar:auth-proxy:$1"
  echo "dist/auth-proxy-$1-$2.oci.tar $(du -h "dist/auth-proxy-$1-$2.oci.tar" | cut -f1)"
}

for target_arch in "${targets[@]}"; do
  target=${target_arch%-*} arch=${target_arch##*-}
  echo "building ${target} for linux/${arch} (buildah, ${driver}, chroot isolation)"
  # --format docker keeps HEALTHCHECK (the OCI image config has no field for it); the archive is OCI either way.
  buildah "${bud[@]}" --platform "linux/${arch}" --target "$target" -t "localhost/auth-proxy:${target}-${arch}" . >/dev/null
  save "$target" "$arch"
done

if [[ " ${targets[*]} " != *" distroless-arm64 "* ]]; then
  echo "assembling distroless for linux/arm64: the build stage's cross-compiled binary on the arm64 base, the amd64 image's config"
  buildah "${bud[@]}" --platform linux/amd64 --target build --build-arg TARGETARCH=arm64 -t localhost/auth-proxy-build:arm64 . >/dev/null
  stage=$(buildah from --pull=never localhost/auth-proxy-build:arm64)
  cp "$(buildah mount "$stage")/out/auth-proxy" "$work/auth-proxy-arm64"
  buildah umount "$stage" >/dev/null && buildah rm "$stage" >/dev/null
  final=$(buildah from --pull=never --arch arm64 "localhost/standin-distroless-arm64:nonroot")
  buildah copy --chown 0:0 "$final" "$work/auth-proxy-arm64" /auth-proxy >/dev/null
  config=()
  while IFS= read -r -d '' argument; do config+=("$argument"); done < <(buildah inspect --type image localhost/auth-proxy:distroless-amd64 | node_modules/.bin/bun deploy/image/config-args.ts)
  buildah config "${config[@]}" "$final"
  buildah commit --quiet --rm --format docker "$final" localhost/auth-proxy:distroless-arm64 >/dev/null
  save distroless arm64
fi

# One index for both architectures of the default target: what a registry would serve.
buildah manifest rm localhost/auth-proxy:distroless >/dev/null 2>&1 || true
buildah manifest create localhost/auth-proxy:distroless >/dev/null
for arch in amd64 arm64; do buildah manifest add --arch "$arch" --os linux localhost/auth-proxy:distroless "localhost/auth-proxy:distroless-${arch}" >/dev/null; done
rm -f dist/auth-proxy-distroless.oci.tar
buildah manifest push --quiet --all --format v2s2 localhost/auth-proxy:distroless "oci-archive:dist/auth-proxy-distroless.oci.tar:auth-proxy:distroless"
echo "dist/auth-proxy-distroless.oci.tar (index: linux/amd64, linux/arm64) $(du -h dist/auth-proxy-distroless.oci.tar | cut -f1)"
rm -rf "$work"
