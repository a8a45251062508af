/**
 * Startup: bad configuration, every fault at once (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/config.ts called directly.
 */
import { describe, expect, test } from "bun:test";
import { chmodSync, existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { configurationWarnings, loadConfig, outboundProxyFor, parseRoutes } from "../src/config.ts";
import { freePort, ROOT, ROUTES_MODE, spawnProxy, startProxy } from "../test/harness.ts";
import { startConnectProxy } from "../test/http.ts";
import { appCertificate, baseEnv, certs, CLIENT_ID, describeSecrets, entra, OPENAI_SCOPE, PASSWORD, readJson, resetEntra, useSuite } from "../test/suite.ts";

useSuite();

describe("Startup", () => {
  /** Runs the proxy with `env` and expects a fast exit with `expected` on stderr and no stack trace. */
  async function expectConfigError(env: Record<string, string | undefined>, expected: (string | RegExp)[]): Promise<string> {
    const startedAt = performance.now();
    const proxy = spawnProxy({ PORT: "0", HOST: "127.0.0.1", ...env });
    const code = await proxy.exited;
    const elapsed = performance.now() - startedAt;
    expect(code).not.toBe(0);
    expect(elapsed).toBeLessThan(2000);
    for (const text of expected) expect(proxy.stderr).toMatch(text);
    expect(proxy.stderr).not.toMatch(/^\s+at /m);
    expect(proxy.stdout).not.toContain("auth-proxy started");
    return proxy.stderr;
  }

  test("missing variables are all listed at once", async () => {
    const stderr = await expectConfigError({}, ["Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CERTIFICATE_PATH, API_BASE_URL (or AUTH_PROXY_ROUTES)"]);
    expect(stderr.trim().split("\n")).toHaveLength(1);
  });

  test("several faults give one line each", async () => {
    const stderr = await expectConfigError(baseEnv({ AZURE_CLIENT_ID: undefined, API_BASE_URL: "not a url", PORT: "99999", LOG_LEVEL: "loud" }), [
      "Missing required Azure AD configuration: AZURE_CLIENT_ID",
      "API_BASE_URL=not a url is not a URL",
      "PORT=99999 is not a TCP port",
      "LOG_LEVEL=loud must be one of",
    ]);
    expect(stderr.trim().split("\n")).toHaveLength(4);
  });

  const badConfigurations: [string, () => Record<string, string | undefined>, (string | RegExp)[]][] = [
    ["API_BASE_URL that is not http(s)", () => baseEnv({ API_BASE_URL: "ftp://example.com" }), ["API_BASE_URL=ftp://example.com must start with https:// or http://"]],
    ["API_BASE_URL with a query", () => baseEnv({ API_BASE_URL: "https://x.openai.azure.com/?a=1" }), ["API_BASE_URL", "must not have a query"]],
    ["AZURE_AUTHORITY_HOST over plain http", () => baseEnv({ AZURE_AUTHORITY_HOST: "http://login.example" }), ["AZURE_AUTHORITY_HOST=http://login.example must start with https://"]],
    ["a client id that is not a GUID", () => baseEnv({ AZURE_CLIENT_ID: "my-app" }), ["AZURE_CLIENT_ID=my-app is not an application (client) ID"]],
    ["the 'common' tenant", () => baseEnv({ AZURE_TENANT_ID: "common" }), ["AZURE_TENANT_ID=common cannot be used with client credentials"]],
    ["a scope without /.default", () => baseEnv({ AZURE_SCOPE: "https://cognitiveservices.azure.com/user_impersonation" }), ["AZURE_SCOPE=", "/.default"]],
    ["a bad port", () => baseEnv({ PORT: "http" }), ["PORT=http is not a TCP port"]],
    ["a bad --port flag", () => ({ ...baseEnv(), __flags: "--port=-1" }), ["--port=-1 is not a TCP port"]],
    ["a negative SHUTDOWN_TIMEOUT", () => baseEnv({ SHUTDOWN_TIMEOUT: "-1" }), ["SHUTDOWN_TIMEOUT=-1 must be a number of seconds"]],
    ["an AUTH_PROXY_CONNECT_TIMEOUT that is not a number of seconds", () => baseEnv({ AUTH_PROXY_CONNECT_TIMEOUT: "10s" }), ["AUTH_PROXY_CONNECT_TIMEOUT=10s must be a number of seconds above 0 and at most 120"]],
    ["a certificate path that does not exist", () => baseEnv({ AZURE_CERTIFICATE_PATH: "/nonexistent/cert.pem" }), ["AZURE_CERTIFICATE_PATH=/nonexistent/cert.pem cannot be read (no such file)"]],
    ["a certificate path that is a directory", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.dir }), [`AZURE_CERTIFICATE_PATH=${certs.dir} cannot be read (is a directory)`]],
    ["a PEM without a certificate", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("key-only.pem", appCertificate.privateKeyPem) }), ["key-only.pem holds no certificate"]],
    ["a PEM without a private key", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("cert-only.pem", appCertificate.certificatePem) }), ["cert-only.pem holds no private key"]],
    ["a corrupt certificate block", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("corrupt.pem", "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n" + appCertificate.privateKeyPem) }), ["corrupt.pem holds a certificate block that cannot be parsed"]],
    ["a key that does not match the certificate", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("mismatch.pem", appCertificate.certificatePem + certs.client("other").privateKeyPem) }), [/the private key in AZURE_CERTIFICATE_PATH=\S+mismatch\.pem does not belong to its certificate \(CN=app/]],
    ["an encrypted key without a password", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("enc-nopass.pem", appCertificate.certificatePem + certs.encrypted("app", PASSWORD)) }), ["holds an encrypted private key; set AZURE_CERTIFICATE_PASSWORD"]],
    ["a wrong password", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.write("enc-wrong.pem", appCertificate.certificatePem + certs.encrypted("app", PASSWORD)), AZURE_CERTIFICATE_PASSWORD: "wrong password" }), [/AZURE_CERTIFICATE_PASSWORD does not decrypt the private key in \S+enc-wrong\.pem/]],
    ["both PROXY_API_KEYS and PROXY_API_KEYS_FILE", () => baseEnv({ PROXY_API_KEYS: "a", PROXY_API_KEYS_FILE: certs.write("keys-both.txt", "b\n") }), ["set PROXY_API_KEYS or PROXY_API_KEYS_FILE, not both"]],
    ["a caller keys file without keys", () => baseEnv({ PROXY_API_KEYS_FILE: certs.write("keys-empty.txt", "# none yet\n\n") }), [/PROXY_API_KEYS_FILE=\S+keys-empty\.txt holds no key/]],
    ["ADMIN_PORT equal to the proxy's own port", () => baseEnv({ PORT: "18080", ADMIN_PORT: "18080" }), ["ADMIN_PORT=18080 is the proxy's own port; the admin listener needs a port of its own"]],
    ["a bad ADMIN_PORT", () => baseEnv({ ADMIN_PORT: "admin" }), ["ADMIN_PORT=admin is not a TCP port"]],
    ["a caller keys file that does not exist", () => baseEnv({ PROXY_API_KEYS_FILE: "/nonexistent/keys" }), ["PROXY_API_KEYS_FILE=/nonexistent/keys cannot be read (no such file)"]],
    ["an unknown AZURE_AUTH_MODE", () => baseEnv({ AZURE_AUTH_MODE: "pod-identity" }), ["AZURE_AUTH_MODE=pod-identity is not an identity mode; use one of certificate, client-secret, workload-identity, managed-identity"]],
    ["a federated token file that does not exist", () => baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_FEDERATED_TOKEN_FILE: "/nonexistent/azure-identity-token" }), ["AZURE_FEDERATED_TOKEN_FILE=/nonexistent/azure-identity-token cannot be read (no such file)"]],
    ["an empty federated token file", () => baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_FEDERATED_TOKEN_FILE: certs.write("token-empty", "\n") }), [/AZURE_FEDERATED_TOKEN_FILE=\S+token-empty is empty/]],
    ["a federated token file that holds no JWT", () => baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_FEDERATED_TOKEN_FILE: certs.write("token-garbage", "not a token") }), [/AZURE_FEDERATED_TOKEN_FILE=\S+token-garbage does not hold a JWT/]],
    ["a client secret file that does not exist", () => baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_CLIENT_SECRET_FILE: "/nonexistent/secret" }), ["AZURE_CLIENT_SECRET_FILE=/nonexistent/secret cannot be read (no such file)"]],
    ["both AZURE_CLIENT_SECRET and AZURE_CLIENT_SECRET_FILE", () => baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_CLIENT_SECRET: PASSWORD, AZURE_CLIENT_SECRET_FILE: "/s" }), ["set AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE, not both"]],
    ["a managed identity client id that is not a GUID", () => baseEnv({ AZURE_AUTH_MODE: "managed-identity", AZURE_CLIENT_ID: "my-identity" }), ["AZURE_CLIENT_ID=my-identity is not a user-assigned managed identity's client ID"]],
    ["an EC certificate", () => baseEnv({ AZURE_CERTIFICATE_PATH: certs.client("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]).pemPath }), ["holds a EC key; Entra ID accepts only RSA certificates"]],
  ];
  for (const [name, env, expected] of badConfigurations) {
    test(`${name}: exits within 2 s with one clear line`, async () => {
      const { __flags, ...variables } = env() as Record<string, string | undefined>;
      if (__flags) {
        const startedAt = performance.now();
        const proxy = spawnProxy({ HOST: "127.0.0.1", ...variables }, [__flags]);
        expect(await proxy.exited).not.toBe(0);
        expect(performance.now() - startedAt).toBeLessThan(2000);
        for (const text of expected) expect(proxy.stderr).toMatch(text);
        return;
      }
      const stderr = await expectConfigError(variables, expected);
      expect(stderr.trim().split("\n")).toHaveLength(1);
      expect(stderr).not.toContain(PASSWORD);
    });
  }

  test("a port already in use exits with one clear line", async () => {
    const holder = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("taken") });
    await expectConfigError(baseEnv({ PORT: String(holder.port) }), [`cannot listen on 127.0.0.1:${holder.port} (EADDRINUSE)`]);
    holder.stop(true);
  });

  test("the certificate and key may come in any order, as PKCS#1 or encrypted PKCS#8, under either variable name", async () => {
    const layouts: Record<string, string>[] = [
      { AZURE_CERTIFICATE_PATH: certs.write("key-first.pem", appCertificate.privateKeyPem + appCertificate.certificatePem) },
      { AZURE_CERTIFICATE_PATH: certs.write("pkcs1.pem", appCertificate.certificatePem + certs.pkcs1("app")) },
      { AZURE_CERTIFICATE_PATH: certs.write("pkcs8-enc.pem", certs.encrypted("app", PASSWORD) + appCertificate.certificatePem), AZURE_CERTIFICATE_PASSWORD: PASSWORD },
      { AZURE_CLIENT_CERTIFICATE_PATH: certs.write("alias.pem", certs.encrypted("app", PASSWORD) + appCertificate.certificatePem), AZURE_CLIENT_CERTIFICATE_PASSWORD: PASSWORD },
    ];
    for (const layout of layouts) {
      const proxy = spawnProxy(baseEnv({ AZURE_CERTIFICATE_PATH: undefined, ...layout }), ["--check"]);
      expect(await proxy.exited).toBe(0);
      expect(JSON.parse(proxy.stdout).status).toBe("ok");
    }
  });

  test("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN=true sends x5c for subject-name/issuer authentication", async () => {
    const chained = certs.chained("sni-app");
    const sniClientId = "5b9f7e3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    entra.register({ clientId: sniClientId, certificates: [], trustedIssuerPem: chained.issuerPem });
    const env = baseEnv({ AZURE_CLIENT_ID: sniClientId, AZURE_CERTIFICATE_PATH: chained.pemPath });

    const withoutChain = spawnProxy(env, ["--check"]);
    expect(await withoutChain.exited).toBe(1);
    expect(withoutChain.stderr).toContain("AADSTS700027");

    const withChain = spawnProxy({ ...env, AZURE_CLIENT_SEND_CERTIFICATE_CHAIN: "true" }, ["--check"]);
    expect(await withChain.exited).toBe(0);
  });

  test("token requests go through HTTPS_PROXY, and NO_PROXY bypasses it; --check names the proxy, never its credentials", async () => {
    const corporate = await startConnectProxy();
    try {
      const proxied = spawnProxy(baseEnv({ HTTPS_PROXY: `http://proxyuser:proxy-password@127.0.0.1:${corporate.port}` }), ["--check"]);
      expect(await proxied.exited).toBe(0);
      expect(corporate.tunnels).toEqual([new URL(entra.authorityHost).host]);
      expect(JSON.parse(proxied.stdout)).toMatchObject({ outbound_proxy_token: `127.0.0.1:${corporate.port}`, outbound_proxy_upstream: "none" });
      expect(proxied.stdout).not.toContain("proxy-password");
      const bypassed = spawnProxy(baseEnv({ HTTPS_PROXY: `http://127.0.0.1:${corporate.port}`, NO_PROXY: "127.0.0.1" }), ["--check"]);
      expect(await bypassed.exited).toBe(0);
      expect(corporate.tunnels).toHaveLength(1);
    } finally {
      corporate.close();
    }
  });

  test("behind a dead outbound proxy, the failure names the proxy (host and port), not only the identity provider", async () => {
    const dead = freePort();
    const proxy = spawnProxy(baseEnv({ HTTPS_PROXY: `http://user:secret-proxy-pw@127.0.0.1:${dead}` }), ["--check"]);
    expect(await proxy.exited).toBe(1);
    expect(proxy.stderr).toContain(`token request to ${entra.authorityHost} through the outbound proxy 127.0.0.1:${dead} failed`);
    expect(proxy.stderr).not.toContain("secret-proxy-pw");
  });

  test("the startup line says which outbound proxy token and API traffic take", async () => {
    const corporate = await startConnectProxy();
    try {
      const proxy = await startProxy(baseEnv({ HTTPS_PROXY: `http://127.0.0.1:${corporate.port}`, API_BASE_URL: "https://my-resource.openai.azure.com" }));
      const started = await proxy.waitForLog((line) => line.msg === "auth-proxy started");
      expect(started).toMatchObject({ outbound_proxy_token: `127.0.0.1:${corporate.port}`, outbound_proxy_upstream: `127.0.0.1:${corporate.port}` });
      await proxy.stop();
    } finally {
      corporate.close();
    }
  });

  test("a .env file in the working folder configures neither `bun proxy.ts` nor the binary", async () => {
    const dotenv = join(ROOT, ".env");
    if (existsSync(dotenv)) return; // a developer's own .env is left alone; CI's checkout has none
    writeFileSync(dotenv, "LOG_LEVEL=bogus\nAPI_BASE_URL=ftp://from-dotenv\n");
    try {
      const proxy = await startProxy(baseEnv());
      await proxy.waitForHealth();
      expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toBeDefined();
      await proxy.stop();
    } finally {
      rmSync(dotenv, { force: true });
    }
  });

  test("allowed but almost surely wrong: a base URL ending in /openai, a private key every user can read, another Azure service's scope: a warn line each at start and in --check, each backend's whole URL shown", async () => {
    const readable = certs.write("world-readable.pem", readFileSync(appCertificate.pemPath, "utf8"));
    chmodSync(readable, 0o644);
    const proxy = await startProxy(baseEnv({ AZURE_CERTIFICATE_PATH: readable, API_BASE_URL: "https://x.openai.azure.com/openai/" }));
    const started = await proxy.waitForLog((line) => line.msg === "auth-proxy started");
    // `make test-binary` gives API_BASE_URL as a routes file of one route `/`: the same backend, named as a route's.
    const where = ROUTES_MODE ? "routes[0] (/)" : "API_BASE_URL";
    expect(ROUTES_MODE ? (started.routes as { backends: string[] }[])[0]!.backends : [started.upstream]).toEqual(["https://x.openai.azure.com/openai"]);
    const warnings = proxy.lines.filter((line) => line.level === "warn").map((line) => line.msg);
    expect(warnings).toContain(
      `${where}'s backend https://x.openai.azure.com/openai ends in /openai: a request to /openai/deployments/gpt-4o/chat/completions reaches https://x.openai.azure.com/openai/openai/deployments/gpt-4o/chat/completions; the OpenAI SDKs and LiteLLM add /openai themselves, so give the resource's URL without it (https://x.openai.azure.com)`,
    );
    expect(warnings).toContain(`AZURE_CERTIFICATE_PATH=${readable} is readable by every user (mode 0644): it holds the private key; make it 0600 for the proxy's user, or 0640 with a group of its own`);
    await proxy.stop();

    // A search route without its scope: the token would be refused with 401 on every call.
    const routes = certs.write("search-without-scope.yaml", "routes:\n  - prefix: /search\n    backends:\n      - url: https://my-search.search.windows.net\n  - prefix: /\n    backends:\n      - url: https://x.openai.azure.com\n");
    const check = spawnProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: routes }), ["--check"]);
    expect(await check.exited).toBe(0);
    const expected = `routes[0] (/search) sends ${OPENAI_SCOPE} tokens to my-search.search.windows.net, Azure AI Search, which accepts https://search.azure.com/.default: set scope: https://search.azure.com/.default on the route, or every request gets 401`;
    expect(check.stderr.trim().split("\n")).toEqual([`auth-proxy: warning: ${expected}`]);
    const report = JSON.parse(check.stdout);
    expect(report.warnings).toEqual([expected]);
    expect(report.routes[0].backends).toEqual(["https://my-search.search.windows.net"]);
    const started2 = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: routes }));
    await started2.waitForLog((line) => line.level === "warn" && line.msg === expected);
    await started2.stop();
  });

  test("the proxy listens at once while the first token is still being acquired", async () => {
    entra.outage = { kind: "hang" };
    try {
      const proxy = await startProxy(baseEnv());
      expect((await fetch(`${proxy.url}/live`)).status).toBe(200);
      const health = await fetch(`${proxy.url}/health`);
      expect(health.status).toBe(503);
      expect((await readJson(health)).status).toBe("unavailable");
      await proxy.stop();
    } finally {
      resetEntra();
    }
  });
});

