# auth-proxy: `make demo` shows it working, `make test` proves it.
# Needs only Node.js and npm (plus openssl for test certificates): Bun comes
# from the pinned `bun` devDependency.

BUN := node_modules/.bin/bun
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)

# The compile flags live in package.json's "build" script, shared with the Dockerfile.
COMMIT := $(shell git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)
BUILD := $(BUN) run build --define 'AUTH_PROXY_COMMIT="$(COMMIT)"'
# bun-linux-x64 needs AVX2; X64_TARGET=bun-linux-x64-baseline runs on older CPUs.
X64_TARGET ?= bun-linux-x64

.PHONY: install test test-tools typecheck demo run build build-x64 test-binary image-check image image-test bench bench-ab soak clean

install: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	@command -v openssl >/dev/null || { echo "openssl is needed to make test certificates: apt-get install openssl"; exit 1; }
	npm ci --no-audit --no-fund
	@touch $@

typecheck: install
	tsc --noEmit -p .

# promtool (Debian's prometheus package) checks the /metrics exposition and the alert rules in the suite;
# python3 holds a listener that never accepts (a SYN-dropping backend: Node and Bun accept on their own).
test-tools:
	@command -v python3 >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing python3 (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null; \
	  else echo "python3 is needed by the tests: sudo apt-get install python3"; exit 1; fi; }
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing promtool (apt: prometheus)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool is needed by the tests: sudo apt-get install prometheus"; exit 1; fi; }
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then echo "installing redis-server (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null; \
	  else echo "redis-server is needed by the tests: sudo apt-get install redis-server"; exit 1; fi; }

test: install typecheck test-tools
	$(BUN) test --timeout 60000 --parallel=2

demo: install
	$(BUN) test/demo.ts

run: install
	$(BUN) proxy.ts

build-x64: install
	$(BUILD) --target=$(X64_TARGET) --outfile dist/auth-proxy

build: build-x64
	$(BUILD) --target=bun-linux-arm64 --outfile dist/auth-proxy-linux-arm64
	@ls -l dist/

# The whole suite against the compiled binary instead of `bun proxy.ts`, with every API_BASE_URL
# given as a routes file of one route `/` (test/harness.ts): the two configurations must behave alike.
test-binary: build-x64 test-tools
	AUTH_PROXY_BIN=$(CURDIR)/dist/auth-proxy AUTH_PROXY_TEST_ROUTES=1 $(BUN) test --timeout 60000 --parallel=2

# What the scratch image holds, in a read-only chroot as uid 65532 (no Docker engine needed).
image-check: build
	$(BUN) test/image-check.ts dist/auth-proxy
	@if command -v qemu-aarch64 >/dev/null && [ -d /usr/aarch64-linux-gnu ]; then \
	  echo "arm64 smoke (qemu-user): $$(qemu-aarch64 -L /usr/aarch64-linux-gnu dist/auth-proxy-linux-arm64 --version)"; \
	else echo "arm64 smoke skipped: apt-get install qemu-user libc6-arm64-cross"; fi

# The Dockerfile built into OCI archives in dist/ (Docker or Podman when they work, else buildah
# with local stand-ins for the two base images); see deploy/image/build.sh and README "Container image".
IMAGE_TOOLS := buildah skopeo umoci mmdebstrap
image: install
	@missing=; for tool in $(IMAGE_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ] && ! docker info >/dev/null 2>&1; then echo "installing$$missing (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IMAGE_TOOLS) >/dev/null; fi
	bash deploy/image/build.sh

# Each archive's config, contents and the binary inside it run read-only as uid 65532.
image-test: install
	@missing=; for tool in skopeo umoci qemu-aarch64; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "installing skopeo umoci qemu-user (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo umoci qemu-user >/dev/null; fi
	$(BUN) test/image-test.ts

# Side by side with the upstream direct, nginx and a bare Bun passthrough; writes bench/RESULTS.md.
bench: build-x64
	@missing=; for tool in wrk nginx taskset; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then echo "installing wrk and nginx (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx util-linux >/dev/null; fi
	X64_TARGET=$(X64_TARGET) $(BUN) bench/run.ts
	$(BUN) bench/pool-load.ts
	$(BUN) bench/hostile-backends.ts

# The working tree's build against BASE's (a git ref, default HEAD), side by side in alternating rounds:
# what a change costs, measured against its own baseline on the same machine at the same time.
BASE ?= HEAD
bench-ab: build-x64
	@command -v wrk >/dev/null || { echo "installing wrk (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk util-linux >/dev/null; }
	rm -rf dist/base && mkdir -p dist/base
	git archive $(BASE) proxy.ts package.json $$(git ls-tree --name-only $(BASE) src) | tar -x -C dist/base --exclude='*.test.ts'
	cd dist/base && $(CURDIR)/$(BUN) run build --define 'AUTH_PROXY_COMMIT="$(shell git rev-parse --short=12 $(BASE))"' --target=$(X64_TARGET) --outfile auth-proxy
	$(BUN) bench/ab.ts dist/base/auth-proxy dist/auth-proxy

# Minutes under load, hostile input and long silences (about 15 min); writes its section of bench/RESULTS.md.
# Each proxied stream holds two sockets: the open-file limit is raised as far as the hard limit allows.
soak: build-x64 test-tools
	ulimit -n $$(ulimit -Hn) && $(BUN) bench/soak.ts
	$(BUN) bench/limits-soak.ts dist/auth-proxy

clean:
	rm -rf node_modules dist
