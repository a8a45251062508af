# syntax=docker/dockerfile:1.7
# auth-proxy images. Default target: distroless (glibc, no shell, uid 65532).
#   docker build -t auth-proxy .
#   docker build --target scratch -t auth-proxy:scratch .
#   docker buildx build --platform linux/amd64,linux/arm64 -t auth-proxy .
# Bun's compiled binaries link glibc (oven-sh/bun#4836), so the base is
# distroless/base (glibc) rather than distroless/static. Bun carries its own
# TLS and root CAs: the -nossl variant is enough.

ARG BUN_IMAGE=oven/bun:1.4.5-debian
ARG DISTROLESS_IMAGE=gcr.io/distroless/base-nossl-debian12:nonroot

# ---- build: on the build machine's platform; bun cross-compiles for the target.
FROM --platform=$BUILDPLATFORM ${BUN_IMAGE} AS build
ARG TARGETARCH
ARG BUILDARCH
ARG GIT_COMMIT=unknown
# The registry `bun install` (and the cross-compile's Bun download) uses: `make image` passes the machine's npm one.
ARG NPM_CONFIG_REGISTRY=https://registry.npmjs.org/
WORKDIR /src
COPY package.json bun.lock ./
RUN bun install --frozen-lockfile
COPY tsconfig.json bunfig.toml proxy.ts ./
COPY src ./src
RUN bun run typecheck
# The same flags as `make build`: they live in package.json's "build" script.
RUN case "$TARGETARCH" in \
      amd64) target=bun-linux-x64 ;; \
      arm64) target=bun-linux-arm64 ;; \
      *) echo "unsupported TARGETARCH=$TARGETARCH" >&2; exit 1 ;; \
    esac \
 && bun run build --target="$target" --outfile /out/auth-proxy --define "AUTH_PROXY_COMMIT=\"$GIT_COMMIT\"" \
 && if [ "$TARGETARCH" = "$BUILDARCH" ]; then /out/auth-proxy --version; fi

# ---- rootfs: on the target platform, so ldd finds the target's glibc.
FROM ${BUN_IMAGE} AS rootfs
COPY --from=build /out/auth-proxy /out/auth-proxy
COPY deploy/rootfs.sh /rootfs.sh
RUN sh /rootfs.sh /out/auth-proxy /rootfs

# ---- scratch: only the binary, glibc, passwd/group and a CA bundle.
FROM scratch AS scratch
ARG GIT_COMMIT=unknown
COPY --from=rootfs /rootfs/ /
LABEL org.opencontainers.image.title="auth-proxy" \
      org.opencontainers.image.description="Entra ID token sidecar for Azure OpenAI (certificate, workload identity, managed identity, client secret)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="scratch"
USER 65532:65532
# Raise Bun's 256 concurrent-fetch cap at start (the proxy would re-exec itself to do so).
ENV BUN_CONFIG_MAX_HTTP_REQUESTS=65535 HOST=0.0.0.0 PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/auth-proxy", "--healthcheck"]
ENTRYPOINT ["/auth-proxy"]

# ---- distroless (default).
FROM ${DISTROLESS_IMAGE} AS distroless
ARG GIT_COMMIT=unknown
ARG DISTROLESS_IMAGE
COPY --from=build /out/auth-proxy /auth-proxy
LABEL org.opencontainers.image.title="auth-proxy" \
      org.opencontainers.image.description="Entra ID token sidecar for Azure OpenAI (certificate, workload identity, managed identity, client secret)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.base.name="${DISTROLESS_IMAGE}"
USER 65532:65532
ENV BUN_CONFIG_MAX_HTTP_REQUESTS=65535 HOST=0.0.0.0 PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/auth-proxy", "--healthcheck"]
ENTRYPOINT ["/auth-proxy"]
