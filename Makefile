# auth-proxy: `make demo` shows it working, `make test` proves it.
# Needs only Node.js and npm: Bun comes from the pinned `bun` devDependency.

BUN := node_modules/.bin/bun
export PATH := $(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: install test typecheck demo run clean

install: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	@command -v openssl >/dev/null || { echo "openssl is needed to make test certificates: apt-get install openssl"; exit 1; }
	npm ci --no-audit --no-fund
	@touch $@

typecheck: install
	tsc --noEmit -p .

test: install typecheck
	$(BUN) test --timeout 60000

demo: install
	$(BUN) test/demo.ts

run: install
	$(BUN) proxy.ts

clean:
	rm -rf node_modules dist