describe("Pure pieces", () => {
  test("parseRoutes fills every default and keeps each backend's path", () => {
    const { routes, faults } = parseRoutes("routes:\n  - prefix: /search/\n    backends:\n      - url: https://s.search.windows.net/base/\n  - prefix: /\n    strip_prefix: false\n    scope: https://ai.azure.com/.default\n    backends:\n      - { url: 'https://a.example:8443', name: ptu, priority: 2, weight: 3, deployments: { gpt-4o: gpt-4o-eus2 }, connect_timeout: 2.5 }\n", OPENAI_SCOPE);
    expect(faults).toEqual([]);
    expect(routes).toEqual([
      { prefix: "/search", stripPrefix: true, scope: OPENAI_SCOPE, backends: [{ url: "https://s.search.windows.net/base", origin: "https://s.search.windows.net", name: "s.search.windows.net", priority: 1, weight: 1, deployments: {}, connectTimeoutMs: 10_000 }] },
      { prefix: "/", stripPrefix: false, scope: "https://ai.azure.com/.default", backends: [{ url: "https://a.example:8443", origin: "https://a.example:8443", name: "ptu", priority: 2, weight: 3, deployments: { "gpt-4o": "gpt-4o-eus2" }, connectTimeoutMs: 2500 }] },
    ]);
  });

  test("loadConfig makes API_BASE_URL the one route / with one backend: trailing slash dropped, path prefix kept", () => {
    const { config } = loadConfig({ AZURE_CLIENT_ID: CLIENT_ID, AZURE_TENANT_ID: "contoso.onmicrosoft.com", AZURE_CERTIFICATE_PATH: "/c.pem", API_BASE_URL: "https://r.openai.azure.com/base/" });
    expect(config).toMatchObject({ routesFile: undefined, host: "0.0.0.0", port: 8080, logLevel: "info", shutdownTimeoutMs: 25000, sendCertificateChain: false });
    expect(config!.routes).toEqual([
      { prefix: "/", stripPrefix: true, scope: OPENAI_SCOPE, backends: [{ url: "https://r.openai.azure.com/base", origin: "https://r.openai.azure.com", name: "r.openai.azure.com", priority: 1, weight: 1, deployments: {}, connectTimeoutMs: 10_000 }] },
    ]);
  });

  test("configurationWarnings knows the scopes of Azure services and when a backend's /openai path doubles", () => {
    const warn = (url: string, scope: string, prefix = "/", stripPrefix = true) => {
      const { routes } = parseRoutes(`routes:\n  - prefix: ${prefix}\n    strip_prefix: ${stripPrefix}\n    scope: ${scope}\n    backends:\n      - url: ${url}\n`, OPENAI_SCOPE);
      return configurationWarnings({ routes, routesFile: "r.yaml", authMode: "managed-identity", certificatePath: "", certificatePathSource: "" });
    };
    const cases: [string, string, string | undefined][] = [
      ["https://s.search.windows.net", OPENAI_SCOPE, "https://search.azure.com/.default"],
      ["https://s.search.windows.net", "https://search.azure.com/.default", undefined],
      ["https://acct.blob.core.windows.net", OPENAI_SCOPE, "https://storage.azure.com/.default"],
      ["https://acct.dfs.core.windows.net", "https://storage.azure.com/.default", undefined],
      // A storage account as its own resource is a scope Storage accepts.
      ["https://acct.blob.core.windows.net", "https://acct.blob.core.windows.net/.default", undefined],
      ["https://kv.vault.azure.net", OPENAI_SCOPE, "https://vault.azure.net/.default"],
      ["https://management.azure.com", OPENAI_SCOPE, "https://management.azure.com/.default"],
      ["https://management.azure.com", "https://management.core.windows.net/.default", undefined],
      ["https://graph.microsoft.com", OPENAI_SCOPE, "https://graph.microsoft.com/.default"],
      ["https://r.openai.azure.com", "https://search.azure.com/.default", "https://cognitiveservices.azure.com/.default"],
      ["https://r.openai.azure.com", "https://ai.azure.com/.default", undefined],
      ["https://r.cognitiveservices.azure.com", OPENAI_SCOPE, undefined],
      ["https://api.example.com", "api://my-api/.default", undefined],
    ];
    for (const [url, scope, wanted] of cases) {
      const warnings = warn(url, scope);
      if (wanted === undefined) expect(warnings, `${url} ${scope}`).toEqual([]);
      else expect(warnings, `${url} ${scope}`).toEqual([expect.stringContaining(`which accepts ${wanted}: set scope: ${wanted} on the route`)]);
    }
    // /openai in the backend's path doubles what the SDKs send, unless the route's own /openai prefix is cut before it.
    expect(warn("https://r.openai.azure.com/openai", OPENAI_SCOPE)[0]).toContain("a request to /openai/deployments/gpt-4o/chat/completions reaches https://r.openai.azure.com/openai/openai/deployments/gpt-4o/chat/completions");
    expect(warn("https://r.openai.azure.com/openai", OPENAI_SCOPE, "/aoai")[0]).toContain("a request to /aoai/openai/deployments/gpt-4o/chat/completions reaches https://r.openai.azure.com/openai/openai/deployments");
    expect(warn("https://r.openai.azure.com/openai", OPENAI_SCOPE, "/openai")).toEqual([]);
    expect(warn("https://r.openai.azure.com/openai", OPENAI_SCOPE, "/openai", false)[0]).toContain("reaches https://r.openai.azure.com/openai/openai/deployments");
  });

  test("outboundProxyFor follows HTTPS_PROXY/HTTP_PROXY and NO_PROXY as curl does", () => {
    const proxy = "http://proxy.corp:3128";
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy })).toBe(proxy);
    expect(outboundProxyFor("https://x.openai.azure.com", { https_proxy: proxy })).toBe(proxy);
    expect(outboundProxyFor("http://10.0.0.1:8080", { HTTPS_PROXY: proxy })).toBeUndefined();
    expect(outboundProxyFor("http://10.0.0.1:8080", { HTTP_PROXY: proxy })).toBe(proxy);
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy, NO_PROXY: ".azure.com" })).toBeUndefined();
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy, NO_PROXY: "openai.azure.com" })).toBeUndefined();
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy, NO_PROXY: "*" })).toBeUndefined();
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy, NO_PROXY: "x.openai.azure.com:8443" })).toBe(proxy);
    expect(outboundProxyFor("https://x.openai.azure.com", { HTTPS_PROXY: proxy, NO_PROXY: "ai.azure.com" })).toBe(proxy);
  });
});

describeSecrets();
