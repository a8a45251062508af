/**
 * auth-proxy's contract (shared/CONTRACT.md), one describe per section.
 * The proxy runs as its own process, as in production, against a fake
 * Entra ID over HTTPS that verifies client assertions and a fake Azure
 * OpenAI that records what it received (test/fakes.ts).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash, randomBytes, X509Certificate } from "node:crypto";
import { closeSync, constants as fsConstants, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import net from "node:net";
import { brotliCompressSync, constants as zlibConstants, deflateSync, gzipSync } from "node:zlib";
import { join } from "node:path";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { HorizontalPodAutoscaler } from "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1/NetworkPolicy";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1/PodDisruptionBudget";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { Secret } from "kubernetes-models/v1/Secret";
import { Service } from "kubernetes-models/v1/Service";
import { ServiceAccount } from "kubernetes-models/v1/ServiceAccount";
import { validateWorkflow } from "@action-validator/core";
import { AzureOpenAI } from "openai";
import packageJson from "./package.json" with { type: "json" };
import {
  asciiBytes,
  backoffDelay,
  chooseAuthMode,
  deploymentLabel,
  describeTokenError,
  encodeBytes,
  encodeInteger,
  encodeJsonString,
  encodeMillis,
  federatedCredentialHint,
  KEEP_ALIVE_IDLE_SECONDS,
  MAX_TOKEN_LIFETIME_MS,
  MIN_TOKEN_REQUEST_INTERVAL_MS,
  newMetrics,
  nextCollectionMark,
  WEBSOCKET_PING_SECONDS,
  loadConfig,
  matchRoute,
  parseCredential,
  parseRoutes,
  refreshDelay,
  removeHopByHopHeaders,
  requestTarget,
  upstreamSubprotocols,
  type Usage,
  usageInBody,
  websocketBaseUrl,
  outboundProxyFor,
  withoutCredentialParameters,
} from "./proxy.ts";
import { CertificateFactory, type ClientCertificate } from "./test/certificates.ts";
import { type AppRegistration, type CannedAnswer, FakeAzureOpenAI, FakeEntraId, FakeManagedIdentityEndpoint, FakeOidcIssuer, FakeRealtime, patternBytes, ScriptedBackend } from "./test/fakes.ts";
import { allOutput, freePort, type LogLine, memoryKiB, ROOT, ROUTES_MODE, spawnProxy, startProxy, stopAllProxies, type ProxyProcess } from "./test/harness.ts";
import { chunkedBodyReader, idleCloseAfterResponse, openStream, rawRequest, readSlowly, stalledUpload, startBlackHole, startConnectProxy, startSilentListener } from "./test/http.ts";
import { promtool, scrape, valueOf } from "./test/prometheus.ts";
import * as usage from "./test/usage.ts";
import { rawUpgrade, TestSocket } from "./test/websocket.ts";

const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const PASSWORD = "correct horse battery staple";
const CLIENT_SECRET = "Zq8~Xf2.secret-value-for-tests~9d2fK1";
const ROTATED_SECRET = "Lm3~Yt7.rotated-secret-value~4c8eJ0";
/** App Service's per-instance IDENTITY_HEADER values the managed identity tests used: secrets too. */
const identityHeaders: string[] = [];

const certs = new CertificateFactory();
let tls: ReturnType<CertificateFactory["serverTls"]>;
let entra: FakeEntraId;
let upstream: FakeAzureOpenAI;
let appCertificate: ClientCertificate;
/** Bodies the proxy itself answered with (errors, health): checked for secrets at the end. */
const proxyBodies: string[] = [];

function baseEnv(overrides: Record<string, string | undefined> = {}): Record<string, string | undefined> {
  return {
    AZURE_CLIENT_ID: CLIENT_ID,
    AZURE_TENANT_ID: entra.tenantId,
    AZURE_CERTIFICATE_PATH: appCertificate.pemPath,
    API_BASE_URL: upstream.url,
    AZURE_AUTHORITY_HOST: entra.authorityHost,
    NODE_EXTRA_CA_CERTS: tls.caPath,
    ...overrides,
  };
}

async function readJson(response: Response): Promise<any> {
  const text = await response.text();
  proxyBodies.push(text);
  return JSON.parse(text);
}

/** The SHA-256 thumbprint as Entra ID shows it, computed here independently of proxy.ts. */
function thumbprintOf(certificatePem: string): string {
  return new X509Certificate(certificatePem).fingerprint256.replace(/:/g, "");
}

function lastReceived() {
  return upstream.received.at(-1)!;
}

/** Restores the fake Entra ID to a healthy, long-lived default after a test changed it. */
function resetEntra(): void {
  entra.outage = undefined;
  entra.releaseHanging();
  entra.tokenLifetimeSeconds = 3600;
  entra.refreshInSeconds = undefined;
  entra.register({ clientId: CLIENT_ID, certificates: [appCertificate.certificatePem] });
}

/**
 * Silences longer than every server-side idle timer (Bun's 10 s default and
 * the proxy's keep-alive reaping) run in the background from the start of
 * the suite, and are checked at its end, so they cost no wall time.
 */
const LONG_SILENCE_MS = (KEEP_ALIVE_IDLE_SECONDS + 15) * 1000;
let longSilences: Promise<[string, string]>;
/** A WebSocket session silent for longer than the proxy's ping interval, then used again. */
const SILENT_SESSION_MS = (WEBSOCKET_PING_SECONDS + 10) * 1000;
let silentSession: Promise<string | Buffer | undefined>;
let realtime: FakeRealtime;
/**
 * Keep-alive connections left idle after a forwarded request: a small JSON
 * answer, an SSE stream, and a request whose upstream took longer than the
 * lift of the idle timer. Each must be closed about KEEP_ALIVE_IDLE_SECONDS
 * after its response, not kept open for good.
 */
const KEEP_ALIVE_WAIT_MS = (KEEP_ALIVE_IDLE_SECONDS + 15) * 1000;
let idleConnections: Promise<{ target: string; closedAfterMs: number | undefined; response: string }[]>;

/** What stalled uploads did to a pool: the failover of an ordinary request meanwhile, and the uploads' end after the idle time. */
interface StalledUploads {
  /** An ordinary 1 KB POST sent while they stalled: its status and backend (the first answers 429). */
  ordinary: { status: number; backend: string | null };
  /** auth_proxy_held_request_body_bytes while they stalled, and after they were closed. */
  heldWhileStalled: number;
  heldAfter: number;
  uploads: { announced: number; sent: number; response: string; closedAfterMs: number | undefined }[];
  lines: LogLine[];
}
let stalledUploads: Promise<StalledUploads>;
const STALLED_UPLOAD_WAIT_MS = (KEEP_ALIVE_IDLE_SECONDS + 25) * 1000;

/**
 * 16 uploads announcing 4 MiB and sending one byte, and 12 sending 3 MiB of
 * their 4 MiB, to a pool whose first backend answers 429: the replay budget
 * counts bytes received, arriving bodies hold at most half of it, and each
 * stalled one is closed after the idle time, its hold released.
 */
async function stallUploads(): Promise<StalledUploads> {
  const primary = new ScriptedBackend("stall-primary").start();
  primary.fallback = { status: 429, headers: { "retry-after-ms": "0" } };
  const secondary = new ScriptedBackend("stall-secondary").start();
  const file = certs.write("stall-pool.yaml", `routes:\n  - prefix: /\n    backends:\n      - url: ${primary.url}\n        name: stall-primary\n      - url: ${secondary.url}\n        name: stall-secondary\n        priority: 2\n`);
  const proxy = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: file, SHUTDOWN_TIMEOUT: "1" }));
  await proxy.waitForHealth();
  const held = async () => valueOf((await scrape(proxy.url)).samples, "auth_proxy_held_request_body_bytes") ?? -1;
  const plan = [...Array.from({ length: 16 }, () => 1), ...Array.from({ length: 12 }, () => 3 * 1024 * 1024)];
  const uploads = plan.map((sent) => ({ sent, announced: 4 * 1024 * 1024, ...stalledUpload(proxy.port, "/openai/deployments/x/files", 4 * 1024 * 1024, sent, STALLED_UPLOAD_WAIT_MS) }));
  await Promise.all(uploads.map((upload) => upload.written));
  const deadline = Date.now() + 10_000;
  while ((await held()) < 16 + 10 * 3 * 1024 * 1024 && Date.now() < deadline) await Bun.sleep(50);
  const heldWhileStalled = await held();
  const ordinary = await fetch(`${proxy.url}/openai/deployments/x/chat/completions`, { method: "POST", body: "x".repeat(1024) });
  await ordinary.text();
  const ended = await Promise.all(uploads.map((upload) => upload.done));
  const heldAfter = await held();
  for (const upload of uploads) upload.socket.destroy();
  const lines = [...proxy.lines];
  await proxy.stop();
  primary.stop();
  secondary.stop();
  return {
    ordinary: { status: ordinary.status, backend: ordinary.headers.get("x-backend") },
    heldWhileStalled,
    heldAfter,
    uploads: uploads.map(({ announced, sent }, index) => ({ announced, sent, ...ended[index]! })),
    lines,
  };
}

beforeAll(async () => {
  tls = certs.serverTls();
  entra = new FakeEntraId(tls).start();
  appCertificate = certs.client("app");
  resetEntra();
  upstream = await new FakeAzureOpenAI(entra).start();
  const proxy = await startProxy(baseEnv());
  await proxy.waitForHealth();
  const read = (path: string) => fetch(`${proxy.url}${path}`).then((response) => response.text());
  longSilences = Promise.all([read(`/test/silent?ms=${LONG_SILENCE_MS}`), read(`/test/silent-stream?ms=${LONG_SILENCE_MS}`)]);
  longSilences.catch(() => {}); // a filtered run (bun test -t) ends before they do
  const idle = (target: string, count: number) =>
    Array.from({ length: count }, () =>
      idleCloseAfterResponse(proxy.port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\n\r\n`, KEEP_ALIVE_WAIT_MS + 40_000).then((idle) => ({ target, ...idle })),
    );
  // The resets first, on fresh upstream connections: Bun's fetch resends a request whose reused
  // (pooled) connection is reset, on the next pooled one, and so on through the pool (measured:
  // 4 requests became 32 with 40 idle connections, none answered in 40 s; left for its own issue).
  const resets = idle("/test/hang-then-reset?ms=32000", 2);
  while (upstream.received.filter((request) => request.target.startsWith("/test/hang-then-reset")).length < 2) await Bun.sleep(10);
  idleConnections = Promise.all([
    ...resets,
    ...idle("/openai/models", 20),
    ...idle("/test/sse?events=3", 20),
    ...idle("/test/silent?ms=32000", 2),
    ...idle("/live", 5),
  ]);
  idleConnections.catch(() => {});
  stalledUploads = stallUploads();
  stalledUploads.catch(() => {});
  realtime = new FakeRealtime(entra).start();
  const websocketProxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url }));
  await websocketProxy.waitForHealth();
  silentSession = (async () => {
    const client = new TestSocket(`ws://127.0.0.1:${websocketProxy.port}/openai/v1/realtime?model=gpt-realtime`);
    await client.opened;
    await client.waitForFrames(1);
    await Bun.sleep(SILENT_SESSION_MS);
    client.send("after the silence");
    await client.waitForFrames(2, 5000);
    return client.frames[1];
  })();
  silentSession.catch(() => {});
});

afterAll(async () => {
  await stopAllProxies();
  entra.stop();
  await upstream.stop();
  realtime.stop();
  rmSync(certs.dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------- invocation

describe("Invocation", () => {
  test("--help lists every flag and exits 0", async () => {
    const proxy = spawnProxy({}, ["--help"]);
    expect(await proxy.exited).toBe(0);
    for (const flag of ["--client-id", "--tenant-id", "--certificate-path", "--api-base-url", "--host", "--port", "--scope", "--authority-host", "--log-level", "--check", "--help", "--version"]) {
      expect(proxy.stdout).toContain(flag);
    }
  });

  test("--version and -v print the version and exit 0", async () => {
    for (const flag of ["--version", "-v"]) {
      const proxy = spawnProxy({}, [flag]);
      expect(await proxy.exited).toBe(0);
      expect(proxy.stdout.trim()).toStartWith(packageJson.version);
    }
  });

  test("an unknown flag exits non-zero and points to --help", async () => {
    const proxy = spawnProxy(baseEnv(), ["--no-such-flag"]);
    expect(await proxy.exited).not.toBe(0);
    expect(proxy.stderr).toContain("--no-such-flag");
    expect(proxy.stderr).toContain("--help");
  });

  test("a stray argument is a configuration error naming it", async () => {
    const proxy = spawnProxy(baseEnv(), ["extra-arg", "--check"]);
    expect(await proxy.exited).toBe(2);
    expect(proxy.stderr).toContain("unknown argument extra-arg");
    expect(proxy.stdout).toBe("");
  });

  test("flags override the environment", async () => {
    const proxy = await startProxy(baseEnv({ API_BASE_URL: "http://127.0.0.1:9/wrong", LOG_LEVEL: "error" }), [
      "--api-base-url", `${upstream.url}/from-flag`,
      "--log-level", "info",
    ]);
    await proxy.waitForHealth();
    const response = await fetch(`${proxy.url}/x`);
    expect(response.status).toBe(200);
    expect(lastReceived().target).toBe("/from-flag/x");
    await proxy.waitForLog((line) => line.msg === "request");
    await proxy.stop();
  });

  test("--check acquires one token and prints a JSON summary without the token", async () => {
    const before = entra.issued.size;
    const proxy = spawnProxy(baseEnv(), ["--check"]);
    expect(await proxy.exited).toBe(0);
    const summary = JSON.parse(proxy.stdout);
    const thumbprint = thumbprintOf(appCertificate.certificatePem);
    expect(summary).toMatchObject({
      status: "ok",
      client_id: CLIENT_ID,
      tenant_id: entra.tenantId,
      scope: "https://cognitiveservices.azure.com/.default",
      // The log lines' name for it: one name for one thing.
      certificate_thumbprint: thumbprint,
    });
    expect(Date.parse(summary.token_expires_on)).toBeGreaterThan(Date.now());
    expect(entra.issued.size).toBe(before + 1);
    const token = [...entra.issued.keys()].at(-1)!;
    expect(proxy.stdout + proxy.stderr).not.toContain(token);
  });

  test("AZURE_SCOPE is the scope requested from Entra ID", async () => {
    const proxy = spawnProxy(baseEnv({ AZURE_SCOPE: "api://contoso-gateway/.default" }), ["--check"]);
    expect(await proxy.exited).toBe(0);
    expect(JSON.parse(proxy.stdout).scope).toBe("api://contoso-gateway/.default");
    expect(entra.scopes.at(-1)).toBe("api://contoso-gateway/.default");
  });

  test("--check exits 1 with the AADSTS error when Entra ID rejects the certificate", async () => {
    const stranger = certs.client("unregistered");
    const proxy = spawnProxy(baseEnv({ AZURE_CERTIFICATE_PATH: stranger.pemPath }), ["--check"]);
    expect(await proxy.exited).toBe(1);
    expect(proxy.stderr).toContain("AADSTS700027");
    expect(proxy.stderr.trim().split("\n")).toHaveLength(1);
  });
});

// ---------------------------------------------------------------- environment and startup

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
    const stderr = await expectConfigError({}, ["Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CERTIFICATE_PATH, API_BASE_URL"]);
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
    ["a caller keys file that does not exist", () => baseEnv({ PROXY_API_KEYS_FILE: "/nonexistent/keys" }), ["PROXY_API_KEYS_FILE=/nonexistent/keys cannot be read (ENOENT)"]],
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

// ---------------------------------------------------------------- endpoints

describe("Endpoints the proxy owns", () => {
  let proxy: ProxyProcess;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());

  test("/health answers 200 {status: ok} while a valid token is held", async () => {
    const response = await fetch(`${proxy.url}/health`);
    expect(response.status).toBe(200);
    expect(await readJson(response)).toEqual({ status: "ok" });
    const head = await fetch(`${proxy.url}/health`, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(await head.text()).toBe("");
  });

  test("/live answers 200 {status: ok} while the process serves", async () => {
    const response = await fetch(`${proxy.url}/live`);
    expect(response.status).toBe(200);
    expect(await readJson(response)).toEqual({ status: "ok" });
  });

  test("/health answers 503 with a reason while no valid token is held", async () => {
    entra.outage = { kind: "error", status: 401, error: "invalid_client", code: 700027, description: "Client assertion failed signature validation. [Reason - The key used is expired.]" };
    try {
      const starved = await startProxy(baseEnv());
      await starved.waitForLog((line) => line.msg === "token acquisition failed");
      const response = await fetch(`${starved.url}/health`);
      expect(response.status).toBe(503);
      const body = await readJson(response);
      expect(body.status).toBe("unavailable");
      expect(body.reason).toContain("AADSTS700027");
      await starved.stop();
    } finally {
      resetEntra();
    }
  });

  test("--healthcheck and --livecheck probe the running proxy at HOST:PORT and exit 0, within 2 s, whatever HTTP_PROXY says", async () => {
    for (const [flag, host] of [["--healthcheck", "127.0.0.1"], ["--livecheck", "0.0.0.0"]] as const) {
      const startedAt = performance.now();
      // A loopback probe never takes the outbound proxy (here one where nothing listens).
      const probe = spawnProxy({ HOST: host, PORT: String(proxy.port), HTTP_PROXY: `http://127.0.0.1:${freePort()}`, http_proxy: `http://127.0.0.1:${freePort()}` }, [flag]);
      expect(await probe.exited).toBe(0);
      expect(performance.now() - startedAt).toBeLessThan(2000);
      expect(probe.stdout).toContain('200 {"status":"ok"}');
    }
  });

  test("--healthcheck exits 1 when /health is not 200, and when nothing listens", async () => {
    entra.outage = { kind: "error", status: 401, error: "invalid_client", code: 700027, description: "Client assertion failed signature validation. [Reason - The key used is expired.]" };
    try {
      const starved = await startProxy(baseEnv());
      const unhealthy = spawnProxy({ HOST: "127.0.0.1", PORT: String(starved.port) }, ["--healthcheck"]);
      expect(await unhealthy.exited).toBe(1);
      expect(unhealthy.stdout).toContain("503");
      const live = spawnProxy({ HOST: "127.0.0.1", PORT: String(starved.port) }, ["--livecheck"]);
      expect(await live.exited).toBe(0);
      await starved.stop();
      const nobody = spawnProxy({ HOST: "127.0.0.1", PORT: String(starved.port) }, ["--healthcheck"]);
      expect(await nobody.exited).toBe(1);
      expect(nobody.stderr).toContain(`probe http://127.0.0.1:${starved.port}/health failed`);
    } finally {
      resetEntra();
    }
  });

  test("only exact GET/HEAD paths are the proxy's own; anything else is forwarded", async () => {
    for (const [method, path] of [["POST", "/health"], ["GET", "/health?verbose=1"], ["GET", "/healthz"], ["GET", "/live/"], ["DELETE", "/live"]] as const) {
      const response = await fetch(`${proxy.url}${path}`, { method });
      expect(response.status).toBe(200);
      expect(lastReceived().target).toBe(path);
      expect(lastReceived().method).toBe(method);
    }
  });
});

// ---------------------------------------------------------------- forwarding

describe("Forwarding", () => {
  let proxy: ProxyProcess;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv({ API_BASE_URL: `${upstream.url}/prefix/` }));
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());

  test("the raw path and query are appended to API_BASE_URL's prefix byte for byte", async () => {
    const target = "/openai/deployments/gpt-4o/x%2Fy/%7Ez%20w/caf%C3%A9?b=2&a=1&a=3&e=%20+%2B&empty=&flag";
    const response = await rawRequest(proxy.port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`);
    expect(response.status).toBe(200);
    expect(lastReceived().target).toBe(`/prefix${target}`);
  });

  test("hostile request targets never reach another origin", async () => {
    let trapped = 0;
    const trap = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => ((trapped += 1), new Response("trapped")) });
    const other = `127.0.0.1:${trap.port}`;
    const targets = [
      `//${other}/x`,
      `http://${other}/x`,
      `https://${other}/x`,
      `/../../x`,
      `/%2e%2e/%2e%2e/x`,
      `/%2E%2E%2F%2E%2E%2Fx`,
      `/\\${other}\\x`,
      `/\\\\${other}/x`,
      `/x/../../..//${other}/y`,
      `@${other}/x`,
    ];
    for (const target of targets) {
      const before = upstream.received.length;
      const response = await rawRequest(proxy.port, `GET ${target} HTTP/1.1\r\nHost: ${other}\r\nConnection: close\r\n\r\n`);
      if (response.status === 400) {
        expect(upstream.received.length).toBe(before); // refused by the HTTP parser: nothing forwarded
      } else {
        expect(response.status).toBe(200);
        expect(lastReceived().target).toStartWith("/prefix/");
        expect(lastReceived().headers.host).toBe(`127.0.0.1:${upstream.port}`);
      }
    }
    expect(trapped).toBe(0);
    trap.stop(true);
  });

  test("request headers pass unchanged except Host, Authorization, api-key and hop-by-hop headers", async () => {
    const request = [
      "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1",
      "Host: app.internal:8080",
      "Authorization: Bearer the-apps-placeholder",
      "api-key: sk-placeholder",
      "Connection: close, X-Hop-Named, Upgrade, HTTP2-Settings",
      "X-Hop-Named: 1",
      "Upgrade: h2c",
      "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
      "Keep-Alive: timeout=5",
      "Proxy-Authorization: Basic dXNlcjpwYXNz",
      "Proxy-Connection: keep-alive",
      "TE: trailers",
      "Trailer: X-Checksum",
      "User-Agent: OpenAI/Python 1.99.0",
      "Accept-Encoding: gzip",
      "X-Ms-Client-Request-Id: 42",
      "X-Repeated: a",
      "X-Repeated: b",
      "Content-Type: application/json",
      "Content-Length: 2",
      "",
      "{}",
    ].join("\r\n");
    await rawRequest(proxy.port, request);
    const received = lastReceived();
    const headers = received.headers;
    expect(headers.host).toBe(`127.0.0.1:${upstream.port}`);
    expect(headers.authorization).toMatch(/^Bearer fake-at-/);
    expect(entra.isValid(headers.authorization!.slice(7))).toBe(true);
    for (const removed of ["api-key", "x-hop-named", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade", "http2-settings"]) {
      expect(headers[removed]).toBeUndefined();
    }
    expect(headers["user-agent"]).toBe("OpenAI/Python 1.99.0");
    expect(headers["accept-encoding"]).toBe("gzip");
    expect(headers["x-ms-client-request-id"]).toBe("42");
    expect(headers["x-repeated"]).toBe("a, b");
    expect(headers["content-type"]).toBe("application/json");
    expect(received.bodySha256).toBe(createHash("sha256").update("{}").digest("hex"));
  });

  test("a 50 MB upload arrives byte-exact, streamed without the proxy holding the body", async () => {
    const size = 50 * 1024 * 1024;
    const body = randomBytes(size);
    const kib = (field: "VmRSS" | "VmHWM") => memoryKiB(proxy.proc.pid, field);
    const rssBefore = kib("VmRSS");
    const response = await fetch(`${proxy.url}/upload`, { method: "POST", body });
    expect(response.status).toBe(200);
    const received = lastReceived();
    expect(received.bodyLength).toBe(size);
    expect(received.bodySha256).toBe(createHash("sha256").update(body).digest("hex"));
    expect(received.headers["content-length"]).toBe(String(size));
    // VmHWM is the peak since start: had the body been buffered it would have grown by 50 MB.
    expect(kib("VmHWM") - rssBefore).toBeLessThan(25 * 1024);
  });

  test("a 300 MB response read slowly arrives byte-exact while the proxy's memory stays flat", async () => {
    const MB = 300;
    // The body is patternBytes(total), checked piece by piece against the same window of this reference:
    // the proxy frees each large chunk once Bun has written it, so a Bun that kept one would show here.
    const reference = patternBytes(4 * 1024 * 1024 + 251);
    let offset = 0;
    let mismatchAt = -1;
    const body = chunkedBodyReader((bytes) => {
      for (let start = 0; start < bytes.length; start += 4 * 1024 * 1024) {
        const piece = bytes.subarray(start, start + 4 * 1024 * 1024);
        const window = reference.subarray(offset % 251, (offset % 251) + piece.length);
        if (mismatchAt === -1 && !piece.equals(window)) mismatchAt = offset;
        offset += piece.length;
      }
    });
    const read = await readSlowly(proxy.port, `GET /test/big?mb=${MB} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`, proxy.proc.pid, body.push);
    expect(offset).toBe(MB * 1024 * 1024);
    expect(body.ended).toBe(true);
    expect(mismatchAt).toBe(-1);
    const mb = (kib: number) => (kib / 1024).toFixed(1);
    console.log(`300 MB read slowly: proxy RSS ${mb(read.beforeKiB)} MB before, +${mb(read.firstQuarterPeakKiB)} MB at most in the first quarter, +${mb(read.secondHalfPeakKiB)} MB in the second half`);
    // Flat: the second half of the transfer holds no more than the first quarter did (Bun's pipe grows it a few MB at first).
    expect(read.secondHalfPeakKiB - read.firstQuarterPeakKiB).toBeLessThan(4 * 1024);
    // Bun's native pipe (which cannot see where a body ends) holds about +9 MB; chunks left to the collector held +14-16 and rising.
    expect(read.peakKiB).toBeLessThan(10 * 1024);
  }, 60_000);

  test("a chunked upload of unknown length arrives byte-exact", async () => {
    const parts = [randomBytes(100_000), randomBytes(3), randomBytes(70_000)];
    const expected = createHash("sha256").update(Buffer.concat(parts)).digest("hex");
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const next = parts.shift();
        if (next) controller.enqueue(next);
        else controller.close();
      },
    });
    const response = await fetch(`${proxy.url}/upload-chunked`, { method: "POST", body: stream });
    expect(response.status).toBe(200);
    expect(lastReceived().bodySha256).toBe(expected);
    expect(lastReceived().bodyLength).toBe(170_003);
  });

  test("responses keep status and every header, repeated Set-Cookie too, minus hop-by-hop headers", async () => {
    const response = await fetch(`${proxy.url}/test/headers`);
    expect(response.status).toBe(200);
    expect(response.headers.getSetCookie()).toEqual(["a=1; Path=/", "b=2; Path=/"]);
    expect(response.headers.get("x-upstream")).toBe("yes");
    expect(response.headers.get("content-type")).toBe("text/plain");
    for (const removed of ["x-private-hop", "keep-alive", "proxy-authenticate", "upgrade"]) {
      expect(response.headers.get(removed)).toBeNull();
    }
    expect(await response.text()).toBe("headers");
    for (const code of [201, 404, 429, 500]) {
      const status = await fetch(`${proxy.url}/test/status?code=${code}`);
      expect(status.status).toBe(code);
      expect(await status.json()).toEqual({ status: code });
    }
  });

  test("a gzip body passes byte-exact with Content-Encoding kept", async () => {
    const response = await fetch(`${proxy.url}/test/gzip`, { headers: { "accept-encoding": "gzip" }, decompress: false } as RequestInit);
    expect(response.headers.get("content-encoding")).toBe("gzip");
    const bytes = Buffer.from(await response.arrayBuffer());
    expect(bytes[0]).toBe(0x1f); // gzip magic: not decoded on the way
    expect(createHash("sha256").update(bytes).digest("hex")).toBe(response.headers.get("x-body-sha256")!);
    expect(lastReceived().headers["accept-encoding"]).toBe("gzip");
  });

  test("each SSE event reaches the client as soon as the upstream sends it", async () => {
    // The fake sends event n+1 only after the client has received event n:
    // a proxy that held back even one event would deadlock here.
    // Bun.serve sends a streamed response's head with its first chunk
    // (oven-sh/bun PR #33660), so the first event is released before the head is awaited.
    upstream.gated = true;
    try {
      upstream.releaseEvent();
      const pending = fetch(`${proxy.url}/test/sse?events=5`);
      const response = await pending;
      expect(response.headers.get("content-type")).toBe("text/event-stream");
      const reader = response.body!.getReader();
      const decoder = new TextDecoder();
      let text = "";
      for (let event = 0; event < 5; event++) {
        if (event > 0) upstream.releaseEvent();
        while (!text.includes(`{"event":${event}}`)) {
          const { value, done } = await reader.read();
          expect(done).toBe(false);
          text += decoder.decode(value);
        }
      }
      expect((await reader.read()).done).toBe(true);
      expect(text).toBe([0, 1, 2, 3, 4].map((event) => `data: {"event":${event}}\n\n`).join(""));
    } finally {
      upstream.gated = false;
    }
  });

  test("upstream redirects are returned to the client, never followed", async () => {
    const before = upstream.received.length;
    const response = await fetch(`${proxy.url}/test/redirect`, { redirect: "manual" });
    expect(response.status).toBe(302);
    expect(response.headers.get("location")).toBe("https://elsewhere.example/steal");
    expect(upstream.received.length).toBe(before + 1);
  });

  test("a client disconnect aborts the upstream request within 1 s", async () => {
    const { socket } = await openStream(proxy.port, "GET /test/stream?ms=60000&interval=100 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    const record = lastReceived();
    expect(record.closedAtMs).toBeUndefined();
    const disconnectedAt = Date.now();
    socket.destroy();
    while (record.closedAtMs === undefined && Date.now() - disconnectedAt < 3000) await Bun.sleep(20);
    expect(record.closedAtMs).toBeDefined();
    expect(record.closedAtMs! - disconnectedAt).toBeLessThan(1000);
  });

  test("more than 256 concurrent streams all reach the upstream at once", async () => {
    const count = 300;
    const before = upstream.received.length;
    const streams = await Promise.all(
      Array.from({ length: count }, () => openStream(proxy.port, "GET /test/stream?ms=4000&interval=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n")),
    );
    const arrived = upstream.received.slice(before);
    expect(arrived).toHaveLength(count);
    // All started while every stream was still open: none waited in a queue for another to end.
    expect(arrived.every((record) => record.closedAtMs === undefined)).toBe(true);
    for (const { socket } of streams) socket.destroy();
  }, 20_000);

  test("an unreachable upstream gives 502 as OpenAI-shaped JSON", async () => {
    const closed = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
    const port = closed.port;
    closed.stop(true);
    const orphan = await startProxy(baseEnv({ API_BASE_URL: `http://127.0.0.1:${port}` }));
    await orphan.waitForHealth();
    const response = await fetch(`${orphan.url}/openai/models`);
    expect(response.status).toBe(502);
    const body = await readJson(response);
    expect(body.error).toMatchObject({ type: "auth_proxy_error", code: "upstream_unreachable" });
    expect(body.error.message).toContain(`127.0.0.1:${port}`);
    await orphan.stop();
  });

  test("an upstream 401 passes through unchanged and starts a token refresh", async () => {
    const acquisitions = () => proxy.lines.filter((line) => line.msg === "token acquired").length;
    const before = acquisitions();
    const response = await fetch(`${proxy.url}/test/status?code=401`);
    expect(response.status).toBe(401);
    expect(await response.json()).toEqual({ status: 401 });
    await proxy.waitForLog((line) => line.msg === "token acquired" && line.trigger === "upstream answered 401");
    expect(acquisitions()).toBe(before + 1);
  });

  test("the official openai SDK's AzureOpenAI client works through the proxy, streamed and not", async () => {
    const client = new AzureOpenAI({ endpoint: `http://127.0.0.1:${proxy.port}`, apiKey: "placeholder-key", apiVersion: "2024-10-21", deployment: "gpt-4o" });
    const completion = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }] });
    expect(completion.choices[0]!.message.content).toBe("Hello from the fake Azure OpenAI.");
    expect(lastReceived().target).toBe("/prefix/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    expect(lastReceived().headers["api-key"]).toBeUndefined();

    const stream = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true });
    let text = "";
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    expect(text).toBe("Hello from the fake Azure OpenAI.");
  });

  test("no request target climbs above API_BASE_URL's path prefix, whatever the Host header (empty, malformed, missing)", async () => {
    const prefixed = await startProxy(baseEnv({ API_BASE_URL: `${upstream.url}/openai/deployments/allowed` }));
    await prefixed.waitForHealth();
    const targets = ["/../../other/chat/completions", "/%2e%2e/%2E%2E/other/chat/completions", "/.%2e/x/../../other", "/x/./../../../other?q=/../../y", "/\\..\\..\\other"];
    let forwarded = 0;
    for (const hostLine of ["Host: \r\n", "Host: %%%\r\n", "Host: a b/c\r\n", "Host: x:99999\r\n", "Host: [::1\r\n", ""]) {
      for (const target of targets) {
        const before = upstream.received.length;
        const response = await rawRequest(prefixed.port, `POST ${target} HTTP/1.1\r\n${hostLine}Content-Length: 2\r\nConnection: close\r\n\r\n{}`);
        if (response.status === 400) {
          expect(upstream.received.length).toBe(before); // refused by the HTTP parser: nothing forwarded
          continue;
        }
        expect(response.status).toBe(200);
        forwarded += 1;
        expect(lastReceived().target).toStartWith("/openai/deployments/allowed/");
      }
    }
    expect(forwarded).toBeGreaterThanOrEqual(10);
    await prefixed.stop();
  });

  test("response headers are the upstream's: no Content-Type is added, and HEAD of a chunked resource is not called empty", async () => {
    const plain = await rawRequest(proxy.port, "GET /test/no-content-type HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    expect(plain.status).toBe(200);
    expect(plain.body).toBe("plain");
    expect(plain.headers.filter((header) => /^content-type:/i.test(header))).toEqual([]);
    expect(plain.headers).toContainEqual(expect.stringMatching(/^content-length: 5$/i));
    const sized = await rawRequest(proxy.port, "HEAD /test/no-content-type HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    expect(sized.headers).toContainEqual(expect.stringMatching(/^content-length: 5$/i));
    const chunked = await rawRequest(proxy.port, "HEAD /test/chunked HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    expect(chunked.status).toBe(200);
    expect(chunked.headers.filter((header) => /^content-length:/i.test(header))).toEqual([]);
    expect(chunked.headers).toContainEqual(expect.stringMatching(/^transfer-encoding: chunked$/i));
    expect(chunked.body).toBe("");
    expect(await (await fetch(`${proxy.url}/test/chunked`)).text()).toBe("chunked");
  });

  test("a Connection header listing a name that is no header name, from the client or the upstream, is forwarded, counted and logged; the in-flight gauge is left as it was", async () => {
    const inFlight = async () => valueOf((await scrape(proxy.url)).samples, "auth_proxy_requests_in_flight");
    const before = await inFlight();
    const fromClient = await rawRequest(proxy.port, "GET /openai/models HTTP/1.1\r\nHost: localhost\r\nConnection: close, x a\r\nX-Kept: 1\r\n\r\n");
    expect(fromClient.status).toBe(200);
    expect(lastReceived().headers["x-kept"]).toBe("1");
    const fromUpstream = await rawRequest(proxy.port, "GET /test/odd-connection HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    expect(fromUpstream.status).toBe(200);
    expect(fromUpstream.body).toBe("odd");
    expect(fromUpstream.headers.filter((header) => /x a/.test(header))).toEqual([]);
    await proxy.waitForLog((line) => line.msg === "request" && line.path === "/test/odd-connection" && line.status === 200);
    expect(await inFlight()).toBe(before);
  });

  test("a small body that trickles is counted in flight and logged until its last byte arrives", async () => {
    const inFlight = async () => valueOf((await scrape(proxy.url)).samples, "auth_proxy_requests_in_flight")!;
    const before = await inFlight();
    const startedAt = Date.now();
    const body = fetch(`${proxy.url}/test/trickle?ms=1500`).then((response) => response.text());
    await Bun.sleep(700);
    expect(await inFlight()).toBe(before + 1);
    expect(await body).toBe('{"trickled":"yes"}  ');
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/test/trickle");
    expect(line.duration_ms as number).toBeGreaterThanOrEqual(1400);
    expect(line.duration_ms as number).toBeLessThanOrEqual(Date.now() - startedAt);
    expect(line.bytes_out).toBe(20);
    expect(await inFlight()).toBe(before);
  });
});

// ---------------------------------------------------------------- methods and caller keys

describe("Methods and connections", () => {
  test("CONNECT and TRACE are answered 405 JSON and never forwarded", async () => {
    const proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
    const receivedBefore = upstream.received.length;
    const connect = await rawRequest(proxy.port, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n");
    expect(connect.status).toBe(405);
    expect(JSON.parse(connect.body).error.code).toBe("method_not_allowed");
    const trace = await rawRequest(proxy.port, "TRACE /openai/models HTTP/1.1\r\nHost: localhost\r\napi-key: secret\r\n\r\n");
    expect(trace.status).toBe(405);
    expect(trace.body).not.toContain("secret");
    expect(upstream.received.length).toBe(receivedBefore);
    await proxy.stop();
  });
});

describe("Inbound caller keys", () => {
  const KEYS = ["caller-key-one-3f9a", "caller-key-two-77c1"];

  test("with PROXY_API_KEYS every forwarded request needs a key; the key never reaches the upstream or the logs", async () => {
    const proxy = await startProxy(baseEnv({ PROXY_API_KEYS: ` ${KEYS[0]}, ${KEYS[1]} ` }));
    await proxy.waitForHealth();
    const receivedBefore = upstream.received.length;
    const wrongKeys: Record<string, string>[] = [{}, { "api-key": "wrong" }, { authorization: "Bearer wrong" }, { authorization: `Basic ${KEYS[0]}` }, { "api-key": "" }];
    for (const headers of wrongKeys) {
      const refused = await fetch(`${proxy.url}/openai/models`, { headers });
      expect(refused.status).toBe(401);
      expect((await readJson(refused)).error).toMatchObject({ type: "auth_proxy_error", code: "invalid_api_key" });
    }
    expect(upstream.received.length).toBe(receivedBefore);
    const rightKeys: Record<string, string>[] = [{ "api-key": KEYS[0]! }, { authorization: `Bearer ${KEYS[1]}` }];
    for (const headers of rightKeys) {
      const accepted = await fetch(`${proxy.url}/openai/models`, { headers });
      expect(accepted.status).toBe(200);
      const received = lastReceived();
      expect(received.tokenValid).toBe(true);
      expect(JSON.stringify(received.rawHeaders)).not.toMatch(/caller-key/);
    }
    for (const path of ["/live", "/health", "/metrics"]) expect((await fetch(`${proxy.url}${path}`)).status).toBe(200);
    await proxy.stop();
    expect(proxy.stdout + proxy.stderr).not.toMatch(/caller-key/);
  });

  test("WebSocket upgrades need a key too, in a header or where browsers carry it", async () => {
    const proxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url, PROXY_API_KEYS: KEYS.join(",") }));
    await proxy.waitForHealth();
    const refused = await rawUpgrade(proxy.port, "/openai/v1/realtime?model=gpt-realtime");
    expect(refused.status).toBe(401);
    const ways: ConstructorParameters<typeof TestSocket>[1][] = [{ headers: { "api-key": KEYS[0]! } }, { protocols: ["realtime", `openai-insecure-api-key.${KEYS[1]}`] }];
    for (const options of ways) {
      const client = new TestSocket(`ws://127.0.0.1:${proxy.port}/openai/v1/realtime?model=gpt-realtime`, options);
      await client.waitForFrames(1);
      client.socket.close(1000);
    }
    const byQuery = new TestSocket(`ws://127.0.0.1:${proxy.port}/openai/v1/realtime?model=gpt-realtime&api-key=${KEYS[0]}`);
    await byQuery.waitForFrames(1);
    byQuery.socket.close(1000);
    const handshakes = realtime.sessions.slice(-3).map((session) => JSON.stringify(session.handshake));
    for (const handshake of handshakes) expect(handshake).not.toMatch(/caller-key/);
    await proxy.stop();
  });

  test("PROXY_API_KEYS_FILE is re-read when it changes, without restart; a broken file keeps the last keys", async () => {
    const file = certs.write("callers.txt", "# callers\nold-caller-key\n");
    const proxy = await startProxy(baseEnv({ PROXY_API_KEYS_FILE: file }));
    await proxy.waitForHealth();
    const status = async (key: string) => (await fetch(`${proxy.url}/openai/models`, { headers: { "api-key": key } })).status;
    expect(await status("old-caller-key")).toBe(200);
    // As a Kubernetes Secret update does: a new file swapped in.
    writeFileSync(`${file}.new`, "new-caller-key\n");
    renameSync(`${file}.new`, file);
    await proxy.waitForLog((line) => line.msg === "caller keys reloaded" && line.keys === 1, 5000);
    expect(await status("old-caller-key")).toBe(401);
    expect(await status("new-caller-key")).toBe(200);
    writeFileSync(`${file}.new`, "\n");
    renameSync(`${file}.new`, file);
    await proxy.waitForLog((line) => line.msg === "caller keys file unusable; keeping the last good keys", 5000);
    expect(await status("new-caller-key")).toBe(200);
    await proxy.stop();
    expect(proxy.stdout).not.toMatch(/(old|new)-caller-key/);
  });
});

// ---------------------------------------------------------------- WebSocket

describe("WebSocket", () => {
  let proxy: ProxyProcess;
  const wsUrl = (path: string) => `ws://127.0.0.1:${proxy.port}${path}`;
  const rssKib = (pid: number) => memoryKiB(pid, "VmRSS");

  beforeAll(async () => {
    proxy = await startProxy(baseEnv({ API_BASE_URL: `${realtime.url}/prefix/` }));
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());

  /** Opens a session through the proxy and waits for the upstream's session.created. */
  async function openSession(path = "/openai/v1/realtime?model=gpt-realtime", options: ConstructorParameters<typeof TestSocket>[1] = {}) {
    const client = new TestSocket(wsUrl(path), options);
    await client.opened;
    await client.waitForFrames(1);
    expect(JSON.parse(client.frames.shift() as string).type).toBe("session.created");
    return { client, upstreamSession: realtime.sessions.at(-1)! };
  }

  test("both Realtime URL shapes and the Responses API upgrade with the bearer token; keys in headers, query and subprotocols are stripped", async () => {
    const shapes = [
      ["/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime&api-key=sk-query-secret&x=%2Fa%20b&x=2", "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime&x=%2Fa%20b&x=2"],
      ["/openai/v1/realtime?api-key=k1&model=gpt-realtime&Authorization=Bearer%20k2", "/openai/v1/realtime?model=gpt-realtime"],
      ["/openai/v1/responses", "/openai/v1/responses"],
    ] as const;
    for (const [sent, expected] of shapes) {
      const { client, upstreamSession } = await openSession(sent, {
        headers: {
          "api-key": "placeholder-api-key",
          authorization: "Bearer app-placeholder",
          "OpenAI-Beta": "realtime=v1",
          "x-ms-client-request-id": "req-42",
          "user-agent": "realtime-test/1.0",
        },
        protocols: ["realtime", "openai-insecure-api-key.sk-proto-secret", "openai-beta.realtime-v1"],
      });
      const { handshake } = upstreamSession;
      expect(handshake.target).toBe(`/prefix${expected}`);
      expect(handshake.tokenValid).toBe(true);
      expect(entra.isValid(handshake.headers.authorization!.slice("Bearer ".length))).toBe(true);
      expect(handshake.headers["api-key"]).toBeUndefined();
      expect(handshake.headers["openai-beta"]).toBe("realtime=v1");
      expect(handshake.headers["x-ms-client-request-id"]).toBe("req-42");
      expect(handshake.headers["user-agent"]).toBe("realtime-test/1.0");
      expect(handshake.headers.host).toBe(new URL(realtime.url).host);
      expect(handshake.protocols).toEqual(["realtime", "openai-beta.realtime-v1"]);
      // The upstream chose its last offer; the client must get that one, not its own first.
      expect(client.socket.protocol).toBe("openai-beta.realtime-v1");
      client.socket.close(1000, "done");
      await client.closed;
    }
    const session = await proxy.waitForLog((line) => line.msg === "websocket session" && line.path === "/openai/v1/responses");
    expect(session).toMatchObject({ upstream_status: 101, closed_by: "client", close_code: 1000, frames_from_upstream: 1 });
  });

  test("1,000 text frames and 200 binary frames of random sizes pass both ways in order, byte-exact; 4 MiB frames pass", async () => {
    const { client, upstreamSession } = await openSession();
    const texts = Array.from({ length: 1000 }, (_, index) => `{"type":"input_audio_buffer.append","seq":${index},"audio":"${randomBytes(64).toString("base64")}","ü":"✓"}`);
    for (const text of texts) client.send(text);
    await client.waitForFrames(1000);
    expect(client.frames).toEqual(texts);
    expect(upstreamSession.received).toEqual(texts);

    client.frames.length = 0;
    const binaries = Array.from({ length: 200 }, () => randomBytes(Math.floor(Math.random() * 64 * 1024) + 1));
    for (const binary of binaries) client.send(binary);
    await client.waitForFrames(200);
    expect(client.frames.every((frame) => Buffer.isBuffer(frame))).toBe(true);
    expect(client.frames.map((frame) => sha256(frame))).toEqual(binaries.map(sha256));
    expect(upstreamSession.received.slice(1000).map((frame) => sha256(frame))).toEqual(binaries.map(sha256));

    client.frames.length = 0;
    const big = randomBytes(4 * 1024 * 1024);
    client.send(big);
    client.command({ send: [4 * 1024 * 1024] });
    await client.waitForFrames(2);
    expect(sha256(client.frames[0]!)).toBe(sha256(big));
    expect(sha256(client.frames[1]!)).toBe(sha256(patternBytes(4 * 1024 * 1024)));
    client.socket.close(1000);
    const line = await proxy.waitForLog((entry) => entry.msg === "websocket session" && entry.frames_from_client === 1202);
    expect(line.frames_from_upstream).toBe(1 + 1000 + 200 + 2);
    expect(line.bytes_from_client).toBe(
      texts.reduce((sum, text) => sum + Buffer.byteLength(text), 0) + binaries.reduce((sum, binary) => sum + binary.length, 0) + big.length + Buffer.byteLength(`cmd:{"send":[4194304]}`),
    );
  }, 30_000);

  test("a close with a custom code and reason crosses within 1 s each way", async () => {
    const fromClient = await openSession();
    const sentAt = Date.now();
    fromClient.client.socket.close(4001, "client is done");
    await waitFor(() => fromClient.upstreamSession.closedAtMs !== undefined, 1000);
    expect(fromClient.upstreamSession).toMatchObject({ closeCode: 4001, closeReason: "client is done" });
    expect(fromClient.upstreamSession.closedAtMs! - sentAt).toBeLessThan(1000);

    const fromUpstream = await openSession();
    const commandedAt = Date.now();
    fromUpstream.client.command({ close: [4002, "upstream is done"] });
    const closed = await fromUpstream.client.closed;
    expect(closed).toMatchObject({ code: 4002, reason: "upstream is done" });
    expect(closed.atMs - commandedAt).toBeLessThan(1000);
    const line = await proxy.waitForLog((entry) => entry.msg === "websocket session" && entry.close_code === 4002);
    expect(line.closed_by).toBe("upstream");
  });

  test("an abrupt drop on either side closes the other within 1 s", async () => {
    const upstreamDrop = await openSession();
    const killedAt = Date.now();
    upstreamDrop.client.command({ terminate: true });
    const closed = await upstreamDrop.client.closed;
    expect(closed.code).toBe(1011);
    expect(closed.atMs - killedAt).toBeLessThan(1000);

    const clientDrop = await openSession();
    const droppedAt = Date.now();
    clientDrop.client.socket.terminate();
    await waitFor(() => clientDrop.upstreamSession.closedAtMs !== undefined, 1000);
    expect(clientDrop.upstreamSession.closeCode).toBe(1011);
    expect(clientDrop.upstreamSession.closedAtMs! - droppedAt).toBeLessThan(1000);
  });

  test("a refused upstream handshake reaches the client as the upstream's answer: status, headers and body; no WebSocket is opened", async () => {
    const opened = realtime.sessions.length;
    for (const status of [401, 403, 404, 429]) {
      const response = await rawUpgrade(proxy.port, `/openai/v1/realtime?model=gpt-realtime&refuse=${status}`);
      expect(response.status).toBe(status);
      const body = JSON.parse(response.body);
      proxyBodies.push(response.body);
      expect(body.error.code).toBe(String(status));
      if (status === 429) expect(response.headers).toContainEqual(expect.stringMatching(/^retry-after: 7$/i));
    }
    const client = new TestSocket(wsUrl("/openai/v1/realtime?model=gpt-realtime&refuse=401"));
    expect(String(await rejection(client.opened))).toContain("401");
    expect(realtime.sessions.length).toBe(opened);
    await proxy.waitForLog((line) => line.msg === "token acquired" && line.trigger === "upstream answered 401");
  });

  test("an upstream redirect of the handshake reaches the client as that status with its Location, never followed or called unreachable", async () => {
    for (const status of [301, 302, 307, 308]) {
      const response = await rawUpgrade(proxy.port, `/openai/v1/realtime?model=gpt-realtime&refuse=${status}`);
      expect(response.status).toBe(status);
      expect(response.headers).toContainEqual(expect.stringMatching(/^location: wss:\/\/moved\.example\/prefix\/openai\/v1\/realtime$/i));
    }
    await proxy.waitForLog((line) => line.msg === "request" && line.status === 308);
    expect(proxy.lines.filter((line) => line.msg === "upstream unreachable")).toEqual([]);
  });

  test("a malformed client handshake (bad Sec-WebSocket-Key, duplicate or malformed subprotocols) is answered 400 before any upstream session is opened", async () => {
    const opened = realtime.sessions.length;
    const refused = realtime.refused.length;
    const faults: Record<string, string>[] = [{ "Sec-WebSocket-Key": "not-a-key" }, { "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ" }, { "Sec-WebSocket-Protocol": "realtime, realtime" }, { "Sec-WebSocket-Protocol": "a b" }];
    for (const headers of faults) {
      const response = await rawUpgrade(proxy.port, "/openai/v1/realtime?model=gpt-realtime", headers);
      expect(response.status).toBe(400);
      proxyBodies.push(response.body);
      expect(JSON.parse(response.body).error.code).toBe("bad_websocket_handshake");
    }
    expect(realtime.sessions.length).toBe(opened);
    expect(realtime.refused.length).toBe(refused);
    await proxy.waitForLog((line) => line.msg === "request" && line.status === 400);
  });

  test("an upgrade to a target with a fragment is relayed without the fragment", async () => {
    const response = await rawUpgrade(proxy.port, "/openai/v1/realtime?model=gpt-realtime#fragment");
    expect(response.status).toBe(101);
    expect(realtime.sessions.at(-1)!.handshake.target).toBe("/prefix/openai/v1/realtime?model=gpt-realtime");
  });

  test("no valid token: the upgrade gets 503 with Retry-After; an unreachable upstream gets 502", async () => {
    const deadAuthority = await startProxy(baseEnv({ API_BASE_URL: realtime.url, AZURE_AUTHORITY_HOST: `https://127.0.0.1:${freePort()}` }));
    const noToken = await rawUpgrade(deadAuthority.port, "/openai/v1/realtime?model=gpt-realtime");
    expect(noToken.status).toBe(503);
    expect(noToken.headers.some((header) => /^retry-after: \d+$/i.test(header))).toBe(true);
    expect(JSON.parse(noToken.body).error.code).toBe("token_unavailable");
    await deadAuthority.stop();

    const orphan = await startProxy(baseEnv({ API_BASE_URL: `http://127.0.0.1:${freePort()}` }));
    await orphan.waitForHealth();
    const unreachable = await rawUpgrade(orphan.port, "/openai/v1/realtime?model=gpt-realtime");
    expect(unreachable.status).toBe(502);
    expect(JSON.parse(unreachable.body).error.code).toBe("upstream_unreachable");
    await orphan.stop();
  });

  test("a wss: upstream is reached over TLS trusted through NODE_EXTRA_CA_CERTS, and through HTTPS_PROXY unless NO_PROXY says otherwise", async () => {
    const secure = new FakeRealtime(entra, tls).start();
    const connectProxy = await startConnectProxy();
    try {
      for (const noProxy of ["", "localhost,127.0.0.1"]) {
        const tunnelsBefore = connectProxy.tunnels.length;
        const proxied = await startProxy(baseEnv({ API_BASE_URL: secure.url, HTTPS_PROXY: `http://127.0.0.1:${connectProxy.port}`, NO_PROXY: noProxy }));
        await proxied.waitForHealth();
        const client = new TestSocket(`ws://127.0.0.1:${proxied.port}/openai/v1/realtime?model=gpt-realtime`);
        await client.waitForFrames(1);
        client.send("over tls");
        await client.waitForFrames(2);
        expect(client.frames[1]).toBe("over tls");
        expect(secure.sessions.at(-1)!.handshake.tokenValid).toBe(true);
        const tunnels = connectProxy.tunnels.slice(tunnelsBefore);
        // Token requests to the fake Entra ID tunnel too; the upstream's host:port shows only when proxied.
        expect(tunnels.includes(new URL(secure.url).host)).toBe(noProxy === "");
        client.socket.close(1000);
        await proxied.stop();
      }
    } finally {
      connectProxy.close();
      secure.stop();
    }
  });

  test("the official openai SDK's realtime client (Node.js, ws) completes a session.update round trip", async () => {
    const child = Bun.spawn(["node", join(ROOT, "test/realtime-sdk.mjs"), `http://127.0.0.1:${proxy.port}`], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    const [output, errors] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text()]);
    expect(errors).toBe("");
    const result = JSON.parse(output);
    expect(result).toMatchObject({ events: ["session.created", "session.updated"], session: { instructions: "Answer briefly.", voice: "alloy" } });
    const { handshake } = realtime.sessions.at(-1)!;
    expect(handshake.target).toBe("/prefix/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime");
    expect(handshake.headers["api-key"]).toBeUndefined();
    expect(handshake.tokenValid).toBe(true);
  });

  test("200 concurrent sessions of 50 frames each complete; RSS returns within 30 MB", async () => {
    const before = rssKib(proxy.proc.pid);
    const sessions = await Promise.all(Array.from({ length: 200 }, () => openSession()));
    await Promise.all(
      sessions.map(async ({ client }, index) => {
        const frames = Array.from({ length: 50 }, (_, seq) => `{"session":${index},"seq":${seq},"pad":"${"x".repeat(200)}"}`);
        for (const frame of frames) client.send(frame);
        await client.waitForFrames(50, 20_000);
        expect(client.frames).toEqual(frames);
        client.socket.close(1000);
        await client.closed;
      }),
    );
    await Bun.sleep(1000);
    expect(rssKib(proxy.proc.pid) - before).toBeLessThan(30 * 1024);
  }, 60_000);

  test("WebSocket sessions are counted open, completed, refused and failed", async () => {
    const samplesOf = async (url: string) => {
      const scraped = await scrape(url);
      proxyBodies.push(scraped.text);
      return scraped.samples;
    };
    const before = await samplesOf(proxy.url);
    const { client } = await openSession();
    expect(valueOf(await samplesOf(proxy.url), "auth_proxy_websocket_sessions")).toBe(1);
    client.socket.close(1000);
    await client.closed;
    await proxy.waitForLog((line) => line.msg === "websocket session" && line.closed_by === "client" && line.frames_from_client === 0);
    expect((await rawUpgrade(proxy.port, "/openai/v1/realtime?model=gpt-realtime&refuse=429")).status).toBe(429);
    const after = await samplesOf(proxy.url);
    const delta = (result: string) => valueOf(after, "auth_proxy_websocket_sessions_total", { result })! - valueOf(before, "auth_proxy_websocket_sessions_total", { result })!;
    expect(valueOf(after, "auth_proxy_websocket_sessions")).toBe(0);
    expect(delta("completed")).toBe(1);
    expect(delta("refused")).toBe(1);
    expect(delta("failed")).toBe(0);

    const orphan = await startProxy(baseEnv({ API_BASE_URL: `http://127.0.0.1:${freePort()}` }));
    await orphan.waitForHealth();
    expect((await rawUpgrade(orphan.port, "/openai/v1/realtime?model=gpt-realtime")).status).toBe(502);
    const orphaned = await samplesOf(orphan.url);
    expect(valueOf(orphaned, "auth_proxy_websocket_sessions_total", { result: "failed" })).toBe(1);
    expect(valueOf(orphaned, "auth_proxy_upstream_errors_total", { reason: "connect" })).toBe(1);
    await orphan.stop();
  });

  test("a client that stops reading while the upstream sends 200 MiB: the proxy's memory stays bounded and every byte arrives after", async () => {
    const { client } = await openSession();
    const before = rssKib(proxy.proc.pid);
    client.socket.pause();
    const total = 200 * 1024 * 1024;
    client.command({ flood: total });
    let peak = before;
    for (let sample = 0; sample < 20; sample++) {
      await Bun.sleep(100);
      peak = Math.max(peak, rssKib(proxy.proc.pid));
    }
    client.socket.resume();
    const done = await waitForFrame(client, (frame) => frame === "cmd-done:flood", 60_000);
    const bytes = client.frames.slice(0, done).reduce((sum, frame) => sum + (frame as Buffer).length, 0);
    expect(bytes).toBe(total);
    console.log(`slow WebSocket reader: proxy RSS ${Math.round(before / 1024)} MB before, peak ${Math.round(peak / 1024)} MB while 200 MiB waited upstream`);
    expect(peak - before).toBeLessThan(64 * 1024);
    client.socket.close(1000);
  }, 90_000);
});

function sha256(data: string | Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * The error `promise` rejects with; fails the test if it resolves. Not
 * `expect(promise).rejects`: on Bun 1.4.5 it waits inside the event loop,
 * and after it the test process read no more of a proxy's stdout (a refused
 * WebSocket test then waited 15 s for lines the proxy had written).
 */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  const outcome = await promise.then(
    () => ({ resolved: true as const }),
    (error: unknown) => ({ resolved: false as const, error }),
  );
  if (outcome.resolved) throw new Error("expected a rejection, but the promise resolved");
  return outcome.error;
}

async function waitFor(condition: () => boolean | Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await Bun.sleep(5);
  }
}

async function waitForFrame(client: TestSocket, predicate: (frame: string | Buffer) => boolean, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const index = client.frames.findIndex(predicate);
    if (index !== -1) return index;
    if (Date.now() > deadline) throw new Error(`frame not seen within ${timeoutMs} ms (${client.frames.length} frames)`);
    await Bun.sleep(20);
  }
}

// ---------------------------------------------------------------- routes

const OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default";
const SEARCH_SCOPE = "https://search.azure.com/.default";

describe("Routes and backends", () => {
  /** Azure OpenAI and AI Search fakes that accept only tokens issued for their own scope. */
  let openai: FakeAzureOpenAI;
  let search: FakeAzureOpenAI;
  beforeAll(async () => {
    openai = await new FakeAzureOpenAI(entra, OPENAI_SCOPE).start();
    search = await new FakeAzureOpenAI(entra, SEARCH_SCOPE).start();
  });
  afterAll(async () => {
    await openai.stop();
    await search.stop();
  });

  /** A RAG app's routes: AI Search under /search (its own scope), Azure OpenAI under /openai (prefix kept), a longer prefix inside /search that goes elsewhere. */
  const ragRoutes = () => `# comments are YAML's
routes:
  - prefix: /search
    scope: ${SEARCH_SCOPE}
    backends:
      - url: ${search.url}/base/
  - prefix: /search/special/
    strip_prefix: false
    backends:
      - url: ${openai.url}
        name: openai-eastus
  - prefix: /openai
    strip_prefix: false
    backends:
      - url: ${openai.url}
  - prefix: /rt
    backends:
      - url: ${realtime.url}/prefix
`;

  const routesEnv = (file: string, overrides: Record<string, string | undefined> = {}) => baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: file, ...overrides });

  test("each route gets its own scope's token, its backend's path and the rest byte for byte; longest prefix on a segment boundary; nothing matches: 404 no_route, nothing forwarded", async () => {
    const proxy = await startProxy(routesEnv(certs.write("rag-routes.yaml", ragRoutes())));
    await proxy.waitForHealth();
    const get = async (target: string) => rawRequest(proxy.port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`);

    expect((await get("/search/indexes/docs/docs?api-version=2024-07-01&search=a%20b&$top=2")).status).toBe(200);
    expect(search.received.at(-1)).toMatchObject({ target: "/base/indexes/docs/docs?api-version=2024-07-01&search=a%20b&$top=2", tokenValid: true });
    expect((await get("/search?x=%2F")).status).toBe(200);
    expect(search.received.at(-1)!.target).toBe("/base?x=%2F");
    // The longer prefix wins, and keeps its prefix (strip_prefix: false) on the other API with the other scope's token.
    expect((await get("/search/special/x?y=1")).status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/search/special/x?y=1", tokenValid: true });
    const completion = await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: JSON.stringify({ messages: [] }) });
    expect(completion.status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", tokenValid: true });
    expect(openai.rejected + search.rejected).toBe(0);

    // Segment boundaries: /searching is not /search's; /other is no route's.
    const forwarded = openai.received.length + search.received.length;
    for (const target of ["/searching", "/other", "/", "/rtx"]) {
      const response = await get(target);
      expect(response.status).toBe(404);
      expect(JSON.parse(response.body).error).toMatchObject({ type: "auth_proxy_error", code: "no_route" });
      proxyBodies.push(response.body);
    }
    expect(openai.received.length + search.received.length).toBe(forwarded);

    // WebSocket upgrades are routed alike.
    const upgrade = await rawUpgrade(proxy.port, "/rt/openai/v1/realtime?model=gpt-realtime");
    expect(upgrade.status).toBe(101);
    expect(realtime.sessions.at(-1)!.handshake.target).toBe("/prefix/openai/v1/realtime?model=gpt-realtime");

    // The startup line lists the routes; each access line names its route; token metrics carry their scope.
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({
      routes: [
        { prefix: "/search", scope: SEARCH_SCOPE, backends: [search.url] },
        { prefix: "/search/special", scope: OPENAI_SCOPE, backends: [openai.url] },
        { prefix: "/openai", scope: OPENAI_SCOPE, backends: [openai.url] },
        { prefix: "/rt", scope: OPENAI_SCOPE, backends: [realtime.url] },
      ],
    });
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/search/special/x");
    expect(line).toMatchObject({ route: "/search/special", status: 200 });
    expect(proxy.lines.find((entry) => entry.msg === "request" && entry.path === "/other")).toMatchObject({ status: 404 });
    const { text, samples } = await scrape(proxy.url);
    proxyBodies.push(text);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { scope: SEARCH_SCOPE, result: "success" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { scope: OPENAI_SCOPE, result: "success" })).toBe(1);
    expect(samples.filter((sample) => sample.name === "auth_proxy_token_expiration_timestamp_seconds").map((sample) => sample.labels.scope).sort()).toEqual([OPENAI_SCOPE, SEARCH_SCOPE]);
    expect((await promtool(["check", "metrics"], text)).exitCode).toBe(0);
    await proxy.stop();
  });

  test("Entra ID refusing one scope: that route answers 503 while the other serves, /health names the scope, and both recover", async () => {
    entra.refusedScopes.add(SEARCH_SCOPE);
    try {
      const proxy = await startProxy(routesEnv(certs.write("rag-refused.yaml", ragRoutes())));
      await proxy.waitForLog((line) => line.msg === "token acquisition failed" && line.scope === SEARCH_SCOPE && line.aadsts === "AADSTS500011");
      await proxy.waitForLog((line) => line.msg === "token acquired" && line.scope === OPENAI_SCOPE);
      const health = await fetch(`${proxy.url}/health`);
      expect(health.status).toBe(503);
      const reason = (await readJson(health)).reason as string;
      expect(reason).toContain(`no token for ${SEARCH_SCOPE}`);
      expect(reason).not.toContain(`no token for ${OPENAI_SCOPE}`);
      const refused = await fetch(`${proxy.url}/search/indexes`);
      expect(refused.status).toBe(503);
      expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect((await readJson(refused)).error.code).toBe("token_unavailable");
      expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
      entra.refusedScopes.delete(SEARCH_SCOPE);
      await proxy.waitForHealth(200, 10_000);
      expect((await fetch(`${proxy.url}/search/indexes`)).status).toBe(200);
      expect(search.received.at(-1)!.tokenValid).toBe(true);
      await proxy.stop();
    } finally {
      entra.refusedScopes.clear();
    }
  }, 30_000);

  test("--check acquires a token for every scope and prints the routes", async () => {
    const proxy = spawnProxy(routesEnv(certs.write("rag-check.yaml", ragRoutes())), ["--check"]);
    expect(await proxy.exited).toBe(0);
    const report = JSON.parse(proxy.stdout);
    expect(Object.keys(report.scopes).sort()).toEqual([OPENAI_SCOPE, SEARCH_SCOPE]);
    expect(report.routes.map((route: { prefix: string }) => route.prefix)).toEqual(["/search", "/search/special", "/openai", "/rt"]);
  });

  test("a JSON routes file works as YAML does", async () => {
    const json = JSON.stringify({ routes: [{ prefix: "/search", scope: SEARCH_SCOPE, backends: [{ url: search.url }] }, { prefix: "/", backends: [{ url: openai.url }] }] });
    const proxy = await startProxy(routesEnv(certs.write("routes.json", json)));
    await proxy.waitForHealth();
    expect((await fetch(`${proxy.url}/search/x`)).status).toBe(200);
    expect(search.received.at(-1)).toMatchObject({ target: "/x", tokenValid: true });
    expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/openai/models", tokenValid: true });
    await proxy.stop();
  });

  const badFiles: [string, string, string[]][] = [
    ["unparsable", "routes: [\n  - prefix: /x\n", ["is not YAML or JSON"]],
    ["without routes", "backends: []\n", ["must hold `routes:`"]],
    ["an unknown key at each level", "extra: 1\nroutes:\n  - prefix: /\n    strip: false\n    backends:\n      - url: https://a.example\n        region: eastus\n", ["extra is not a setting", "routes[0].strip is not a setting", "routes[0].backends[0].region is not a setting"]],
    ["a malformed or missing backend URL", "routes:\n  - prefix: /a\n    backends:\n      - url: https://a.example\n  - prefix: /b\n    backends:\n      - url: not a url\n      - name: nameless\n", ["routes[1].backends[0].url=not a url is not a URL", "routes[1].backends[1].url must be the backend's URL"]],
    ["a backend URL with a query or credentials", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example/?x=1\n      - url: https://user:pw@b.example\n", ["routes[0].backends[0].url=https://a.example/?x=1 must not have a query", "routes[0].backends[1].url must not carry credentials"]],
    ["a prefix not starting with /, and a duplicate one", "routes:\n  - prefix: search\n    backends: [{ url: https://a.example }]\n  - prefix: /x/\n    backends: [{ url: https://a.example }]\n  - prefix: /x\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix must be a path starting with /", "routes[2].prefix /x is routes[1]'s prefix too"]],
    ["a prefix with a dot segment", "routes:\n  - prefix: /a/../b\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix /a/../b must be plain path segments"]],
    ["a scope that is not a /.default one", "routes:\n  - prefix: /\n    scope: https://search.azure.com/user_impersonation\n    backends: [{ url: https://a.example }]\n", ["routes[0].scope", "/.default"]],
    ["a priority or weight that is not a positive integer", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n        priority: 0\n      - url: https://b.example\n        weight: 1.5\n", ["routes[0].backends[0].priority must be a positive integer", "routes[0].backends[1].weight must be a positive integer"]],
    ["no backends", "routes:\n  - prefix: /\n    backends: []\n", ["routes[0].backends must list one to 32 backends"]],
    // Clients send these percent-encoded (`/caf%C3%A9`), so such a prefix would never match and its requests would reach the catch-all.
    ["a prefix clients must percent-encode", "routes:\n  - prefix: /café\n    backends: [{ url: https://a.example }]\n  - prefix: /a\"b\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix /café must be plain path segments", 'routes[1].prefix /a"b must be plain path segments']],
    ["a scope that names no resource", "routes:\n  - prefix: /\n    scope: /.default\n    backends: [{ url: https://a.example }]\n", ["routes[0].scope \"/.default\" must be one resource's /.default scope"]],
    ["a connect_timeout that is not a number of seconds", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n        connect_timeout: 0\n      - url: https://b.example\n        connect_timeout: soon\n", ["routes[0].backends[0].connect_timeout=0 must be a number of seconds", "routes[0].backends[1].connect_timeout=soon must be a number of seconds"]],
    ["two backends of one name, after a malformed one", "routes:\n  - prefix: /\n    backends:\n      - url: nowhere\n      - url: https://a.example\n      - url: https://a.example/other\n", ["routes[0].backends[0].url=nowhere is not a URL", "routes[0].backends[2] is named a.example like another backend"]],
  ];
  for (const [name, text, expected] of badFiles) {
    test(`a routes file with ${name}: exit 1 within 2 s, one line per fault naming the file and the place`, async () => {
      const file = certs.write(`bad-routes-${name.replace(/\W+/g, "-")}.yaml`, text);
      const startedAt = performance.now();
      const proxy = spawnProxy({ ...routesEnv(file), PORT: "0", HOST: "127.0.0.1" });
      expect(await proxy.exited).toBe(1);
      expect(performance.now() - startedAt).toBeLessThan(2000);
      const lines = proxy.stderr.trim().split("\n");
      // One line per fault: the scope's two expected pieces are one fault's.
      expect(lines).toHaveLength(name.startsWith("a scope") ? 1 : expected.length);
      for (const text of expected) expect(proxy.stderr).toContain(text);
      for (const line of lines) expect(line).toStartWith(`auth-proxy: AUTH_PROXY_ROUTES=${file}: `);
      expect(proxy.stderr).not.toMatch(/^\s+at /m);
    });
  }

  test("an unreadable routes file, and one set together with API_BASE_URL, exit 1 within 2 s naming both", async () => {
    const missing = spawnProxy({ ...routesEnv("/nonexistent/routes.yaml"), PORT: "0", HOST: "127.0.0.1" });
    expect(await missing.exited).toBe(1);
    expect(missing.stderr).toContain("AUTH_PROXY_ROUTES=/nonexistent/routes.yaml cannot be read (ENOENT)");
    const both = spawnProxy({ ...routesEnv(certs.write("both.yaml", ragRoutes()), { API_BASE_URL: upstream.url }), PORT: "0", HOST: "127.0.0.1" });
    expect(await both.exited).toBe(1);
    expect(both.stderr).toContain("set API_BASE_URL or AUTH_PROXY_ROUTES, not both");
    const flag = spawnProxy({ ...baseEnv(), PORT: "0", HOST: "127.0.0.1" }, ["--routes", certs.write("flag.yaml", ragRoutes())]);
    expect(await flag.exited).toBe(1);
    expect(flag.stderr).toContain("set API_BASE_URL or --routes, not both");
  });
});

// ---------------------------------------------------------------- backend pools

describe("Backend pools", () => {
  const started: ScriptedBackend[] = [];
  const backend = (name: string) => {
    const scripted = new ScriptedBackend(name).start();
    started.push(scripted);
    return scripted;
  };
  afterAll(() => started.forEach((scripted) => scripted.stop()));

  type Member = { backend: ScriptedBackend | string; name?: string; priority?: number; weight?: number; deployments?: string; connectTimeout?: number };
  /** A route of a routes file: its prefix and its backends (a ScriptedBackend, or a URL where nothing listens). */
  const route = (prefix: string, members: Member[]) =>
    `  - prefix: ${prefix}\n    backends:\n` +
    members
      .map((member) => {
        const url = typeof member.backend === "string" ? member.backend : member.backend.url;
        const name = member.name ?? (typeof member.backend === "string" ? "dead" : member.backend.name);
        return `      - url: ${url}\n        name: ${name}\n        priority: ${member.priority ?? 1}\n        weight: ${member.weight ?? 1}\n${member.deployments ? `        deployments: ${member.deployments}\n` : ""}${member.connectTimeout ? `        connect_timeout: ${member.connectTimeout}\n` : ""}`;
      })
      .join("");
  async function poolProxy(...routes: string[]): Promise<ProxyProcess> {
    const file = certs.write(`pool-${randomBytes(4).toString("hex")}.yaml`, `routes:\n${routes.join("")}`);
    const proxy = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: file }));
    await proxy.waitForHealth();
    return proxy;
  }
  const sha256 = (bytes: Uint8Array | string) => createHash("sha256").update(bytes).digest("hex");
  const nowhere = () => `http://127.0.0.1:${freePort()}`;

  test("a 429 rests its backend for the time it names (retry-after-ms, Retry-After seconds or date, x-ratelimit-reset-*), else 10 s, at most 5 min; the request goes to the next", async () => {
    const date = new Date(Date.now() + 8000).toUTCString();
    const forms: [string, Record<string, string>, number][] = [
      ["ms", { "retry-after-ms": "1500", "retry-after": "9" }, 1500],
      ["seconds", { "retry-after": "3" }, 3000],
      // An HTTP date names a moment: the rest is what is left of it when the 429 comes (checked below).
      ["date", { "retry-after": date }, 0],
      ["resets", { "x-ratelimit-reset-requests": "250ms", "x-ratelimit-reset-tokens": "1m30s" }, 90_000],
      ["cap", { "retry-after": "3600" }, 300_000],
      ["none", {}, 10_000],
      ["unreadable", { "x-ratelimit-reset-tokens": "-1", "retry-after-ms": "soon" }, 10_000],
      // Unreadable is absent: a blank value, anything but decimal digits; a repeated header is read by its first value.
      ["blank", { "retry-after-ms": " " }, 10_000],
      ["hex", { "retry-after-ms": "0x3e8" }, 10_000],
      ["repeated", { "retry-after": "5, 5" }, 5000],
    ];
    const pools = forms.map(([name, headers]) => ({ name, primary: backend(`${name}-primary`).then({ status: 429, headers }), secondary: backend(`${name}-secondary`) }));
    const proxy = await poolProxy(...pools.map(({ name, primary, secondary }) => route(`/${name}`, [{ backend: primary }, { backend: secondary, priority: 2 }])));
    for (const [index, [name, , fixedMs]] of forms.entries()) {
      const expectedMs = name === "date" ? Date.parse(date) - Date.now() : fixedMs;
      const response = await fetch(`${proxy.url}/${name}/openai/models`);
      expect(response.status).toBe(200);
      expect(response.headers.get("x-backend")).toBe(`${name}-secondary`);
      const resting = await proxy.waitForLog((line) => line.msg === "backend resting" && line.backend === `${name}-primary`);
      expect(resting).toMatchObject({ level: "warn", route: `/${name}`, reason: "throttled" });
      expect(Math.abs((resting.rest_ms as number) - expectedMs)).toBeLessThanOrEqual(1000);
      expect(pools[index]!.primary.received).toHaveLength(1);
    }
    // A resting backend receives nothing until its rest ends, then serves.
    const { primary } = pools[0]!;
    const restedAt = Date.now();
    while (Date.now() - restedAt < 1000) expect((await fetch(`${proxy.url}/ms/x`)).headers.get("x-backend")).toBe("ms-secondary");
    expect(primary.received).toHaveLength(1);
    await proxy.waitForLog((line) => line.msg === "backend serving again" && line.backend === "ms-primary", 3000);
    expect((await fetch(`${proxy.url}/ms/x`)).headers.get("x-backend")).toBe("ms-primary");
    const { text, samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_backend_up", { route: "/ms", backend: "ms-primary" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_backend_up", { route: "/none", backend: "none-primary" })).toBe(0);
    expect(valueOf(samples, "auth_proxy_backend_requests_total", { route: "/ms", backend: "ms-primary", code: "429" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_failovers_total", { route: "/ms", reason: "throttled" })).toBe(1);
    expect((await promtool(["check", "metrics"], text)).exitCode).toBe(0);
    await proxy.stop();
  });

  test("429, 500, 502, 503, 504 and a refused connection move the request on: the next backend gets the same body (sha256) and headers, the token too", async () => {
    const primary = backend("statuses-primary");
    const secondary = backend("statuses-secondary");
    const proxy = await poolProxy(route("/", [{ backend: primary }, { backend: secondary, priority: 2 }]), route("/refused", [{ backend: nowhere() }, { backend: secondary, priority: 2 }]));
    const body = randomBytes(100_000);
    const send = (path: string) => fetch(`${proxy.url}${path}`, { method: "POST", body, headers: { "content-type": "application/octet-stream", "x-trace": "t-1" } });
    for (const status of [429, 500, 502, 503, 504]) {
      // A 2xx between keeps the primary from three 5xx in a row; the 429 asks for no rest.
      if (status === 429) primary.then({ status, headers: { "retry-after-ms": "0" } });
      else primary.then({ status }, { status: 200 });
      const response = await send(`/openai/deployments/gpt-4o/chat/completions?n=${status}`);
      expect(response.status).toBe(200);
      expect(response.headers.get("x-backend")).toBe("statuses-secondary");
      const arrived = secondary.received.at(-1)!;
      expect(arrived).toMatchObject({ method: "POST", target: `/openai/deployments/gpt-4o/chat/completions?n=${status}`, bodySha256: sha256(body), bodyLength: body.length });
      expect(arrived.headers).toMatchObject({ "x-trace": "t-1", "content-type": "application/octet-stream", "content-length": String(body.length) });
      expect(arrived.headers.authorization).toBe(primary.received.at(-1)!.headers.authorization);
      expect(entra.isValid(arrived.headers.authorization!.slice(7))).toBe(true);
      if (status !== 429) expect((await send("/after")).headers.get("x-backend")).toBe("statuses-primary");
    }
    const refused = await send("/refused/x");
    expect(refused.status).toBe(200);
    expect(secondary.received.at(-1)).toMatchObject({ target: "/x", bodySha256: sha256(body) });
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/refused/x");
    expect(line).toMatchObject({ route: "/refused", backend: "statuses-secondary", attempts: 2, status: 200 });
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_failovers_total", { route: "/", reason: "server_error" })).toBe(4);
    expect(valueOf(samples, "auth_proxy_failovers_total", { route: "/refused", reason: "unreachable" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_held_request_body_bytes")).toBe(0);
    await proxy.stop();
  });

  test("a body over 4 MiB and a chunked body go to one backend only: its failure is the answer", async () => {
    const primary = backend("big-primary");
    const secondary = backend("big-secondary");
    const proxy = await poolProxy(route("/", [{ backend: primary }, { backend: secondary, priority: 2 }]));
    primary.then({ status: 503, body: "busy" }, { status: 503, body: "busy" });
    const big = await fetch(`${proxy.url}/big`, { method: "POST", body: randomBytes(5 * 1024 * 1024) });
    expect(big.status).toBe(503);
    expect(await big.text()).toBe("busy");
    const chunks = [randomBytes(1000), randomBytes(1000)];
    const chunked = await fetch(`${proxy.url}/chunked`, { method: "POST", body: new ReadableStream({ pull: (controller) => (chunks.length ? controller.enqueue(chunks.shift()!) : controller.close()) }) });
    expect(chunked.status).toBe(503);
    expect(primary.received.map((request) => request.bodyLength)).toEqual([5 * 1024 * 1024, 2000]);
    expect(secondary.received).toHaveLength(0);
    await proxy.stop();
  });

  test("a client that leaves during the first backend's attempt ends the failover: the next backend never sees the request", async () => {
    const primary = backend("leave-primary").then({ status: 503, delayMs: 600 });
    const secondary = backend("leave-secondary");
    const proxy = await poolProxy(route("/", [{ backend: primary }, { backend: secondary, priority: 2 }]));
    await rejection(fetch(`${proxy.url}/x`, { method: "POST", body: "{}", signal: AbortSignal.timeout(200) }));
    await Bun.sleep(1000);
    expect(primary.received).toHaveLength(1);
    expect(secondary.received).toHaveLength(0);
    await proxy.stop();
  });

  test("every backend resting: 429 backends_throttled with Retry-After and retry-after-ms, or 503 backends_unavailable, nothing forwarded; every backend tried: the last answer as it came", async () => {
    const first = backend("throttled-a").then({ status: 429, headers: { "retry-after-ms": "3000" }, body: "a is busy" });
    const second = backend("throttled-b").then({ status: 429, headers: { "retry-after-ms": "2000", "x-detail": "b" }, body: "b is busy" });
    const proxy = await poolProxy(route("/", [{ backend: first }, { backend: second }]), route("/dead", [{ backend: nowhere(), name: "dead-a" }, { backend: nowhere(), name: "dead-b" }]));
    const last = await fetch(`${proxy.url}/x`);
    expect(last.status).toBe(429);
    expect(last.headers.get("x-detail")).toBe("b");
    expect(await last.text()).toBe("b is busy");
    const throttled = await fetch(`${proxy.url}/x`);
    expect(throttled.status).toBe(429);
    expect((await readJson(throttled)).error.code).toBe("backends_throttled");
    expect(throttled.headers.get("retry-after")).toBe("2");
    expect(Number(throttled.headers.get("retry-after-ms"))).toBeWithin(1500, 2001);
    expect(first.received.length + second.received.length).toBe(2);
    const unreachable = await fetch(`${proxy.url}/dead/x`);
    expect(unreachable.status).toBe(502);
    const unavailable = await fetch(`${proxy.url}/dead/x`);
    expect(unavailable.status).toBe(503);
    expect((await readJson(unavailable)).error.code).toBe("backends_unavailable");
    expect(Number(unavailable.headers.get("retry-after"))).toBeWithin(9, 11);
    await proxy.stop();
  });

  test("equal priorities share by weight (3:1 over 400 requests: 300/100 within 10 %); a priority-2 backend gets nothing while priority 1 serves", async () => {
    const heavy = backend("heavy");
    const light = backend("light");
    const standby = backend("standby");
    const proxy = await poolProxy(route("/", [{ backend: heavy, weight: 3 }, { backend: light }, { backend: standby, priority: 2 }]));
    for (let batch = 0; batch < 8; batch += 1) {
      await Promise.all(Array.from({ length: 50 }, () => fetch(`${proxy.url}/x`).then((response) => response.arrayBuffer())));
    }
    expect(heavy.received.length).toBeWithin(270, 331);
    expect(light.received.length).toBeWithin(90, 111);
    expect(heavy.received.length + light.received.length).toBe(400);
    expect(standby.received).toHaveLength(0);
    await proxy.stop();
  });

  test("after a failover an SSE answer streams event by event; deployments are renamed for the backend that says so", async () => {
    const primary = backend("sse-primary").then({ status: 429, headers: { "retry-after-ms": "100" } });
    const secondary = backend("sse-secondary").then({ status: 200, body: "one\ntwo\nthree\nfour", eventIntervalMs: 300 });
    const proxy = await poolProxy(route("/", [{ backend: primary }, { backend: secondary, priority: 2, deployments: "{ gpt-4o: gpt-4o-eus2 }" }]));
    const startedAt = performance.now();
    const response = await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: '{"stream":true}' });
    const reader = response.body!.getReader();
    const first = new TextDecoder().decode((await reader.read()).value);
    const firstAt = performance.now() - startedAt;
    expect(first).toStartWith("data: one");
    let rest = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      rest += new TextDecoder().decode(value);
    }
    expect(rest).toContain("data: four");
    expect(performance.now() - startedAt - firstAt).toBeGreaterThan(600);
    expect(primary.received.at(-1)!.target).toBe("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    expect(secondary.received.at(-1)!.target).toBe("/openai/deployments/gpt-4o-eus2/chat/completions?api-version=2024-10-21");
    await proxy.stop();
  });

  test("a WebSocket handshake refused with 429 by the first backend opens on the second", async () => {
    const primary = backend("ws-primary").then({ status: 429 });
    const secondary = backend("ws-secondary");
    const proxy = await poolProxy(route("/", [{ backend: primary }, { backend: secondary, priority: 2 }]));
    const client = new TestSocket(`ws://127.0.0.1:${proxy.port}/openai/v1/realtime?model=gpt-realtime`);
    await client.opened;
    await client.waitForFrames(1);
    expect(client.frames[0]).toBe("hello from ws-secondary");
    expect(primary.received).toHaveLength(1);
    client.socket.close();
    await proxy.stop();
  });

  test("a route with one backend never rests it: its 429 passes through, and the next request reaches it again", async () => {
    const only = backend("only").then({ status: 429, headers: { "retry-after": "60" }, body: "busy" });
    const proxy = await poolProxy(route("/", [{ backend: only }]));
    const throttled = await fetch(`${proxy.url}/x`);
    expect(throttled.status).toBe(429);
    expect(await throttled.text()).toBe("busy");
    expect((await fetch(`${proxy.url}/x`)).status).toBe(200);
    expect(only.received).toHaveLength(2);
    expect(proxy.lines.filter((line) => line.msg === "backend resting")).toEqual([]);
    await proxy.stop();
  });

  test("API_BASE_URL may list several URLs: one route, its backends in priority order", async () => {
    const primary = backend("list-primary").then({ status: 429, headers: { "retry-after": "5" } });
    const secondary = backend("list-secondary");
    const proxy = await startProxy(baseEnv({ API_BASE_URL: `${primary.url}, ${secondary.url}/base` }));
    await proxy.waitForHealth();
    const response = await fetch(`${proxy.url}/openai/models`);
    expect(response.headers.get("x-backend")).toBe("list-secondary");
    expect(secondary.received.at(-1)!.target).toBe("/base/openai/models");
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ upstream: primary.url, backends: [primary.url, `${secondary.url}/base`] });
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/openai/models");
    expect(line).toMatchObject({ backend: `127.0.0.1:${secondary.port}`, attempts: 2 });
    await proxy.stop();
  });

  // ---------------------------------------------------------------- under the faults failover exists for

  const timedFetch = async (url: string, init: RequestInit = {}) => {
    const startedAt = performance.now();
    const response = await fetch(url, init);
    const body = await response.text();
    return { status: response.status, backend: response.headers.get("x-backend"), headers: response.headers, body, ms: performance.now() - startedAt };
  };
  const requestLine = (proxy: ProxyProcess, path: string) => proxy.waitForLog((line) => line.msg === "request" && line.path === path);

  test("a backend whose address drops SYNs, or never finishes the TLS handshake, is a connection failure at its connect_timeout: requests sent meanwhile move on too, each within the timeout + the next answer; alone it is a 502", async () => {
    const dark = await startBlackHole();
    const silent = await startSilentListener();
    const secondary = backend("syn-secondary");
    const proxy = await poolProxy(
      route("/tls", [{ backend: `https://127.0.0.1:${silent.port}`, name: "silent-tls", connectTimeout: 1 }, { backend: secondary, priority: 2 }]),
      route("/alone", [{ backend: `http://127.0.0.1:${dark.port}`, name: "dark-alone", connectTimeout: 1 }]),
      route("/", [{ backend: `http://127.0.0.1:${dark.port}`, name: "dark", connectTimeout: 1 }, { backend: secondary, priority: 2 }]),
    );
    const body = randomBytes(2000);
    const post = (path: string, delayMs = 0) => Bun.sleep(delayMs).then(() => timedFetch(`${proxy.url}${path}`, { method: "POST", body }));
    const [first, meanwhile, tls] = await Promise.all([post("/openai/first"), post("/openai/meanwhile", 300), post("/tls/x")]);
    for (const outcome of [first, meanwhile, tls]) {
      expect(outcome).toMatchObject({ status: 200, backend: "syn-secondary" });
      expect(outcome.ms).toBeLessThan(1000 + 1500);
    }
    expect(secondary.received.map((request) => request.bodySha256)).toEqual([sha256(body), sha256(body), sha256(body)]);
    expect(await requestLine(proxy, "/openai/first")).toMatchObject({ route: "/", backend: "syn-secondary", attempts: 2, tried: "dark,syn-secondary" });
    expect(await proxy.waitForLog((line) => line.msg === "backend resting" && line.backend === "dark")).toMatchObject({ reason: "unreachable", rest_ms: 10_000 });
    // Resting now: the next request goes straight to the secondary.
    const after = await post("/openai/after");
    expect(after).toMatchObject({ status: 200, backend: "syn-secondary" });
    expect(after.ms).toBeLessThan(500);
    const alone = await post("/alone/x");
    expect(alone.status).toBe(502);
    expect(alone.ms).toBeLessThan(1000 + 1500);
    expect(JSON.parse(alone.body).error).toMatchObject({ code: "upstream_unreachable", message: expect.stringContaining("no connection within 1 s (connect_timeout)") });
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_failovers_total", { route: "/", reason: "unreachable" })).toBe(2);
    expect(valueOf(samples, "auth_proxy_failovers_total", { route: "/tls", reason: "unreachable" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_upstream_errors_total", { reason: "connect" })).toBe(4);
    await proxy.stop();
    dark.close();
    silent.close();
  });

  test("a GET, PUT or DELETE is sent to each backend once however many pooled connections Bun holds: a hang-then-reset upstream gets it once, the client its 502 or the next backend's answer", async () => {
    const secondary = backend("resend-secondary");
    const methods = ["GET", "PUT", "DELETE"] as const;
    const pools = methods.map((method) => route(`/${method.toLowerCase()}`, [{ backend: upstream.url, name: "hanging" }, { backend: secondary, priority: 2 }]));
    const proxy = await poolProxy(route("/alone", [{ backend: upstream.url, name: "hanging-alone" }]), ...pools);
    // 40 idle pooled connections to the upstream (POSTs keep theirs).
    await Promise.all(Array.from({ length: 40 }, () => fetch(`${proxy.url}/alone/test/silent?ms=200`, { method: "POST", body: "{}" }).then((response) => response.text())));
    const id = randomBytes(4).toString("hex");
    const sent = (tag: string) => upstream.received.filter((request) => request.target.endsWith(`id=${id}${tag}`)).length;
    const alone = await timedFetch(`${proxy.url}/alone/test/hang-then-reset?ms=1000&id=${id}alone`);
    expect(alone.status).toBe(502);
    expect(alone.ms).toBeLessThan(1000 + 1000);
    expect(sent("alone")).toBe(1);
    for (const method of methods) {
      const pooled = await timedFetch(`${proxy.url}/${method.toLowerCase()}/test/hang-then-reset?ms=1000&id=${id}${method}`, { method, body: method === "PUT" ? "{}" : undefined });
      expect(pooled, method).toMatchObject({ status: 200, backend: "resend-secondary" });
      expect(pooled.ms).toBeLessThan(1000 + 1000);
      expect(sent(method)).toBe(1);
    }
    await proxy.stop();
  });

  test("a POST sent whole that then loses its connection without an answer is not sent again: the client gets 502, the next backend nothing", async () => {
    const secondary = backend("replay-secondary");
    const proxy = await poolProxy(route("/", [{ backend: upstream.url, name: "resetting" }, { backend: secondary, priority: 2 }]));
    const id = randomBytes(4).toString("hex");
    const response = await timedFetch(`${proxy.url}/test/hang-then-reset?ms=300&id=${id}`, { method: "POST", body: '{"input_file_id":"file-1"}', headers: { "content-type": "application/json" } });
    expect(response.status).toBe(502);
    expect(upstream.received.filter((request) => request.target.includes(id))).toHaveLength(1);
    expect(secondary.received).toHaveLength(0);
    expect(await requestLine(proxy, `/test/hang-then-reset`)).toMatchObject({ route: "/", backend: "resetting", attempts: 1, status: 502 });
    // A refused connection, which surely did not act on it, still moves a POST on.
    const refusedProxy = await poolProxy(route("/", [{ backend: nowhere() }, { backend: secondary, priority: 2 }]));
    expect(await timedFetch(`${refusedProxy.url}/x`, { method: "POST", body: "{}" })).toMatchObject({ status: 200, backend: "replay-secondary" });
    await Promise.all([proxy.stop(), refusedProxy.stop()]);
  });

  test("when no backend answers better, the client gets a 429 among the answers, with its headers; the pool's own answers and 502s name the route, the backends tried and the attempts", async () => {
    const throttled = backend("first-throttled").then({ status: 429, headers: { "retry-after": "60", "x-ms-region": "eastus" }, body: '{"error":{"code":"429","message":"Rate limit"}}' });
    const proxy = await poolProxy(route("/gone", [{ backend: nowhere(), name: "gone-a" }, { backend: nowhere(), name: "gone-b", priority: 2 }]), route("/", [{ backend: throttled }, { backend: nowhere(), name: "gone", priority: 2 }]));
    const answer = await timedFetch(`${proxy.url}/openai/x`, { method: "POST", body: "{}" });
    expect(answer).toMatchObject({ status: 429, backend: "first-throttled", body: '{"error":{"code":"429","message":"Rate limit"}}' });
    expect(answer.headers.get("retry-after")).toBe("60");
    expect(answer.headers.get("x-ms-region")).toBe("eastus");
    expect(await requestLine(proxy, "/openai/x")).toMatchObject({ route: "/", backend: "first-throttled", attempts: 2, tried: "first-throttled,gone", status: 429 });
    // Both rest now, the first for 60 s, the other for 10 s: the pool answers for itself, and says when the first of any kind returns.
    const resting = await timedFetch(`${proxy.url}/openai/y`);
    expect(resting.status).toBe(429);
    expect(JSON.parse(resting.body).error.code).toBe("backends_throttled");
    expect(Number(resting.headers.get("retry-after"))).toBeLessThanOrEqual(10);
    expect(Number(resting.headers.get("retry-after-ms"))).toBeGreaterThan(8000);
    expect(await requestLine(proxy, "/openai/y")).toMatchObject({ route: "/", attempts: 0, status: 429 });
    const failed = await timedFetch(`${proxy.url}/gone/z`);
    expect(failed.status).toBe(502);
    expect(await requestLine(proxy, "/gone/z")).toMatchObject({ route: "/gone", backend: "gone-b", attempts: 2, tried: "gone-a,gone-b", status: 502 });
    await proxy.stop();
  });

  test("a target holding a fragment is routed by the path before it, never to another route", async () => {
    const search = backend("fragment-search");
    const other = backend("fragment-other");
    const proxy = await poolProxy(route("/search", [{ backend: search }]), route("/", [{ backend: other }]));
    const response = await rawRequest(proxy.port, "GET /search#x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    expect(response.status).toBe(200);
    expect(response.body).toContain('"backend":"fragment-search"');
    expect(other.received).toHaveLength(0);
    await proxy.stop();
  });
});

// ---------------------------------------------------------------- identities

describe("Identities", () => {
  const SECRET_APP_ID = "3f2e1d0c-9b8a-4f7e-8d6c-5b4a3f2e1d0c";
  const WORKLOAD_APP_ID = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d";
  const USER_ASSIGNED_ID = "c0ffee00-1234-4abc-8def-0123456789ab";
  const SERVICE_ACCOUNT_SUBJECT = "system:serviceaccount:ai:chat";

  /** The environment a pod gets without a certificate: the identity variables come per test. */
  function identityEnv(overrides: Record<string, string | undefined>): Record<string, string | undefined> {
    return { ...baseEnv({ AZURE_CERTIFICATE_PATH: undefined, AZURE_CLIENT_ID: undefined }), ...overrides };
  }

  /** The next log line matching `predicate` among those written from now on. */
  function nextLog(proxy: ProxyProcess, predicate: (line: LogLine) => boolean, timeoutMs = 15_000): Promise<LogLine> {
    const seen = proxy.lines.length;
    return proxy.waitForLog((line) => proxy.lines.indexOf(line) >= seen && predicate(line), timeoutMs);
  }

  /** Writes a file the way the kubelet does: a new file renamed over the old, never a half-written one. */
  function replaceFile(path: string, text: string): void {
    writeFileSync(`${path}.tmp`, text);
    renameSync(`${path}.tmp`, path);
  }

  async function forwardedWithValidToken(proxy: ProxyProcess): Promise<void> {
    const response = await fetch(`${proxy.url}/openai/models`);
    expect(response.status).toBe(200);
    await response.arrayBuffer();
    expect(lastReceived().tokenValid).toBe(true);
  }

  describe("mode detection follows the contract's order", () => {
    const table: [string, Record<string, string>, string, RegExp][] = [
      ["nothing configured", {}, "certificate", /no credential is configured; certificate is the default/],
      ["a certificate", { AZURE_CERTIFICATE_PATH: "/c.pem" }, "certificate", /^AZURE_CERTIFICATE_PATH is set$/],
      ["a certificate under the alias", { AZURE_CLIENT_CERTIFICATE_PATH: "/c.pem" }, "certificate", /^AZURE_CLIENT_CERTIFICATE_PATH is set$/],
      ["a client secret", { AZURE_CLIENT_SECRET: "s" }, "client-secret", /^AZURE_CLIENT_SECRET is set$/],
      ["a client secret file", { AZURE_CLIENT_SECRET_FILE: "/s" }, "client-secret", /^AZURE_CLIENT_SECRET_FILE is set$/],
      ["the webhook's token file", { AZURE_FEDERATED_TOKEN_FILE: "/t" }, "workload-identity", /^AZURE_FEDERATED_TOKEN_FILE is set$/],
      ["a certificate and the webhook's token file", { AZURE_CERTIFICATE_PATH: "/c.pem", AZURE_FEDERATED_TOKEN_FILE: "/t" }, "certificate", /^AZURE_CERTIFICATE_PATH is set; it comes before AZURE_FEDERATED_TOKEN_FILE \(set AZURE_AUTH_MODE/],
      ["a secret and the webhook's token file", { AZURE_CLIENT_SECRET: "s", AZURE_FEDERATED_TOKEN_FILE: "/t" }, "client-secret", /it comes before AZURE_FEDERATED_TOKEN_FILE/],
      ["all three", { AZURE_CERTIFICATE_PATH: "/c.pem", AZURE_CLIENT_SECRET: "s", AZURE_FEDERATED_TOKEN_FILE: "/t" }, "certificate", /before AZURE_CLIENT_SECRET and AZURE_FEDERATED_TOKEN_FILE/],
      ["App Service's managed identity variables alone", { IDENTITY_ENDPOINT: "http://127.0.0.1:1/msi/token", IDENTITY_HEADER: "h" }, "certificate", /certificate is the default/],
      ["AZURE_AUTH_MODE over a certificate", { AZURE_AUTH_MODE: "managed-identity", AZURE_CERTIFICATE_PATH: "/c.pem" }, "managed-identity", /^AZURE_AUTH_MODE=managed-identity$/],
      ["AZURE_AUTH_MODE in any case", { AZURE_AUTH_MODE: "Workload-Identity" }, "workload-identity", /^AZURE_AUTH_MODE=workload-identity$/],
    ];
    for (const [name, env, mode, reason] of table) {
      test(name, () => {
        const choice = chooseAuthMode(env) as { mode: string; reason: string };
        expect(choice.mode).toBe(mode);
        expect(choice.reason).toMatch(reason);
      });
    }
    test("--auth-mode overrides AZURE_AUTH_MODE; an unknown mode names the setting and the choices", () => {
      expect(chooseAuthMode({ AZURE_AUTH_MODE: "certificate" }, { "--auth-mode": "client-secret" })).toEqual({ mode: "client-secret", reason: "--auth-mode=client-secret" });
      expect(chooseAuthMode({ AZURE_AUTH_MODE: "msi" })).toEqual({ error: "AZURE_AUTH_MODE=msi is not an identity mode; use one of certificate, client-secret, workload-identity, managed-identity" });
    });
    test("each mode's missing variables are named, and only those", () => {
      const missing = (env: Record<string, string>) => loadConfig(env).errors.find((error) => error.startsWith("Missing"));
      expect(missing({ AZURE_FEDERATED_TOKEN_FILE: "/t" })).toStartWith("Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, API_BASE_URL (workload-identity mode: AZURE_FEDERATED_TOKEN_FILE is set); the workload identity webhook injects");
      // Explicit workload identity on a pod the webhook did not mutate: the line says what mutates it.
      expect(missing({ AZURE_AUTH_MODE: "workload-identity", API_BASE_URL: "https://r.openai.azure.com" })).toBe(
        'Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE (workload-identity mode: AZURE_AUTH_MODE=workload-identity); the workload identity webhook injects AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE into pods labelled azure.workload.identity/use: "true" whose ServiceAccount has the azure.workload.identity/client-id annotation',
      );
      expect(missing({ AZURE_AUTH_MODE: "client-secret" })).toBe("Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET (or AZURE_CLIENT_SECRET_FILE), API_BASE_URL (client-secret mode: AZURE_AUTH_MODE=client-secret)");
      expect(missing({ AZURE_AUTH_MODE: "managed-identity" })).toBe("Missing required Azure AD configuration: API_BASE_URL (managed-identity mode: AZURE_AUTH_MODE=managed-identity)");
      const { config, errors } = loadConfig({ AZURE_AUTH_MODE: "managed-identity", API_BASE_URL: "https://r.openai.azure.com" });
      expect(errors).toEqual([]);
      expect(config).toMatchObject({ authMode: "managed-identity", clientId: undefined });
    });
  });

  test("each federated-credential AADSTS code gets a hint naming what the token presents", () => {
    const claims = { issuer: "https://oidc.example/abc/", subject: "system:serviceaccount:ai:chat", audience: "api://AzureADTokenExchange", expiresAt: "2026-11-29T00:00:00.000Z" };
    expect(federatedCredentialHint("AADSTS700211", claims, CLIENT_ID, "/t")).toContain("whose issuer is exactly https://oidc.example/abc/");
    for (const code of ["AADSTS70021", "AADSTS700212", "AADSTS700213"]) {
      expect(federatedCredentialHint(code, claims, CLIENT_ID, "/t")).toContain("The token presents issuer https://oidc.example/abc/, subject system:serviceaccount:ai:chat, audience api://AzureADTokenExchange");
    }
    expect(federatedCredentialHint("AADSTS700024", claims, CLIENT_ID, "/t")).toContain("The token in /t has expired (exp 2026-11-29T00:00:00.000Z)");
    expect(federatedCredentialHint("AADSTS50013", claims, CLIENT_ID, "/t")).toBeUndefined();
  });

  test("--help names --auth-mode, the four modes and each mode's variables", async () => {
    const proxy = spawnProxy({}, ["--help"]);
    expect(await proxy.exited).toBe(0);
    for (const text of ["--auth-mode", "AZURE_AUTH_MODE", "certificate, client-secret, workload-identity, managed-identity", "AZURE_CLIENT_SECRET_FILE", "AZURE_FEDERATED_TOKEN_FILE"]) {
      expect(proxy.stdout).toContain(text);
    }
  });

  test("a pod with a certificate and the webhook's token file uses the certificate, and the startup line says why", async () => {
    const issuer = new FakeOidcIssuer();
    const tokenFile = certs.write("both-token", issuer.serviceAccountToken("ai", "chat"));
    const proxy = await startProxy(baseEnv({ AZURE_FEDERATED_TOKEN_FILE: tokenFile }));
    await proxy.waitForHealth();
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({
      identity_mode: "certificate",
      identity_reason: "AZURE_CERTIFICATE_PATH is set; it comes before AZURE_FEDERATED_TOKEN_FILE (set AZURE_AUTH_MODE to choose another)",
      certificate_thumbprint: thumbprintOf(appCertificate.certificatePem),
    });
    // The assertion Entra ID received was the app's own, signed with the certificate.
    expect(JSON.parse(Buffer.from(entra.assertions.at(-1)!.split(".")[1]!, "base64url").toString()).iss).toBe(CLIENT_ID);
    await proxy.stop();
  });

  test("client secret: tokens, a rotated secret file used at the next refresh, a wrong one a clear failure with backoff and no exit", async () => {
    entra.register({ clientId: SECRET_APP_ID, certificates: [], secrets: [CLIENT_SECRET], tokenLifetimeSeconds: 4 });
    const secretFile = certs.write("client-secret", `${CLIENT_SECRET}\n`);
    const direct = await startProxy(identityEnv({ AZURE_CLIENT_ID: SECRET_APP_ID, AZURE_CLIENT_SECRET: CLIENT_SECRET }));
    await direct.waitForHealth();
    expect(direct.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ identity_mode: "client-secret", identity_reason: "AZURE_CLIENT_SECRET is set", client_secret: "AZURE_CLIENT_SECRET", client_id: SECRET_APP_ID });
    await forwardedWithValidToken(direct);
    await direct.stop();

    const proxy = await startProxy(identityEnv({ AZURE_CLIENT_ID: SECRET_APP_ID, AZURE_CLIENT_SECRET_FILE: secretFile }));
    await proxy.waitForHealth();
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ identity_mode: "client-secret", client_secret: `AZURE_CLIENT_SECRET_FILE=${secretFile}` });

    // Rotation: a new secret is added, the Kubernetes Secret updated, the old secret deleted.
    entra.register({ clientId: SECRET_APP_ID, certificates: [], secrets: [ROTATED_SECRET], tokenLifetimeSeconds: 4 });
    replaceFile(secretFile, ROTATED_SECRET);
    await nextLog(proxy, (line) => line.msg === "token acquired");
    expect(entra.clientSecrets.at(-1) === ROTATED_SECRET).toBe(true);
    await forwardedWithValidToken(proxy);

    // A wrong secret: AADSTS7000215 with what to check, requests served while the token lasts, then 503, never an exit.
    replaceFile(secretFile, "the secret's ID, not its value");
    const failure = await nextLog(proxy, (line) => line.msg === "token acquisition failed");
    expect(failure).toMatchObject({ aadsts: "AADSTS7000215", client_secret: `AZURE_CLIENT_SECRET_FILE=${secretFile}` });
    expect(String(failure.hint)).toContain("the secret's ID instead of its value");
    await proxy.waitForHealth(503, 10_000);
    const refused = await fetch(`${proxy.url}/openai/models`);
    expect(refused.status).toBe(503);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect((await readJson(refused)).error.message).toContain("AADSTS7000215");
    const times = entra.requestTimes.get(SECRET_APP_ID)!.slice(-3);
    for (let i = 1; i < times.length; i++) expect(times[i]! - times[i - 1]!).toBeGreaterThanOrEqual(MIN_TOKEN_REQUEST_INTERVAL_MS - 50);

    replaceFile(secretFile, `${ROTATED_SECRET}\n`);
    await proxy.waitForHealth(200, 20_000);
    expect(proxy.exitCode).toBeNull();
    await proxy.stop();
  }, 45_000);

  test("workload identity: the token file is read afresh for every token, a rotated one used, stale, missing, empty or mismatched ones clear failures with backoff", async () => {
    const issuer = new FakeOidcIssuer();
    const otherIssuer = new FakeOidcIssuer("other-cluster");
    entra.trustIssuer(issuer);
    entra.trustIssuer(otherIssuer);
    entra.register({ clientId: WORKLOAD_APP_ID, certificates: [], federatedCredentials: [{ issuer: issuer.url, subject: SERVICE_ACCOUNT_SUBJECT }], tokenLifetimeSeconds: 4 });
    // What the AKS webhook mounts: a projected token under a ..data symlink the kubelet swaps.
    const tokenFile = certs.write("azure-identity-token", issuer.serviceAccountToken("ai", "chat"));
    const env = identityEnv({ AZURE_CLIENT_ID: WORKLOAD_APP_ID, AZURE_FEDERATED_TOKEN_FILE: tokenFile });

    const check = spawnProxy(env, ["--check"]);
    expect(await check.exited).toBe(0);
    expect(JSON.parse(check.stdout)).toMatchObject({ status: "ok", identity_mode: "workload-identity", federated_token_issuer: issuer.url, federated_token_subject: SERVICE_ACCOUNT_SUBJECT });

    const proxy = await startProxy(env);
    await proxy.waitForHealth();
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({
      identity_mode: "workload-identity",
      identity_reason: "AZURE_FEDERATED_TOKEN_FILE is set",
      federated_token_file: tokenFile,
      federated_token_issuer: issuer.url,
      federated_token_subject: SERVICE_ACCOUNT_SUBJECT,
    });
    await forwardedWithValidToken(proxy);

    // The kubelet replaces the token: the next refresh presents the new one.
    const rotated = issuer.serviceAccountToken("ai", "chat", { expiresInSeconds: 3000 });
    replaceFile(tokenFile, rotated);
    await nextLog(proxy, (line) => line.msg === "token acquired");
    // Compared as a boolean so a failure never prints the token.
    expect(entra.assertions.at(-1) === rotated).toBe(true);

    /** Puts `content` in the file (or removes it), expects one failure naming `expected`, then restores a good token. */
    const failsWith = async (content: string | undefined, expected: { aadsts?: string; error?: string; hint?: string }) => {
      if (content === undefined) rmSync(tokenFile);
      else replaceFile(tokenFile, content);
      const failure = await nextLog(proxy, (line) => line.msg === "token acquisition failed");
      if (expected.aadsts) expect(failure.aadsts).toBe(expected.aadsts);
      if (expected.error) expect(String(failure.error)).toContain(expected.error);
      if (expected.hint) expect(String(failure.hint)).toContain(expected.hint);
      expect(Number(failure.retry_in_s)).toBeGreaterThanOrEqual(0.5);
      replaceFile(tokenFile, issuer.serviceAccountToken("ai", "chat"));
      await nextLog(proxy, (line) => line.msg === "token acquired");
    };
    await failsWith(issuer.serviceAccountToken("ai", "chat", { expiresInSeconds: -600 }), { aadsts: "AADSTS700024", hint: `The token in ${tokenFile} has expired` });
    await failsWith(undefined, { error: `AZURE_FEDERATED_TOKEN_FILE=${tokenFile} cannot be read (no such file)` });
    await failsWith("", { error: `AZURE_FEDERATED_TOKEN_FILE=${tokenFile} is empty` });
    await failsWith(issuer.serviceAccountToken("ai", "batch"), { aadsts: "AADSTS70021", hint: "subject system:serviceaccount:ai:batch" });
    await failsWith(otherIssuer.serviceAccountToken("ai", "chat"), { aadsts: "AADSTS700211", hint: `whose issuer is exactly ${otherIssuer.url}` });
    await failsWith(issuer.serviceAccountToken("ai", "chat", { audience: "api://wrong" }), { aadsts: "AADSTS70021", hint: "audience api://wrong" });
    await forwardedWithValidToken(proxy);
    expect(proxy.exitCode).toBeNull();
    await proxy.stop();
  }, 60_000);

  test("managed identity through IMDS: system-assigned, resource without /.default, 24 h tokens refreshed at half-life", async () => {
    const imds = new FakeManagedIdentityEndpoint(entra, "imds").start();
    try {
      const env = identityEnv({ AZURE_AUTH_MODE: "managed-identity", AZURE_TENANT_ID: undefined, ...imds.environment() });
      const check = spawnProxy(env, ["--check"]);
      expect(await check.exited).toBe(0);
      expect(JSON.parse(check.stdout)).toMatchObject({ status: "ok", identity_mode: "managed-identity", managed_identity: "system-assigned", managed_identity_source: "IMDS" });

      const proxy = await startProxy(env);
      await proxy.waitForHealth();
      expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ identity_mode: "managed-identity", identity_reason: "AZURE_AUTH_MODE=managed-identity", managed_identity: "system-assigned" });
      const acquired = proxy.lines.find((line) => line.msg === "token acquired")!;
      expect(acquired.managed_identity_source).toBe("IMDS");
      const expiresOn = Date.parse(String(acquired.expires_on));
      const refreshAt = Date.parse(String(acquired.refresh_at));
      expect(expiresOn - Date.now()).toBeGreaterThan(23.9 * 3600_000);
      // MSAL's refresh_in for managed identity tokens: half of a life over 2 h, well before expiry.
      expect(Math.abs(refreshAt - Date.now() - 12 * 3600_000)).toBeLessThan(120_000);
      await forwardedWithValidToken(proxy);
      const request = imds.requests.at(-1)!;
      expect(request.headers.metadata).toBe("true");
      expect(request.query).toMatchObject({ "api-version": "2018-02-01", resource: "https://cognitiveservices.azure.com" });
      expect(request.query.client_id).toBeUndefined();
      // Same metrics as every mode, without the certificate's expiry.
      const { samples } = await scrape(proxy.url);
      expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { result: "success" })).toBe(1);
      expect(valueOf(samples, "auth_proxy_token_expiration_timestamp_seconds")).toBe(expiresOn / 1000);
      expect(valueOf(samples, "auth_proxy_certificate_expiration_timestamp_seconds")).toBeUndefined();
      await proxy.stop();
    } finally {
      imds.stop();
    }
  });

  test("managed identity endpoints are asked directly, never through HTTP_PROXY (they live on the host)", async () => {
    const imds = new FakeManagedIdentityEndpoint(entra, "imds").start();
    // A proxy that is not there: a token request sent through it would be refused.
    const deadProxy = `http://127.0.0.1:${freePort()}`;
    try {
      const proxy = await startProxy(identityEnv({ AZURE_AUTH_MODE: "managed-identity", HTTP_PROXY: deadProxy, HTTPS_PROXY: deadProxy, NO_PROXY: "example.internal", ...imds.environment() }));
      await proxy.waitForHealth();
      expect(imds.requests).toHaveLength(1);
      await proxy.stop();
    } finally {
      imds.stop();
    }
  });

  test("managed identity through App Service: a user-assigned identity's client ID reaches the endpoint; tokens refreshed; an unknown identity is a clear failure", async () => {
    const appService = new FakeManagedIdentityEndpoint(entra, "app-service").start();
    identityHeaders.push(appService.identityHeader);
    appService.userAssigned.add(USER_ASSIGNED_ID);
    appService.lifetimeSeconds = 4;
    try {
      const proxy = await startProxy(identityEnv({ AZURE_AUTH_MODE: "managed-identity", AZURE_CLIENT_ID: USER_ASSIGNED_ID, ...appService.environment() }));
      await proxy.waitForHealth();
      expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ managed_identity: `user-assigned ${USER_ASSIGNED_ID}` });
      const first = appService.requests[0]!;
      // Compared as a boolean so a failure never prints the endpoint's secret.
      expect(first.headers["x-identity-header"] === appService.identityHeader).toBe(true);
      expect(first.query).toMatchObject({ "api-version": "2019-08-01", client_id: USER_ASSIGNED_ID });
      // Refreshed at half of the 4 s life, with no gap: every request in 5 s carries a valid token.
      const until = Date.now() + 5000;
      while (Date.now() < until) {
        await forwardedWithValidToken(proxy);
        await Bun.sleep(100);
      }
      expect(appService.requests.length).toBeGreaterThanOrEqual(3);
      expect(proxy.lines.filter((line) => line.msg === "token acquired").every((line) => line.managed_identity_source === "AppService")).toBe(true);
      await proxy.stop();

      const unknown = await startProxy(identityEnv({ AZURE_AUTH_MODE: "managed-identity", AZURE_CLIENT_ID: CLIENT_ID, ...appService.environment() }));
      const failure = await unknown.waitForLog((line) => line.msg === "token acquisition failed");
      expect(String(failure.error)).toContain("Identity not found");
      expect(String(failure.hint)).toContain(`no user-assigned managed identity with client ID ${CLIENT_ID} is attached to this host`);
      const health = await fetch(`${unknown.url}/health`);
      expect(health.status).toBe(503);
      expect((await readJson(health)).reason).toContain("Identity not found");
      await unknown.stop();
    } finally {
      appService.stop();
    }
  }, 30_000);

  test("--check's failure and its hint are two sentences, not one run-on line", async () => {
    const dead = freePort();
    const proxy = spawnProxy({ ...baseEnv({ AZURE_AUTH_MODE: "managed-identity", AZURE_CERTIFICATE_PATH: undefined }), IDENTITY_ENDPOINT: `http://127.0.0.1:${dead}/msi/token`, IDENTITY_HEADER: "h" }, ["--check"]);
    expect(await proxy.exited).toBe(1);
    expect(proxy.stderr).toMatch(/failed: [^\n]*\. The managed identity endpoint \([A-Za-z ]+\) did not answer/);
  });

  test("managed identity endpoint down at start: 503 with Retry-After and recovery; one that never answers (off Azure) is given up within 10 s and said plainly", async () => {
    const port = freePort();
    const imds = new FakeManagedIdentityEndpoint(entra, "imds");
    // Off Azure, 169.254.169.254 takes the connection (or drops it) and never answers.
    const silent = net.createServer(() => {}).listen(0, "127.0.0.1");
    await new Promise((resolve) => silent.once("listening", resolve));
    const silentPort = (silent.address() as net.AddressInfo).port;
    try {
      const offAzure = await startProxy(identityEnv({ AZURE_AUTH_MODE: "managed-identity", ...imds.environment(silentPort) }));
      const down = await startProxy(identityEnv({ AZURE_AUTH_MODE: "managed-identity", ...imds.environment(port) }));
      const refusal = await down.waitForLog((line) => line.msg === "token acquisition failed");
      expect(String(refusal.hint)).toContain("off Azure, or on a host without a managed identity");
      const response = await fetch(`${down.url}/openai/models`);
      expect(response.status).toBe(503);
      expect(Number(response.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect((await readJson(response)).error.code).toBe("token_unavailable");
      imds.start(port);
      await down.waitForHealth(200, 20_000);
      await forwardedWithValidToken(down);
      await down.stop();

      const startedAt = Date.now();
      const silence = await offAzure.waitForLog((line) => line.msg === "token acquisition failed", 15_000);
      expect(Date.now() - startedAt).toBeLessThan(12_000);
      expect(String(silence.error)).toContain("no answer within 10 s");
      expect(String(silence.hint)).toContain("the managed identity endpoint (IMDS) did not answer");
      expect(offAzure.exitCode).toBeNull();
      await offAzure.stop();
    } finally {
      imds.stop();
      silent.close();
    }
  }, 40_000);
});

// ---------------------------------------------------------------- token lifecycle

describe("Token lifecycle", () => {
  test("refresh is due at expiry minus 5 min, earlier with refresh_in, at half-life under 10 min", () => {
    const obtainedAtMs = 1_000_000;
    const minutes = (n: number) => n * 60_000;
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs + minutes(75), refreshOnMs: undefined })).toBe(minutes(70));
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs + minutes(75), refreshOnMs: obtainedAtMs + minutes(37) })).toBe(minutes(37));
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs + minutes(75), refreshOnMs: obtainedAtMs + minutes(72) })).toBe(minutes(70));
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs + 6000, refreshOnMs: undefined })).toBe(3000);
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs + minutes(9), refreshOnMs: undefined })).toBe(minutes(4.5));
    expect(refreshDelay({ obtainedAtMs, expiresOnMs: obtainedAtMs - 1, refreshOnMs: undefined })).toBe(0);
  });

  test("backoff doubles from 1 s to 60 s with jitter", () => {
    expect([1, 2, 3, 4, 5, 6, 7, 8, 20].map((failures) => backoffDelay(failures, 1))).toEqual([1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);
    expect(backoffDelay(3, 0)).toBe(2000);
    expect(backoffDelay(20, 0)).toBe(30000);
  });

  // Three lifetimes, six refreshes at half-life; `make soak` holds 10 minutes of load with 20 s tokens.
  test("tokens living 6 s: 18 s of continuous traffic without a 401, a 503 or an expired token", async () => {
    entra.tokenLifetimeSeconds = 6;
    try {
      const proxy = await startProxy(baseEnv({ LOG_LEVEL: "warn" }));
      await proxy.waitForHealth();
      const rejectedBefore = upstream.rejected;
      const statuses = new Map<number, number>();
      const until = Date.now() + 18_000;
      await Promise.all(Array.from({ length: 4 }, async () => {
        while (Date.now() < until) {
          const response = await fetch(`${proxy.url}/openai/models`);
          await response.arrayBuffer();
          statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
          await Bun.sleep(10);
        }
      }));
      expect([...statuses.keys()]).toEqual([200]);
      expect(statuses.get(200)!).toBeGreaterThan(100);
      expect(upstream.rejected).toBe(rejectedBefore);
      await proxy.stop();
    } finally {
      resetEntra();
    }
  }, 60_000);

  test("Entra ID's refresh_in brings the refresh forward", async () => {
    entra.refreshInSeconds = 2;
    try {
      const proxy = await startProxy(baseEnv());
      const first = await proxy.waitForLog((line) => line.msg === "token acquired");
      expect(Date.parse(String(first.refresh_at)) - Date.parse(first.time)).toBeLessThan(3000);
      await proxy.waitForLog((line) => line.msg === "token acquired" && line.trigger === "scheduled", 6000);
      await proxy.stop();
    } finally {
      resetEntra();
    }
  });

  test("identity provider down after the first token: no failed request while it is valid, recovery after", async () => {
    entra.tokenLifetimeSeconds = 6;
    try {
      const proxy = await startProxy(baseEnv());
      const first = await proxy.waitForLog((line) => line.msg === "token acquired");
      entra.outage = { kind: "error", status: 503, error: "temporarily_unavailable", code: 90033, description: "A transient error has occurred. Please try again." };
      const expiresAt = Date.parse(String(first.expires_on));
      // While the token is valid (its last second spared for clock rounding), every request succeeds.
      while (Date.now() < expiresAt - 1000) {
        const response = await fetch(`${proxy.url}/openai/models`);
        expect(response.status).toBe(200);
        await response.arrayBuffer();
        await Bun.sleep(50);
      }
      const warning = await proxy.waitForLog((line) => line.msg === "token acquisition failed");
      expect(warning).toMatchObject({ level: "warn", aadsts: "AADSTS90033" });
      // Once it has expired, requests get 503 with Retry-After until Entra ID is back.
      await Bun.sleep(Math.max(0, expiresAt + 200 - Date.now()));
      const refused = await fetch(`${proxy.url}/openai/models`);
      expect(refused.status).toBe(503);
      expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect((await readJson(refused)).error.code).toBe("token_unavailable");
      await proxy.waitForLog((line) => line.msg === "token acquisition failed" && line.level === "error");
      entra.outage = undefined;
      await proxy.waitForHealth(200, 20_000);
      expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
      await proxy.stop();
    } finally {
      resetEntra();
    }
  }, 40_000);

  test("identity provider unreachable at start: 503 with Retry-After, no exit, recovery when it returns", async () => {
    entra.stop();
    try {
      const proxy = await startProxy(baseEnv());
      const failure = await proxy.waitForLog((line) => line.msg === "token acquisition failed");
      expect(failure.level).toBe("error");
      const response = await fetch(`${proxy.url}/openai/deployments/x/chat/completions`, { method: "POST", body: "{}" });
      expect(response.status).toBe(503);
      expect(Number(response.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect((await readJson(response)).error).toMatchObject({ type: "auth_proxy_error", code: "token_unavailable" });
      await Bun.sleep(1500);
      expect(proxy.exitCode).toBeNull();
      entra.start();
      await proxy.waitForHealth(200, 20_000);
      expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
      await proxy.stop();
    } finally {
      entra.stop();
      entra.start();
      resetEntra();
    }
  }, 40_000);

  /** A client id of its own, so its token requests can be counted apart from every other proxy's. */
  function misbehavingApp(clientId: string, behaviour: Pick<AppRegistration, "tokenLifetimeSeconds" | "answer">): Record<string, string | undefined> {
    entra.register({ clientId, certificates: [appCertificate.certificatePem], ...behaviour });
    return baseEnv({ AZURE_CLIENT_ID: clientId });
  }

  test("tokens already expired or expiring at once are failures with backoff, never a tight loop, and /health never says 200", async () => {
    const cases = [
      ["1e000000-0000-4000-8000-000000000000", 0],
      ["1e000000-0000-4000-8000-000000000001", -5],
    ] as const;
    const proxies = await Promise.all(cases.map(([clientId, lifetime]) => startProxy(misbehavingApp(clientId, { tokenLifetimeSeconds: lifetime }))));
    const startedAt = Date.now();
    const healthStatuses = new Set<number>();
    while (Date.now() - startedAt < 5000) {
      for (const proxy of proxies) healthStatuses.add((await fetch(`${proxy.url}/health`)).status);
      await Bun.sleep(100);
    }
    expect([...healthStatuses]).toEqual([503]);
    for (const [index, [clientId]] of cases.entries()) {
      const times = entra.requestTimes.get(clientId)!;
      // Backoff from 1 s: 3 or 4 requests in 5 s (the unfixed proxy made 649 and 1,205).
      expect(times.length).toBeGreaterThanOrEqual(2);
      expect(times.length).toBeLessThanOrEqual(5);
      for (let at = 1; at < times.length; at++) expect(times[at]! - times[at - 1]!).toBeGreaterThanOrEqual(MIN_TOKEN_REQUEST_INTERVAL_MS / 2);
      const failure = await proxies[index]!.waitForLog((line) => line.msg === "token acquisition failed");
      expect(String(failure.error)).toMatch(index === 0 ? /expires in [\d.]+ s, too soon to use|already expired/ : /already expired/);
      expect(failure.retry_in_s).toBeGreaterThan(0);
      await proxies[index]!.stop();
    }
  });

  test("a huge, non-JSON, tokenless or redirecting token response is a clear failure with backoff; absurd lifetimes are capped at 24 h", async () => {
    const cases: [string, () => Response, RegExp][] = [
      ["1e000000-0000-4000-8000-000000000002", () => new Response(JSON.stringify({ padding: "x".repeat(2 * 1024 * 1024) }), { headers: { "content-type": "application/json" } }), /over 1 MiB/],
      ["1e000000-0000-4000-8000-000000000003", () => new Response("<html>gateway</html>", { status: 200 }), /not JSON/],
      ["1e000000-0000-4000-8000-000000000004", () => Response.json({ token_type: "Bearer", expires_in: 3600 }), /.+/],
      ["1e000000-0000-4000-8000-000000000005", () => new Response(null, { status: 302, headers: { location: "https://elsewhere.example/token" } }), /redirect/],
    ];
    for (const [clientId, answer, expected] of cases) {
      const proxy = await startProxy(misbehavingApp(clientId, { answer }));
      const failure = await proxy.waitForLog((line) => line.msg === "token acquisition failed");
      expect(String(failure.error)).toMatch(expected);
      expect((await fetch(`${proxy.url}/health`)).status).toBe(503);
      expect((await fetch(`${proxy.url}/live`)).status).toBe(200);
      await proxy.stop();
    }
    const tenYears = 10 * 365 * 24 * 3600;
    const capped = await startProxy(misbehavingApp("1e000000-0000-4000-8000-000000000006", { tokenLifetimeSeconds: tenYears }));
    const acquired = await capped.waitForLog((line) => line.msg === "token acquired");
    const lifetimeMs = Date.parse(String(acquired.expires_on)) - Date.parse(acquired.time);
    expect(lifetimeMs).toBeLessThanOrEqual(MAX_TOKEN_LIFETIME_MS);
    expect(lifetimeMs).toBeGreaterThan(MAX_TOKEN_LIFETIME_MS - 60_000);
    await capped.waitForHealth();
    await capped.stop();
  });

  test("a refresh answered with garbage keeps serving on the current token", async () => {
    const clientId = "1e000000-0000-4000-8000-000000000007";
    const proxy = await startProxy(misbehavingApp(clientId, { tokenLifetimeSeconds: 6 }));
    const first = await proxy.waitForLog((line) => line.msg === "token acquired");
    entra.apps.get(clientId)!.answer = () => new Response("not json");
    await proxy.waitForLog((line) => line.msg === "token acquisition failed" && line.level === "warn");
    const response = await fetch(`${proxy.url}/openai/models`);
    expect(response.status).toBe(200);
    expect(Date.now()).toBeLessThan(Date.parse(String(first.expires_on)));
    await proxy.stop();
  });

  const stalls = [
    ["a token request that hangs is given up after 10 s and retried", { kind: "hang" }, "no answer within 10 s"],
    ["a token response that stalls mid-body is given up after 10 s, said as such, and retried", { kind: "stall-body" }, "no complete answer within 10 s"],
  ] as const;
  for (const [name, outage, said] of stalls) {
    test(name, async () => {
      entra.outage = outage;
      try {
        const proxy = await startProxy(baseEnv());
        const failure = await proxy.waitForLog((line) => line.msg === "token acquisition failed", 15_000);
        expect(String(failure.error)).toContain(said);
        entra.outage = undefined;
        await proxy.waitForHealth(200, 10_000);
        await proxy.stop();
      } finally {
        resetEntra();
      }
    }, 40_000);
  }

  test("a 401 storm while the identity provider fails asks it no more often than the refresh backoff allows", async () => {
    try {
      const proxy = await startProxy(baseEnv());
      await proxy.waitForHealth();
      entra.outage = { kind: "error", status: 503, error: "temporarily_unavailable", code: 90033, description: "A transient error has occurred. Please try again." };
      // Every answer is a 401 for 8 s (the 401 refreshes used to come every 5 s), while the token held is still valid.
      const stormEnds = Date.now() + 8_000;
      while (Date.now() < stormEnds) {
        const response = await fetch(`${proxy.url}/test/status?code=401`);
        expect(response.status).toBe(401);
        await response.arrayBuffer();
        await Bun.sleep(20);
      }
      const failures = proxy.lines.filter((line) => line.msg === "token acquisition failed");
      // The first 401 starts one refresh; after it fails, only the backoff's schedule asks again.
      expect(failures[0]).toMatchObject({ trigger: "upstream answered 401" });
      expect(failures.slice(1).map((line) => line.trigger)).toEqual(failures.slice(1).map(() => "scheduled"));
      const times = failures.map((line) => Date.parse(line.time));
      for (let index = 1; index < times.length; index += 1) expect(times[index]! - times[index - 1]!).toBeGreaterThanOrEqual(900);
      expect(failures.length).toBeLessThanOrEqual(5);
      await proxy.stop();
    } finally {
      resetEntra();
    }
  }, 30_000);

  test("a certificate swapped like a Kubernetes Secret is used without restart; a broken one is ignored", async () => {
    // kubelet's layout: cert.pem -> ..data/cert.pem, ..data -> ..<timestamp>/, swapped by renaming a new ..data link.
    const secretDir = join(certs.dir, "secret-volume");
    const mount = (version: string, pem: string) => {
      mkdirSync(join(secretDir, version), { recursive: true });
      writeFileSync(join(secretDir, version, "cert.pem"), pem);
      symlinkSync(version, join(secretDir, "..data_tmp"));
      renameSync(join(secretDir, "..data_tmp"), join(secretDir, "..data"));
    };
    const oldCert = certs.client("rotation-old");
    const newCert = certs.client("rotation-new");
    const rotationClientId = "9c8b7a6f-5e4d-4c3b-8a2f-1e0d9c8b7a6f";
    entra.register({ clientId: rotationClientId, certificates: [oldCert.certificatePem] });
    mount("..v1", readFileSync(oldCert.pemPath, "utf8"));
    symlinkSync("..data/cert.pem", join(secretDir, "cert.pem"));
    entra.tokenLifetimeSeconds = 4;
    try {
      const proxy = await startProxy(baseEnv({ AZURE_CLIENT_ID: rotationClientId, AZURE_CERTIFICATE_PATH: join(secretDir, "cert.pem") }));
      await proxy.waitForLog((line) => line.msg === "token acquired" && line.certificate_thumbprint === thumbprintOf(oldCert.certificatePem));

      // A broken file is reported and the last good certificate keeps working.
      mount("..v2", "-----BEGIN CERTIFICATE-----\ntruncated");
      const broken = await proxy.waitForLog((line) => line.msg === "certificate file unusable; keeping the last good certificate");
      expect(String(broken.error)).toContain("holds no certificate");
      const acquisitions = proxy.lines.filter((line) => line.msg === "token acquired").length;
      await proxy.waitForLog((line) => line.msg === "token acquired" && proxy.lines.filter((l) => l.msg === "token acquired").length > acquisitions);

      // Rotation: the new certificate is uploaded, the file swapped, the old certificate revoked.
      entra.register({ clientId: rotationClientId, certificates: [oldCert.certificatePem, newCert.certificatePem] });
      mount("..v3", readFileSync(newCert.pemPath, "utf8"));
      entra.register({ clientId: rotationClientId, certificates: [newCert.certificatePem] });
      await proxy.waitForLog((line) => line.msg === "token acquired" && line.certificate_thumbprint === thumbprintOf(newCert.certificatePem));
      expect(proxy.lines.some((line) => line.msg === "certificate changed")).toBe(true);
      const response = await fetch(`${proxy.url}/openai/models`);
      expect(response.status).toBe(200);
      expect(proxy.lines.filter((line) => line.msg === "token acquisition failed")).toHaveLength(0);
      await proxy.stop();
    } finally {
      resetEntra();
    }
  }, 30_000);
});

// ---------------------------------------------------------------- logs

describe("Logs", () => {
  let proxy: ProxyProcess;
  let sentAt = 0;
  let receivedAt = 0;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
    sentAt = Date.now();
    await (await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&secret=query`, { method: "POST", body: "{}" })).text();
    receivedAt = Date.now();
    await proxy.waitForLog((line) => line.msg === "request"); // log lines are written once per event-loop turn
  });
  afterAll(() => proxy.stop());

  test("an access line carries the wall-clock time its response ended, though it is encoded at the turn's end", () => {
    const time = Date.parse(String(proxy.lines.find((line) => line.msg === "request")!.time));
    // A millisecond either way: both clocks are read to the millisecond.
    expect(time).toBeGreaterThanOrEqual(sentAt - 1);
    expect(time).toBeLessThanOrEqual(receivedAt + 1);
  });

  test("every line is one JSON object with time, level and msg", () => {
    const lines = proxy.stdout.trim().split("\n");
    expect(lines.length).toBeGreaterThanOrEqual(3);
    for (const line of lines) {
      const entry = JSON.parse(line);
      expect(Number.isNaN(Date.parse(entry.time))).toBe(false);
      expect(["debug", "info", "warn", "error"]).toContain(entry.level);
      expect(typeof entry.msg).toBe("string");
    }
  });

  test("the startup line names version, listen address, upstream, client, tenant and certificate thumbprint", () => {
    const started = proxy.lines.find((line) => line.msg === "auth-proxy started")!;
    expect(started).toMatchObject({
      // A compiled binary adds the commit it was built from: 0.1.0+81ed68d24f37.
      version: expect.stringMatching(new RegExp(`^${packageJson.version.replaceAll(".", "\\.")}(\\+[0-9a-f]+(-dirty)?)?$`)),
      listen: `127.0.0.1:${proxy.port}`,
      // AUTH_PROXY_TEST_ROUTES=1 runs the suite with API_BASE_URL as a routes file: the line lists that route instead.
      ...(ROUTES_MODE ? { routes: [{ prefix: "/", scope: OPENAI_SCOPE, backends: [upstream.url] }] } : { upstream: upstream.url }),
      client_id: CLIENT_ID,
      tenant_id: entra.tenantId,
      certificate_thumbprint: thumbprintOf(appCertificate.certificatePem),
    });
  });

  test("a token refresh logs its expiry", () => {
    const acquired = proxy.lines.find((line) => line.msg === "token acquired")!;
    expect(Date.parse(String(acquired.expires_on))).toBeGreaterThan(Date.now());
  });

  test("each request has an access line with method, path without query, status and duration", () => {
    const access = proxy.lines.find((line) => line.msg === "request")!;
    expect(access).toMatchObject({ level: "info", method: "POST", path: "/openai/deployments/gpt-4o/chat/completions", status: 200 });
    expect(typeof access.duration_ms).toBe("number");
    expect(proxy.stdout).not.toContain("secret=query");
  });

  /** A fifo for the proxy's stdout: the test holds the reading end and decides when, or whether, to read. */
  function fifoStdout(): { readerFd: number; writerFd: number } {
    const path = join(certs.dir, `stdout-${randomBytes(4).toString("hex")}.fifo`);
    expect(Bun.spawnSync(["mkfifo", path]).exitCode).toBe(0);
    const readerFd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    return { readerFd, writerFd: openSync(path, fsConstants.O_WRONLY) };
  }

  /** What the fifo holds now. */
  function readFifo(fd: number): string {
    const buffer = Buffer.alloc(64 * 1024);
    let text = "";
    for (;;) {
      let read = 0;
      try {
        read = readSync(fd, buffer, 0, buffer.length, null);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "EAGAIN") break;
        throw error;
      }
      if (read === 0) break;
      text += buffer.toString("utf8", 0, read);
    }
    allOutput.push(text);
    return text;
  }

  /** `total` forwarded requests, 50 at a time, each of which must be answered within 5 s. */
  async function forwardedRequests(proxy: ProxyProcess, total: number): Promise<void> {
    for (let sent = 0; sent < total; sent += 50) {
      const statuses = await Promise.all(
        Array.from({ length: 50 }, async () => {
          const response = await fetch(`${proxy.url}/openai/models`, { signal: AbortSignal.timeout(5000) });
          await response.arrayBuffer();
          return response.status;
        }),
      );
      expect(new Set(statuses)).toEqual(new Set([200]));
    }
  }

  test("a stdout nobody reads never stops serving: lines past the buffer are dropped, counted, and said once the reader is back", async () => {
    const fifo = fifoStdout();
    const reader = await startProxy(baseEnv(), [], undefined, fifo.writerFd);
    closeSync(fifo.writerFd);
    await reader.waitForHealth();
    // 3,000 access lines: the pipe's 64 KiB hold about 190 of them, the proxy's buffer about 700 more.
    await forwardedRequests(reader, 3000);
    expect((await fetch(`${reader.url}/live`, { signal: AbortSignal.timeout(1000) })).status).toBe(200);
    const dropped = valueOf((await scrape(reader.url)).samples, "auth_proxy_log_lines_dropped_total")!;
    expect(dropped).toBeGreaterThan(1000);
    let text = "";
    const deadline = Date.now() + 10_000;
    while (!text.includes('"msg":"log lines dropped') && Date.now() < deadline) {
      text += readFifo(fifo.readerFd);
      await Bun.sleep(20);
    }
    await Bun.sleep(200);
    text += readFifo(fifo.readerFd);
    // Every line that arrives is whole: none was cut where the pipe filled.
    const lines = text.slice(0, text.lastIndexOf("\n")).split("\n").map((line) => JSON.parse(line) as LogLine);
    const warnings = lines.filter((line) => line.msg === "log lines dropped: stdout was not read fast enough");
    expect(warnings.length).toBeGreaterThanOrEqual(1);
    expect(warnings[0]!.level).toBe("warn");
    const reported = warnings.reduce((sum, line) => sum + (line.dropped as number), 0);
    expect(reported).toBe(dropped);
    // Each request has its line or is counted as dropped: no line is lost unsaid.
    expect(lines.filter((line) => line.msg === "request").length + reported).toBe(3000);
    await reader.stop();
    closeSync(fifo.readerFd);
  }, 60_000);

  test("a closed stdout (EPIPE) never stops serving: every line from then on is dropped and counted", async () => {
    const fifo = fifoStdout();
    const orphan = await startProxy(baseEnv(), [], undefined, fifo.writerFd);
    closeSync(fifo.writerFd);
    await orphan.waitForHealth();
    closeSync(fifo.readerFd);
    await forwardedRequests(orphan, 200);
    expect((await fetch(`${orphan.url}/live`)).status).toBe(200);
    // The last lines are encoded (and dropped) at the turn's write.
    const dropped = async () => valueOf((await scrape(orphan.url)).samples, "auth_proxy_log_lines_dropped_total")! >= 200;
    await waitFor(dropped, 2000);
    expect(orphan.exitCode).toBeNull();
    await orphan.stop();
  });

  test("LOG_LEVEL=warn drops the access lines", async () => {
    const quiet = await startProxy(baseEnv({ LOG_LEVEL: "warn" }));
    await quiet.waitForHealth();
    await (await fetch(`${quiet.url}/openai/models`)).text();
    expect(quiet.lines.filter((line) => line.level === "info")).toEqual([]);
    await quiet.stop();
  });
});

// ---------------------------------------------------------------- admin listener and observability

const METRIC_FAMILIES = [
  ["auth_proxy_build_info", "gauge"],
  ["auth_proxy_requests_total", "counter"],
  ["auth_proxy_request_duration_seconds", "histogram"],
  ["auth_proxy_time_to_first_byte_seconds", "histogram"],
  ["auth_proxy_response_duration_seconds", "histogram"],
  ["auth_proxy_requests_in_flight", "gauge"],
  ["auth_proxy_request_bytes_total", "counter"],
  ["auth_proxy_response_bytes_total", "counter"],
  ["auth_proxy_upstream_errors_total", "counter"],
  ["auth_proxy_websocket_sessions", "gauge"],
  ["auth_proxy_websocket_sessions_total", "counter"],
  ["auth_proxy_token_acquisitions_total", "counter"],
  ["auth_proxy_token_expiration_timestamp_seconds", "gauge"],
  ["auth_proxy_token_last_success_timestamp_seconds", "gauge"],
  ["auth_proxy_certificate_expiration_timestamp_seconds", "gauge"],
  ["auth_proxy_upstream_ratelimit_remaining", "gauge"],
  ["auth_proxy_log_lines_dropped_total", "counter"],
  ["process_cpu_seconds_total", "counter"],
  ["process_resident_memory_bytes", "gauge"],
  ["process_start_time_seconds", "gauge"],
  ["process_open_fds", "gauge"],
] as const;

describe("Admin listener", () => {
  test("ADMIN_PORT serves /health, /live and /metrics; anything else is 404 and never reaches the upstream", async () => {
    const adminPort = freePort();
    const proxy = await startProxy(baseEnv({ ADMIN_PORT: String(adminPort), ADMIN_HOST: "127.0.0.1" }));
    await proxy.waitForHealth();
    const admin = `http://127.0.0.1:${adminPort}`;
    expect(await (await fetch(`${admin}/health`)).json()).toEqual({ status: "ok" });
    expect(await (await fetch(`${admin}/live`)).json()).toEqual({ status: "ok" });
    expect((await fetch(`${admin}/metrics`)).status).toBe(200);
    expect((await fetch(`${admin}/health`, { method: "HEAD" })).status).toBe(200);
    const receivedBefore = upstream.received.length;
    for (const [method, path] of [["GET", "/openai/models"], ["POST", "/openai/deployments/gpt-4o/chat/completions"], ["POST", "/health"], ["GET", "/metrics?x"], ["GET", "/"]]) {
      const response = await fetch(`${admin}${path}`, { method: method!, body: method === "POST" ? "{}" : undefined });
      expect(response.status).toBe(404);
      expect((await readJson(response)).error.code).toBe("not_found");
    }
    expect(upstream.received.length).toBe(receivedBefore);
    const started = proxy.lines.find((line) => line.msg === "auth-proxy started")!;
    expect(started.admin_listen).toBe(`127.0.0.1:${adminPort}`);
    await proxy.stop();
  });

  test("probes driven as kubelet would, on the admin port: startup without a token, token held, token lost, shutdown", async () => {
    const adminPort = freePort();
    const clientId = "1e000000-0000-4000-8000-0000000000a1";
    entra.register({ clientId, certificates: [appCertificate.certificatePem], answer: () => new Response("unavailable", { status: 503 }) });
    const proxy = await startProxy(baseEnv({ AZURE_CLIENT_ID: clientId, ADMIN_PORT: String(adminPort), ADMIN_HOST: "127.0.0.1", SHUTDOWN_TIMEOUT: "2" }));
    const probe = async (path: string) => (await fetch(`http://127.0.0.1:${adminPort}${path}`, { signal: AbortSignal.timeout(1000) }).catch(() => undefined))?.status;
    // Starting: live, not ready (the startupProbe and readinessProbe keep the app waiting).
    expect(await probe("/live")).toBe(200);
    expect(await probe("/health")).toBe(503);
    // A token arrives at the next retry.
    entra.register({ clientId, certificates: [appCertificate.certificatePem], tokenLifetimeSeconds: 4 });
    await waitFor(async () => (await probe("/health")) === 200, 10_000);
    // The identity provider goes away: the token runs out, readiness fails, liveness holds.
    entra.register({ clientId, certificates: [appCertificate.certificatePem], answer: () => new Response("unavailable", { status: 503 }) });
    await waitFor(async () => (await probe("/health")) === 503, 10_000);
    expect(await probe("/live")).toBe(200);
    // Shutdown: readiness fails at once while in-flight work drains; the admin listener goes with the process.
    entra.register({ clientId, certificates: [appCertificate.certificatePem], tokenLifetimeSeconds: 3600 });
    await waitFor(async () => (await probe("/health")) === 200, 10_000);
    const stream = await fetch(`${proxy.url}/test/stream?ms=1500&interval=100`);
    const reader = stream.body!.getReader();
    await reader.read();
    proxy.proc.kill("SIGTERM");
    await proxy.waitForLog((line) => line.msg === "shutting down");
    expect(await probe("/health")).toBe(503);
    while (!(await reader.read()).done);
    expect(await proxy.exited).toBe(0);
    expect(await probe("/live")).toBeUndefined();
  }, 40_000);

  test("the manifests probe the admin port over HTTP and keep the proxy on loopback", () => {
    for (const file of ["native-sidecar.yaml", "classic-sidecar.yaml", "workload-identity.yaml"].filter((name) => existsSync(join(ROOT, "deploy/kubernetes", name)))) {
      const docs = ([] as any[]).concat(Bun.YAML.parse(readFileSync(join(ROOT, "deploy/kubernetes", file), "utf8")));
      const deployment = docs.find((doc) => doc.kind === "Deployment");
      const proxy = [...(deployment.spec.template.spec.initContainers ?? []), ...deployment.spec.template.spec.containers].find((c: any) => c.name === "auth-proxy");
      const env = Object.fromEntries(proxy.env.map((e: any) => [e.name, e.value]));
      expect(env.HOST).toBe("127.0.0.1");
      const adminPort = Number(env.ADMIN_PORT);
      expect([8080, 8081, 9090]).not.toContain(adminPort);
      expect(adminPort >= 15000 && adminPort <= 15090).toBe(false);
      expect(proxy.ports.find((port: any) => port.name === "admin").containerPort).toBe(adminPort);
      expect(proxy.startupProbe.httpGet).toMatchObject({ path: "/health", port: "admin" });
      expect(proxy.readinessProbe.httpGet).toMatchObject({ path: "/health", port: "admin" });
      expect(proxy.livenessProbe.httpGet).toMatchObject({ path: "/live", port: "admin" });
    }
  });
});

describe("Observability", () => {
  let proxy: ProxyProcess;
  let adminPort: number;
  beforeAll(async () => {
    adminPort = freePort();
    proxy = await startProxy(baseEnv({ ADMIN_PORT: String(adminPort), ADMIN_HOST: "127.0.0.1" }));
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());
  /** Every scrape goes to the secrets check at the end of the run. */
  const metricsOf = async (url = proxy.url) => {
    const scraped = await scrape(url);
    proxyBodies.push(scraped.text);
    return scraped;
  };

  test("/metrics on both listeners is Prometheus text 0.0.4 that promtool accepts, with HELP and TYPE for every contract family", async () => {
    await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: "{}" }).then((r) => r.text());
    for (const url of [proxy.url, `http://127.0.0.1:${adminPort}`]) {
      const { text, contentType } = await metricsOf(url);
      expect(contentType).toBe("text/plain; version=0.0.4; charset=utf-8");
      for (const [name, type] of METRIC_FAMILIES) {
        expect(text).toContain(`# HELP ${name} `);
        expect(text).toContain(`# TYPE ${name} ${type}\n`);
      }
      const lint = await promtool(["check", "metrics"], text);
      expect(lint.output).toBe("");
      expect(lint.exitCode).toBe(0);
    }
    const { samples } = await metricsOf();
    // The compiled binary's version carries its commit (0.1.0+abc123): the one its startup line names.
    const version = String(proxy.lines.find((line) => line.msg === "auth-proxy started")!.version);
    expect(version).toStartWith(packageJson.version);
    expect(valueOf(samples, "auth_proxy_build_info", { version, bun_version: Bun.version })).toBe(1);
    const certificateExpiry = valueOf(samples, "auth_proxy_certificate_expiration_timestamp_seconds")!;
    expect(certificateExpiry * 1000).toBe(Date.parse(new X509Certificate(appCertificate.certificatePem).validTo));
    const tokenExpiry = valueOf(samples, "auth_proxy_token_expiration_timestamp_seconds")!;
    expect(tokenExpiry * 1000).toBeGreaterThan(Date.now() + 3500_000);
    expect(valueOf(samples, "auth_proxy_token_last_success_timestamp_seconds")! * 1000).toBeLessThanOrEqual(Date.now());
    expect(valueOf(samples, "process_resident_memory_bytes")!).toBeGreaterThan(10e6);
    expect(valueOf(samples, "auth_proxy_upstream_ratelimit_remaining", { kind: "requests" })).toBe(99);
    expect(valueOf(samples, "auth_proxy_upstream_ratelimit_remaining", { kind: "tokens" })).toBe(12345);
  });

  test("plain and streamed requests move the request, duration, first-byte and byte families", async () => {
    const before = (await metricsOf()).samples;
    const post = { method: "POST", deployment: "gpt-4o", code: "200" };
    const body = JSON.stringify({ messages: [{ role: "user", content: "Hi" }] });
    const completion = await (await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body })).text();
    const sse = await (await fetch(`${proxy.url}/test/sse?events=7`)).text();
    const after = (await metricsOf()).samples;
    const delta = (name: string, labels: Record<string, string> = {}) => (valueOf(after, name, labels) ?? 0) - (valueOf(before, name, labels) ?? 0);
    expect(delta("auth_proxy_requests_total", post)).toBe(1);
    expect(delta("auth_proxy_requests_total", { method: "GET", deployment: "", code: "200" })).toBe(1);
    for (const histogram of ["auth_proxy_request_duration_seconds", "auth_proxy_time_to_first_byte_seconds", "auth_proxy_response_duration_seconds"]) {
      expect(delta(`${histogram}_count`, { method: "POST", deployment: "gpt-4o" })).toBe(1);
      expect(delta(`${histogram}_count`, { method: "GET", deployment: "" })).toBe(1);
      expect(delta(`${histogram}_bucket`, { method: "GET", deployment: "", le: "+Inf" })).toBe(1);
    }
    expect(delta("auth_proxy_request_bytes_total")).toBe(body.length);
    expect(delta("auth_proxy_response_bytes_total")).toBe(completion.length + sse.length);
    expect(valueOf(after, "auth_proxy_requests_in_flight")).toBe(0);
  });

  test("an open stream counts in flight; a client that aborts it is a 499 with aborted: true and a client_abort", async () => {
    const before = (await metricsOf()).samples;
    const controller = new AbortController();
    const stream = await fetch(`${proxy.url}/test/stream?ms=30000&interval=50`, { signal: controller.signal });
    const reader = stream.body!.getReader();
    await reader.read();
    expect(valueOf((await metricsOf()).samples, "auth_proxy_requests_in_flight")).toBe(1);
    controller.abort();
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/test/stream" && entry.status === 499);
    expect(line).toMatchObject({ aborted: true, method: "GET" });
    expect(line.bytes_out as number).toBeGreaterThan(0);
    const after = (await metricsOf()).samples;
    expect((valueOf(after, "auth_proxy_requests_total", { code: "499" }) ?? 0) - (valueOf(before, "auth_proxy_requests_total", { code: "499" }) ?? 0)).toBe(1);
    expect(valueOf(after, "auth_proxy_upstream_errors_total", { reason: "client_abort" })! - valueOf(before, "auth_proxy_upstream_errors_total", { reason: "client_abort" })!).toBe(1);
    expect(valueOf(after, "auth_proxy_requests_in_flight")).toBe(0);
  });

  test("an upstream 401 is counted and its token refresh too; an unreachable upstream is a 502 and a connect error", async () => {
    const before = (await metricsOf()).samples;
    await (await fetch(`${proxy.url}/test/status?code=401`)).text();
    await proxy.waitForLog((line) => line.msg === "token acquired" && line.trigger === "upstream answered 401");
    const after = (await metricsOf()).samples;
    expect(valueOf(after, "auth_proxy_requests_total", { code: "401" })! - (valueOf(before, "auth_proxy_requests_total", { code: "401" }) ?? 0)).toBe(1);
    expect(valueOf(after, "auth_proxy_token_acquisitions_total", { result: "success" })! - valueOf(before, "auth_proxy_token_acquisitions_total", { result: "success" })!).toBe(1);

    const orphan = await startProxy(baseEnv({ API_BASE_URL: `http://127.0.0.1:${freePort()}` }));
    await orphan.waitForHealth();
    expect((await fetch(`${orphan.url}/openai/deployments/gpt-4o/chat/completions`, { method: "POST", body: "{}" })).status).toBe(502);
    const orphaned = (await metricsOf(orphan.url)).samples;
    expect(valueOf(orphaned, "auth_proxy_upstream_errors_total", { reason: "connect" })).toBe(1);
    // Counted in the request's own series: its method and deployment.
    expect(valueOf(orphaned, "auth_proxy_requests_total", { method: "POST", deployment: "gpt-4o", code: "502" })).toBe(1);
    await orphan.stop();
  });

  test("a failing identity provider counts failures; no token means no expiration sample", async () => {
    const clientId = "1e000000-0000-4000-8000-0000000000a2";
    entra.register({ clientId, certificates: [appCertificate.certificatePem], answer: () => new Response("down", { status: 503 }) });
    const failing = await startProxy(baseEnv({ AZURE_CLIENT_ID: clientId }));
    await failing.waitForLog((line) => line.msg === "token acquisition failed");
    const { samples, text } = await metricsOf(failing.url);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { result: "failure" })).toBeGreaterThanOrEqual(1);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { result: "success" })).toBe(0);
    expect(valueOf(samples, "auth_proxy_token_expiration_timestamp_seconds")).toBeUndefined();
    expect(valueOf(samples, "auth_proxy_token_last_success_timestamp_seconds")).toBeUndefined();
    expect((await promtool(["check", "metrics"], text)).exitCode).toBe(0);
    await failing.stop();
  });

  test("the access line is written when the body ends: duration to the end, upstream and first-byte times, bytes, request ids", async () => {
    upstream.gated = true;
    try {
      // Bun sends a streamed response's head with its first chunk: the first event is released first.
      upstream.releaseEvent();
      const response = await fetch(`${proxy.url}/test/sse?events=3&trace=1`, { headers: { "x-ms-client-request-id": "client-req-7" } });
      const reader = response.body!.getReader();
      await reader.read();
      await Bun.sleep(300);
      upstream.releaseEvent();
      upstream.releaseEvent();
      let bytes = 0;
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        bytes += value.length;
      }
      const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/test/sse" && entry.client_request_id === "client-req-7");
      expect(line.duration_ms as number).toBeGreaterThanOrEqual(300);
      expect(line.upstream_ms as number).toBeLessThan(line.duration_ms as number);
      expect(line.ttfb_ms as number).toBeLessThan(300);
      expect(line.bytes_out).toBe(bytes + '{"event":0}'.length + "data: \n\n".length);
      expect(line.bytes_in).toBe(0);
      expect(line.status).toBe(200);
    } finally {
      upstream.gated = false;
    }
    await (await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: '{"n":"bytes-in-check"}' })).text();
    const completion = await proxy.waitForLog((entry) => entry.msg === "request" && entry.deployment === "gpt-4o" && entry.bytes_in === 22);
    expect(String(completion.request_id)).toStartWith("chatcmpl-");
  });

  test("access lines with request ids of hostile length and content: every line whole, parsed and exact, none lost", async () => {
    // 60 lines of ~10 KB ids that JSON must escape overflow the log buffer many times within one event-loop turn.
    const ids = Array.from({ length: 60 }, (_, n) => `long-${n}-${'q"b\\s\tt'.repeat(1_200)}-end`);
    await Promise.all(
      ids.map(async (id) => {
        const response = await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?n=1`, { method: "POST", body: "{}", headers: { "x-ms-client-request-id": id } });
        expect(response.status).toBe(200);
        await response.text();
      }),
    );
    for (const id of ids) await proxy.waitForLog((entry) => entry.msg === "request" && entry.client_request_id === id);
    expect(proxy.lines.filter((entry) => entry.level === "unparsed" && entry.msg.includes("long-"))).toEqual([]);
    expect(proxy.lines.filter((entry) => String(entry.client_request_id ?? "").startsWith("long-")).length).toBe(ids.length);
  });

  test("an upstream that drops mid-body: the client's body is cut, the line says truncated, a reset is counted", async () => {
    const before = (await metricsOf()).samples;
    const response = await fetch(`${proxy.url}/test/cut`);
    expect(response.status).toBe(200);
    await rejection(response.text());
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/test/cut");
    expect(line).toMatchObject({ status: 200, truncated: true });
    const after = (await metricsOf()).samples;
    expect(valueOf(after, "auth_proxy_upstream_errors_total", { reason: "reset" })! - valueOf(before, "auth_proxy_upstream_errors_total", { reason: "reset" })!).toBe(1);
    expect(valueOf(after, "auth_proxy_requests_in_flight")).toBe(0);
  });

  test("every metric a Grafana panel queries exists in a scrape", async () => {
    await (await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: "{}" })).text();
    const dashboard = JSON.parse(readFileSync(join(ROOT, "deploy/monitoring/grafana-dashboard.json"), "utf8"));
    const expressions: string[] = dashboard.panels.flatMap((panel: any) => panel.targets.map((target: any) => target.expr));
    expect(dashboard.panels.length).toBeGreaterThanOrEqual(8);
    const queried = new Set(expressions.flatMap((expr) => expr.match(/\b(auth_proxy|process)_[a-z_]+/g) ?? []));
    expect(queried.size).toBeGreaterThanOrEqual(12);
    // A pool's families exist only with a pool: a second proxy with two backends (API_BASE_URL as a list) has them.
    const pool = await startProxy(baseEnv({ API_BASE_URL: `${upstream.url},${upstream.url}/second` }));
    await pool.waitForHealth();
    await (await fetch(`${pool.url}/openai/models`)).text();
    const scraped = new Set([...(await metricsOf()).samples, ...(await metricsOf(pool.url)).samples].map((sample) => sample.name));
    for (const name of queried) expect(scraped.has(name), name).toBe(true);
    await pool.stop();
  });

  test("10,000 requests with random deployment names: 51 deployment label values, RSS within 5 MB", async () => {
    const fresh = await startProxy(baseEnv({ LOG_LEVEL: "warn" }));
    await fresh.waitForHealth();
    const rss = () => memoryKiB(fresh.proc.pid, "VmRSS");
    const load = async (count: number, name: () => string) => {
      let next = 0;
      await Promise.all(Array.from({ length: 50 }, async () => {
        while (next < count) {
          next += 1;
          await (await fetch(`${fresh.url}/openai/deployments/${name()}/chat/completions`, { method: "POST", body: "{}" })).text();
        }
      }));
    };
    // The same load with one name first, so the figure is what the names cost, not 50 connections warming up.
    await load(10_000, () => "warm");
    const before = rss();
    await load(10_000, () => randomBytes(8).toString("hex"));
    const { samples, text } = await metricsOf(fresh.url);
    const deployments = new Set(samples.filter((sample) => sample.name === "auth_proxy_requests_total").map((sample) => sample.labels.deployment));
    expect(deployments.size).toBe(51);
    expect(deployments.has("other")).toBe(true);
    expect(valueOf(samples, "auth_proxy_requests_total", { deployment: "other" })).toBe(10_000 - 49);
    expect(text.length).toBeLessThan(1_000_000);
    console.log(`10,000 random deployment names: proxy RSS ${(before / 1024).toFixed(1)} MB before, ${(rss() / 1024).toFixed(1)} MB after`);
    expect(rss() - before).toBeLessThan(5 * 1024);
    await fresh.stop();
  }, 60_000);
});

describe("Model token usage", () => {
  let proxy: ProxyProcess;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());

  type Tokens = { input: number; output: number; cached_input: number; reasoning: number };
  /** The four series of one deployment and model, as /metrics has them now (0 where absent). */
  async function tokensOf(deployment: string, model: string, url = proxy.url): Promise<Tokens> {
    const { text, samples } = await scrape(url);
    proxyBodies.push(text);
    const of = (type: string) => valueOf(samples, "auth_proxy_model_tokens_total", { deployment, model, type }) ?? 0;
    return { input: of("input"), output: of("output"), cached_input: of("cached_input"), reasoning: of("reasoning") };
  }
  const minus = (after: Tokens, before: Tokens): Tokens => ({ input: after.input - before.input, output: after.output - before.output, cached_input: after.cached_input - before.cached_input, reasoning: after.reasoning - before.reasoning });
  const sha256 = (bytes: Uint8Array | string) => createHash("sha256").update(bytes).digest("hex");
  let answerNumber = 0;
  /** Registers a canned answer and returns its path under a deployment. */
  function canned(answer: CannedAnswer, deployment = "usage-tests"): { path: string; name: string } {
    const name = `answer-${(answerNumber += 1)}`;
    upstream.answers.set(name, answer);
    return { path: `/openai/deployments/${deployment}/test/answer/${name}`, name };
  }
  /** The access line of the last request to `path`, once written. */
  const accessLine = (path: string) => proxy.waitForLog((line) => line.msg === "request" && line.path === path);

  test("JSON answers of chat completions, completions, embeddings and the Responses API move the four series by exactly their usage; the access line carries the counts", async () => {
    const kinds: [string, string, string, Tokens][] = [
      ["chat", usage.chatCompletion(), "gpt-4o-2024-08-06", usage.CHAT_TOKENS],
      ["completions", usage.completion(), "gpt-35-turbo-instruct", usage.COMPLETION_TOKENS],
      ["embeddings", usage.embeddings(), "text-embedding-3-small", usage.EMBEDDINGS_TOKENS],
      ["responses", usage.response(), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS],
      // Larger than the proxy takes whole (64 KiB): relayed, scanned as it passes.
      ["embeddings-relayed", usage.embeddings(8), "text-embedding-3-small", usage.EMBEDDINGS_TOKENS],
    ];
    for (const [deployment, body, model, expected] of kinds) {
      const { path } = canned({ headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) }, parts: [body] }, deployment);
      const before = await tokensOf(deployment, model);
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: '{"input":"x"}' });
      expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(body));
      expect(minus(await tokensOf(deployment, model), before)).toEqual(expected);
      const line = await accessLine(path);
      expect(line).toMatchObject({ deployment, model, input_tokens: expected.input });
      if (deployment !== "completions" && !deployment.startsWith("embeddings")) expect(line).toMatchObject({ output_tokens: expected.output, cached_input_tokens: expected.cached_input, reasoning_tokens: expected.reasoning });
    }
    const { text } = await scrape(proxy.url);
    expect((await promtool(["check", "metrics"], text)).output).toBe("");
    expect(text).toContain("# TYPE auth_proxy_model_tokens_total counter\n");
  });

  test("a streamed chat is counted once from its final chunk when the client asked include_usage (the openai SDK), its request byte-exact; without it nothing is counted", async () => {
    const client = new AzureOpenAI({ endpoint: proxy.url, apiKey: "placeholder-key", apiVersion: "2024-10-21", deployment: "gpt-4o-stream" });
    const before = await tokensOf("gpt-4o-stream", "gpt-4o");
    const stream = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true, stream_options: { include_usage: true } });
    let reported: unknown;
    for await (const chunk of stream) reported = chunk.usage ?? reported;
    expect(reported).toMatchObject({ prompt_tokens: 9, completion_tokens: 7 });
    const received = lastReceived();
    // The proxy never edits a request to get usage: the body the SDK sent is the body the upstream got.
    const sent = JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true, stream_options: { include_usage: true } });
    expect(received.bodySha256).toBe(sha256(sent));
    expect(minus(await tokensOf("gpt-4o-stream", "gpt-4o"), before)).toEqual({ input: 9, output: 7, cached_input: 0, reasoning: 0 });

    const plain = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true });
    for await (const chunk of plain) expect(chunk.usage ?? null).toBeNull();
    expect(lastReceived().bodySha256).toBe(sha256(JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true })));
    expect(minus(await tokensOf("gpt-4o-stream", "gpt-4o"), before)).toEqual({ input: 9, output: 7, cached_input: 0, reasoning: 0 });
    const lines = proxy.lines.filter((line) => line.msg === "request" && String(line.path).includes("gpt-4o-stream"));
    expect(lines.at(-1)!.input_tokens).toBeUndefined();
    expect(lines.at(-2)).toMatchObject({ model: "gpt-4o", input_tokens: 9, output_tokens: 7 });
  });

  test("the Responses API stream is counted from response.completed and Azure's chat stream from its last chunk; each event reaches the client before the upstream sends the next", async () => {
    for (const [events, model, expected] of [[usage.responseEvents(), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS], [usage.chatStreamEvents(), "gpt-4o-2024-08-06", usage.CHAT_TOKENS]] as const) {
      const { path, name } = canned({ headers: { "content-type": "text/event-stream" }, parts: [...events], gated: true }, "streams");
      const before = await tokensOf("streams", model);
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
      const reader = response.body!.getReader();
      let seen = "";
      for (let index = 0; index < events.length; index += 1) {
        while (seen.length < events.slice(0, index + 1).join("").length) {
          const { value, done } = await reader.read();
          if (done) break;
          seen += new TextDecoder().decode(value);
        }
        expect(seen).toBe(events.slice(0, index + 1).join(""));
        // The client has this event while the upstream still holds the next.
        if (index === events.length - 1) break;
        expect(upstream.lastPartWrittenAt.has(name)).toBe(false);
        upstream.releaseEvent();
      }
      expect((await reader.read()).done).toBe(true);
      expect(minus(await tokensOf("streams", model), before)).toEqual(expected);
    }
  });

  test("gzip, deflate and br answers pass byte-exact with Content-Encoding kept, and their usage is read from a decoded copy (held, relayed and streamed)", async () => {
    const body = usage.chatCompletion();
    const large = usage.embeddings(40);
    const events = usage.responseEvents().join("");
    const encoders: Record<string, (text: string) => Buffer> = { gzip: (text) => gzipSync(text), deflate: (text) => deflateSync(text), br: (text) => brotliCompressSync(text) };
    for (const [encoding, encode] of Object.entries(encoders)) {
      for (const [text, contentType, model, expected] of [[body, "application/json", "gpt-4o-2024-08-06", usage.CHAT_TOKENS], [large, "application/json", "text-embedding-3-small", usage.EMBEDDINGS_TOKENS], [events, "text/event-stream", "o4-mini-2025-04-16", usage.RESPONSES_TOKENS]] as const) {
        const encoded = encode(text);
        // The streamed answers come in many writes, unframed by length: the decoder sees the body as it passes.
        const parts = contentType === "text/event-stream" || text === large ? Array.from({ length: Math.ceil(encoded.length / 300) }, (_, index) => encoded.subarray(index * 300, (index + 1) * 300)) : [encoded];
        const headers: Record<string, string | number> = { "content-type": contentType, "content-encoding": encoding };
        if (parts.length === 1) headers["content-length"] = encoded.length;
        const deployment = `encoded-${encoding}`;
        const { path } = canned({ headers, parts, gapMs: parts.length > 1 ? 1 : 0 }, deployment);
        const before = await tokensOf(deployment, model);
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit);
        expect(response.headers.get("content-encoding")).toBe(encoding);
        expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(encoded));
        // A compressed body's decoder may finish a moment after the client has the last byte.
        let counted = minus(await tokensOf(deployment, model), before);
        for (let tries = 0; tries < 50 && counted.input === 0; tries += 1) {
          await Bun.sleep(20);
          counted = minus(await tokensOf(deployment, model), before);
        }
        expect(counted).toEqual(expected);
      }
    }
  });

  test("a usage object cut across many TCP writes is counted once, wherever the cuts fall", async () => {
    const body = usage.chatCompletion();
    const events = usage.chatStreamEvents().join("");
    for (const [text, contentType] of [[body, "application/json"], [events, "text/event-stream"]] as const) {
      for (const size of [1, 7, 64]) {
        const { path } = canned({ headers: { "content-type": contentType }, parts: usage.piecesOf(text, size), gapMs: size === 1 ? 0 : 2 }, "cut-usage");
        const before = await tokensOf("cut-usage", "gpt-4o-2024-08-06");
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
        expect(await response.text()).toBe(text);
        expect(minus(await tokensOf("cut-usage", "gpt-4o-2024-08-06"), before)).toEqual(usage.CHAT_TOKENS);
      }
    }
  }, 30_000);

  test("malformed, truncated or absurd usage is not counted and never an error; the proxy keeps serving", async () => {
    const bodies = [
      '{"model":"bad-usage","usage":{"prompt_tokens":-5,"completion_tokens":"7"}}',
      '{"model":"bad-usage","usage":{"prompt_tokens":1e300,"completion_tokens":null}}',
      '{"model":"bad-usage","usage":null}',
      '{"model":"bad-usage","usage":"lots"}',
      '{"model":"bad-usage","usage":{"prompt_tokens":5,"completion_tokens":2',
      '{"model":"bad-usage","usage":{"prompt_tokens":[1],"completion_tokens":{"n":2}}}',
      '{"model":"bad-usage","usage"',
      `{"model":"bad-usage","usage":{${" ".repeat(10_000)}`,
      "not json at all, \"usage\": {{{{",
    ];
    for (const body of bodies) {
      for (const framed of [true, false]) {
        const { path } = canned({ headers: framed ? { "content-type": "application/json", "content-length": body.length } : { "content-type": "application/json" }, parts: [body] }, "malformed");
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
        expect(response.status).toBe(200);
        expect(await response.text()).toBe(body);
      }
    }
    // A gzip body that is not gzip, and one cut short.
    const gz = gzipSync(usage.chatCompletion());
    for (const bytes of [Buffer.from("definitely not gzip"), gz.subarray(0, gz.length - 20)]) {
      const { path } = canned({ headers: { "content-type": "application/json", "content-encoding": "gzip" }, parts: [bytes] }, "malformed");
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit);
      expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(bytes));
    }
    const { samples } = await scrape(proxy.url);
    expect(samples.filter((sample) => sample.name === "auth_proxy_model_tokens_total" && sample.labels.deployment === "malformed")).toEqual([]);
    // Still serving, and still counting.
    const { path } = canned({ headers: { "content-type": "application/json" }, parts: [usage.completion()] }, "malformed");
    await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text();
    expect(await tokensOf("malformed", "gpt-35-turbo-instruct")).toEqual(usage.COMPLETION_TOKENS);
    expect(proxy.lines.filter((line) => line.level === "error")).toEqual([]);
  });

  test("a 30 MB answer is scanned as it passes: its usage at the end is counted, the proxy's RSS moves by under 15 MB", async () => {
    const body = usage.embeddings(1600, 400_000);
    expect(body.length).toBeGreaterThan(30_000_000);
    const { path } = canned({ headers: { "content-type": "application/json", "content-length": body.length }, parts: usage.piecesOf(body, 256 * 1024) }, "large");
    const rss = () => memoryKiB(proxy.proc.pid, "VmRSS");
    await fetch(`${proxy.url}/health`);
    const before = rss();
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, rss())), 5);
    const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
    const hash = createHash("sha256");
    for await (const chunk of response.body!) {
      hash.update(chunk);
      peak = Math.max(peak, rss());
    }
    clearInterval(sampler);
    expect(hash.digest("hex")).toBe(sha256(body));
    expect(await tokensOf("large", "text-embedding-3-small")).toEqual({ input: 400_000, output: 0, cached_input: 0, reasoning: 0 });
    console.log(`30 MB answer: proxy RSS ${(before / 1024).toFixed(1)} MB before, peak ${(peak / 1024).toFixed(1)} MB`);
    expect(peak - before).toBeLessThan(15 * 1024);
  }, 60_000);

  test("Realtime response.done events are counted under the query's deployment and session.created's model; the session line sums them", async () => {
    const wsProxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url }));
    await wsProxy.waitForHealth();
    const client = new TestSocket(`ws://127.0.0.1:${wsProxy.port}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime`);
    await client.opened;
    await client.waitForFrames(1);
    // The fake echoes every text frame: these come back from the upstream as server events.
    client.send(usage.realtimeResponseDone(100, 20, 30));
    client.send(JSON.stringify({ type: "response.audio.delta", event_id: "e", delta: "A".repeat(50_000) }));
    client.send(usage.realtimeResponseDone(250, 60, 0));
    client.send('{"type":"response.done","response":{"usage":{"input_tokens":"many"}}}');
    await client.waitForFrames(5);
    const model = "gpt-4o-realtime-preview-2024-12-17";
    expect(await tokensOf("gpt-4o-realtime", model, wsProxy.url)).toEqual({ input: 350, output: 80, cached_input: 30, reasoning: 0 });
    client.socket.close(1000, "done");
    const line = await wsProxy.waitForLog((entry) => entry.msg === "websocket session");
    expect(line).toMatchObject({ model, input_tokens: 350, output_tokens: 80, cached_input_tokens: 30 });
    await wsProxy.stop();
  });

  test("200 distinct model names give at most 51 label values (50 and `other`), every token counted", async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    for (let index = 0; index < 200; index += 1) {
      const body = JSON.stringify({ model: `model-${index}`, usage: { prompt_tokens: 1, completion_tokens: 2 } });
      const { path } = canned({ headers: { "content-type": "application/json" }, parts: [body] }, "many-models");
      await (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}" })).text();
    }
    const { samples, text } = await scrape(fresh.url);
    proxyBodies.push(text);
    const input = samples.filter((sample) => sample.name === "auth_proxy_model_tokens_total" && sample.labels.type === "input");
    expect(new Set(input.map((sample) => sample.labels.model)).size).toBe(51);
    expect(valueOf(samples, "auth_proxy_model_tokens_total", { model: "other", type: "input" })).toBe(150);
    expect(valueOf(samples, "auth_proxy_model_tokens_total", { type: "output" })).toBe(400);
    await fresh.stop();
  });

  test("only the answer's own top-level usage counts: usage-shaped metadata, message text, tool arguments and nested objects, before or after it, neither hide nor forge it", async () => {
    const shapes: [string, string][] = [
      ["metadata-text-after", usage.responseEchoing({ usage: "n/a" })],
      ["metadata-object-after", usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" })],
      ["metadata-object-first", usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" }, true)],
    ];
    for (const [deployment, body] of shapes) {
      for (const size of [body.length, 7]) {
        // Whole (held with a Content-Length) and cut into 7-byte writes (relayed, chunked).
        const headers: Record<string, string | number> = size === body.length ? { "content-type": "application/json", "content-length": body.length } : { "content-type": "application/json" };
        const before = await tokensOf(deployment, "o4-mini-2025-04-16");
        const { path } = canned({ headers, parts: usage.piecesOf(body, size) }, deployment);
        expect(await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text()).toBe(body);
        expect(minus(await tokensOf(deployment, "o4-mini-2025-04-16"), before), `${deployment} in pieces of ${size}`).toEqual(usage.RESPONSES_TOKENS);
        expect(await accessLine(path)).toMatchObject({ model: "o4-mini-2025-04-16", input_tokens: 36, output_tokens: 87 });
      }
      expect(await tokensOf(deployment, "fake")).toEqual({ input: 0, output: 0, cached_input: 0, reasoning: 0 });
    }
    // Streams: a Responses event's `response.usage` counts, its metadata's does not; a chat chunk's top-level usage counts, one nested in a later chunk's delta does not.
    const created = `event: response.created\ndata: ${JSON.stringify({ type: "response.created", sequence_number: 0, response: { model: "o4-mini-2025-04-16", usage: null, metadata: { usage: usage.USAGE_SHAPED } } })}\n\n`;
    const nested = `data: ${JSON.stringify({ choices: [{ delta: { tool_calls: [{ function: { arguments: "{}" } }], usage: usage.USAGE_SHAPED }, index: 0 }], model: "gpt-4o-2024-08-06", usage: null })}\n\n`;
    const streams: [string, string, string, Tokens][] = [
      ["stream-responses", created + usage.responseEvents().join(""), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS],
      ["stream-chat", usage.chatStreamEvents().slice(0, -1).join("") + nested + "data: [DONE]\n\n", "gpt-4o-2024-08-06", usage.CHAT_TOKENS],
    ];
    for (const [deployment, events, model, expected] of streams) {
      const { path } = canned({ headers: { "content-type": "text/event-stream" }, parts: usage.piecesOf(events, 64) }, deployment);
      expect(await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text()).toBe(events);
      await accessLine(path);
      expect(await tokensOf(deployment, model), deployment).toEqual(expected);
    }
  });

  /** The proxy's peak RSS over `read` (sampled every 5 ms and at every chunk) and the slowest /live answer meanwhile. */
  async function peakAndLive(target: ProxyProcess, read: (onChunk: () => void) => Promise<void>): Promise<{ peakKiB: number; slowestLiveMs: number }> {
    const rss = () => memoryKiB(target.proc.pid, "VmRSS");
    let peakKiB = rss();
    const sampler = setInterval(() => (peakKiB = Math.max(peakKiB, rss())), 5);
    let slowestLiveMs = 0;
    let reading = true;
    const poller = (async () => {
      while (reading) {
        const startedAt = performance.now();
        await (await fetch(`${target.url}/live`)).text();
        slowestLiveMs = Math.max(slowestLiveMs, performance.now() - startedAt);
        await Bun.sleep(20);
      }
    })();
    await read(() => (peakKiB = Math.max(peakKiB, rss())));
    reading = false;
    await poller;
    clearInterval(sampler);
    return { peakKiB, slowestLiveMs };
  }

  test('a stream of `"usage":` (or `"model":`) and then 24 MB of blanks costs the RSS of a plain 24 MB stream (within 10 MB) and /live stays under 100 ms', async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    const blanks = Buffer.alloc(1024 * 1024, " ");
    const stream = async (prefix: string) => {
      const { path } = canned({ headers: { "content-type": "text/event-stream" }, parts: [prefix, ...Array.from({ length: 24 }, () => blanks), "}\n\n"] }, "blanks");
      const before = memoryKiB(fresh.proc.pid, "VmRSS");
      const { peakKiB, slowestLiveMs } = await peakAndLive(fresh, async (onChunk) => {
        let bytes = 0;
        for await (const chunk of (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}" })).body!) {
          bytes += chunk.byteLength;
          onChunk();
        }
        expect(bytes).toBe(prefix.length + 24 * blanks.length + 3);
      });
      return { grewKiB: peakKiB - before, slowestLiveMs };
    };
    const plain = await stream("data: {");
    const usageKey = await stream('data: {"usage":');
    const modelKey = await stream('data: {"model":');
    console.log(`24 MB stream: RSS +${(plain.grewKiB / 1024).toFixed(1)} MB plain, +${(usageKey.grewKiB / 1024).toFixed(1)} MB after "usage":, +${(modelKey.grewKiB / 1024).toFixed(1)} MB after "model":; /live at most ${Math.max(plain.slowestLiveMs, usageKey.slowestLiveMs, modelKey.slowestLiveMs).toFixed(0)} ms`);
    for (const hostile of [usageKey, modelKey]) {
      expect(hostile.grewKiB - plain.grewKiB).toBeLessThan(10 * 1024);
      expect(hostile.slowestLiveMs).toBeLessThan(100);
    }
    await fresh.stop();
  }, 60_000);

  test("eight 500-byte br answers that expand to 300 MiB of blanks: the client gets the bytes as sent, RSS stays within 64 MB of idle, /live under 200 ms", async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    const bomb = brotliCompressSync(Buffer.alloc(300 * 1024 * 1024, " "), { params: { [zlibConstants.BROTLI_PARAM_QUALITY]: 5 } });
    expect(bomb.length).toBeLessThan(1000);
    const { path } = canned({ headers: { "content-type": "application/json", "content-encoding": "br", "content-length": bomb.length }, parts: [bomb] }, "bomb");
    await fetch(`${fresh.url}/health`);
    const idle = memoryKiB(fresh.proc.pid, "VmRSS");
    const { peakKiB, slowestLiveMs } = await peakAndLive(fresh, async () => {
      const bodies = await Promise.all(Array.from({ length: 8 }, async () => new Uint8Array(await (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit)).arrayBuffer())));
      for (const body of bodies) expect(sha256(body)).toBe(sha256(bomb));
      // The exchanges end (and their lines are written) once the decoders are done.
      for (let index = 0; index < 8; index += 1) await fresh.waitForLog((line) => line.msg === "request" && line.path === path && fresh.lines.filter((other) => other.path === path).length > index, 30_000);
    });
    console.log(`8 br bombs: RSS ${(idle / 1024).toFixed(1)} MB idle, peak ${(peakKiB / 1024).toFixed(1)} MB; /live at most ${slowestLiveMs.toFixed(0)} ms`);
    expect(peakKiB - idle).toBeLessThan(64 * 1024);
    expect(slowestLiveMs).toBeLessThan(200);
    await fresh.stop();
  }, 90_000);
});

describe("Certificates", () => {
  test("the startup line and --check name both thumbprints; a certificate expiring within 30 days is a warning", async () => {
    const sha1 = new X509Certificate(appCertificate.certificatePem).fingerprint.replace(/:/g, "");
    const proxy = await startProxy(baseEnv());
    const started = await proxy.waitForLog((line) => line.msg === "auth-proxy started");
    expect(started).toMatchObject({ certificate_thumbprint: thumbprintOf(appCertificate.certificatePem), certificate_thumbprint_sha1: sha1 });
    // The test certificates live two days.
    const warning = await proxy.waitForLog((line) => line.msg === "the certificate expires soon; upload and mount a new one");
    expect(warning).toMatchObject({ level: "warn", certificate_thumbprint_sha1: sha1 });
    expect(warning.days_left as number).toBeLessThanOrEqual(2);
    await proxy.stop();
    const check = spawnProxy(baseEnv(), ["--check"]);
    expect(await check.exited).toBe(0);
    expect(JSON.parse(check.stdout)).toMatchObject({ certificate_thumbprint_sha1: sha1 });
  });

  test("AADSTS700027 failures name both thumbprints and say what to compare", async () => {
    const unregistered = certs.client("unregistered-2");
    const sha1 = new X509Certificate(unregistered.certificatePem).fingerprint.replace(/:/g, "");
    const proxy = await startProxy(baseEnv({ AZURE_CERTIFICATE_PATH: unregistered.pemPath }));
    const failure = await proxy.waitForLog((line) => line.msg === "token acquisition failed");
    expect(failure).toMatchObject({ aadsts: "AADSTS700027", certificate_thumbprint: thumbprintOf(unregistered.certificatePem), certificate_thumbprint_sha1: sha1 });
    expect(String(failure.hint)).toContain(`Compare the portal's thumbprint under Certificates & secrets with SHA-1 ${sha1}`);
    await proxy.stop();
    const check = spawnProxy(baseEnv({ AZURE_CERTIFICATE_PATH: unregistered.pemPath }), ["--check"]);
    expect(await check.exited).toBe(1);
    expect(check.stderr).toContain(`SHA-1 ${sha1}`);
    expect(check.stderr).toContain("differs from the file, or it has expired");
  });

  test("an expired certificate is an error at startup and the reason /health gives", async () => {
    const expired = certs.expired("expired-app");
    const clientId = "1e000000-0000-4000-8000-0000000000a3";
    entra.register({ clientId, certificates: [expired.certificatePem] });
    const proxy = await startProxy(baseEnv({ AZURE_CLIENT_ID: clientId, AZURE_CERTIFICATE_PATH: expired.pemPath }));
    const error = await proxy.waitForLog((line) => line.msg === "the certificate has expired; Entra ID will reject it");
    expect(error).toMatchObject({ level: "error", not_after: "2020-01-02T00:00:00.000Z" });
    await proxy.waitForLog((line) => line.msg === "token acquisition failed");
    const health = await fetch(`${proxy.url}/health`);
    expect(health.status).toBe(503);
    expect((await readJson(health)).reason).toStartWith("the certificate (SHA-1 ");
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_certificate_expiration_timestamp_seconds")).toBe(Date.parse("2020-01-02T00:00:00Z") / 1000);
    await proxy.stop();
  });
});

// ---------------------------------------------------------------- signals

describe("Signals", () => {
  /** The rest of a stream opened before the signal arrives whole (over 10 events, not cut), then the proxy exits 0, drained. */
  async function expectFinishedAndDrained(reader: { read(): Promise<{ done: boolean }> }, proxy: ProxyProcess): Promise<void> {
    let events = 1;
    for (;;) {
      const { done } = await reader.read();
      if (done) break;
      events += 1;
    }
    expect(events).toBeGreaterThan(10);
    expect(await proxy.exited).toBe(0);
    expect(proxy.lines.at(-1)).toMatchObject({ msg: "stopped", drained: true });
  }

  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    test(`${signal}: /health turns 503 at once, no new requests are taken, in-flight streams finish, exit 0`, async () => {
      const proxy = await startProxy(baseEnv({ SHUTDOWN_TIMEOUT: "10" }));
      await proxy.waitForHealth();
      const stream = await fetch(`${proxy.url}/test/stream?ms=1500&interval=100`);
      const reader = stream.body!.getReader();
      await reader.read();
      // A keep-alive connection opened before the signal, as a kubelet probe or client pool holds.
      const { socket } = await openStream(proxy.port, "GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n");
      let afterSignal = "";
      const closed = new Promise<void>((resolve) => socket.on("close", () => resolve()));
      proxy.proc.kill(signal);
      socket.on("data", (chunk) => (afterSignal += chunk));
      await proxy.waitForLog((line) => line.msg === "shutting down");
      // Bun may already have closed the idle connection; if not, it is asked for /health.
      if (!socket.destroyed) socket.write("GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
      await closed;
      const probe = afterSignal;
      // Either the probe is answered 503 or the connection is closed: never 200.
      expect(probe).not.toContain("200 OK");
      if (probe) expect(probe).toContain("503");
      await rejection(fetch(`${proxy.url}/openai/models`));
      await expectFinishedAndDrained(reader, proxy);
    });
  }

  test("a second signal during the drain is ignored: the open stream finishes and the exit is still 0", async () => {
    const proxy = await startProxy(baseEnv({ SHUTDOWN_TIMEOUT: "10" }));
    await proxy.waitForHealth();
    const stream = await fetch(`${proxy.url}/test/stream?ms=1500&interval=100`);
    const reader = stream.body!.getReader();
    await reader.read();
    proxy.proc.kill("SIGTERM");
    await proxy.waitForLog((line) => line.msg === "shutting down");
    proxy.proc.kill("SIGTERM");
    proxy.proc.kill("SIGINT");
    await proxy.waitForLog((line) => line.msg === "signal ignored: already shutting down" && line.signal === "SIGINT");
    await expectFinishedAndDrained(reader, proxy);
  });

  /** A proxy in front of the fake realtime upstream, with one session open (its session.created received). */
  async function proxyWithSession(shutdownTimeout: string) {
    const proxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url, SHUTDOWN_TIMEOUT: shutdownTimeout }));
    await proxy.waitForHealth();
    const client = new TestSocket(`ws://127.0.0.1:${proxy.port}/openai/v1/realtime?model=gpt-realtime`);
    await client.waitForFrames(1);
    return { proxy, client };
  }

  test("open WebSocket sessions keep relaying after SIGTERM and end the drain when they close", async () => {
    const { proxy, client } = await proxyWithSession("10");
    proxy.proc.kill("SIGTERM");
    await proxy.waitForLog((line) => line.msg === "shutting down");
    client.send("still here");
    await client.waitForFrames(2);
    expect(client.frames[1]).toBe("still here");
    const closedAt = Date.now();
    client.socket.close(1000, "done");
    expect(await proxy.exited).toBe(0);
    expect(Date.now() - closedAt).toBeLessThan(2000);
    expect(proxy.lines.at(-1)).toMatchObject({ msg: "stopped", drained: true });
  });

  test("at SHUTDOWN_TIMEOUT open WebSocket sessions are closed with 1001 going away, both sides", async () => {
    const { proxy, client } = await proxyWithSession("1");
    const upstreamSession = realtime.sessions.at(-1)!;
    const signalledAt = Date.now();
    proxy.proc.kill("SIGTERM");
    const closed = await client.closed;
    expect(closed).toMatchObject({ code: 1001, reason: "going away" });
    expect(closed.atMs - signalledAt).toBeGreaterThanOrEqual(900);
    await waitFor(() => upstreamSession.closedAtMs !== undefined, 2000);
    expect(upstreamSession).toMatchObject({ closeCode: 1001, closeReason: "going away" });
    expect(await proxy.exited).toBe(0);
    expect(proxy.lines.some((line) => line.msg === "websocket session" && line.closed_by === "proxy" && line.close_code === 1001)).toBe(true);
  });

  test("SHUTDOWN_TIMEOUT bounds the drain: a longer stream is cut, and the exit is still 0", async () => {
    const proxy = await startProxy(baseEnv({ SHUTDOWN_TIMEOUT: "1" }));
    await proxy.waitForHealth();
    const stream = await fetch(`${proxy.url}/test/stream?ms=60000&interval=100`);
    const reader = stream.body!.getReader();
    await reader.read();
    // Keep reading, as a real client does: an abandoned reader can be collected, closing the connection.
    const cutAfter = (async () => {
      const startedAt = performance.now();
      try {
        while (!(await reader.read()).done);
      } catch {}
      return performance.now() - startedAt;
    })();
    const signalledAt = performance.now();
    proxy.proc.kill("SIGTERM");
    expect(await proxy.exited).toBe(0);
    const elapsed = performance.now() - signalledAt;
    expect(elapsed).toBeGreaterThan(900);
    expect(elapsed).toBeLessThan(5000);
    expect(await cutAfter).toBeGreaterThan(900);
    expect(proxy.lines.some((line) => line.msg === "shutdown timeout reached; closing open requests")).toBe(true);
    expect(proxy.lines.at(-1)).toMatchObject({ msg: "stopped", drained: false });
  });
  test("a request still waiting for its upstream's first byte at the deadline does not hold the exit", async () => {
    const proxy = await startProxy(baseEnv({ SHUTDOWN_TIMEOUT: "1" }));
    await proxy.waitForHealth();
    const waiting = fetch(`${proxy.url}/test/silent?ms=30000`).then(
      (response) => response.status,
      () => "cut",
    );
    while (upstream.received.at(-1)?.target !== "/test/silent?ms=30000") await Bun.sleep(10);
    const signalledAt = performance.now();
    proxy.proc.kill("SIGTERM");
    expect(await proxy.exited).toBe(0);
    expect(performance.now() - signalledAt).toBeLessThan(3500);
    expect(await waiting).toBe("cut");
  });
});

// ---------------------------------------------------------------- pure pieces

describe("Pure pieces", () => {
  test("requestTarget keeps the raw path and query of absolute and relative request URLs", () => {
    expect(requestTarget("http://localhost:8080/a%2Fb?x=1&x=2")).toBe("/a%2Fb?x=1&x=2");
    expect(requestTarget("http://[::1]:8080//other/x")).toBe("//other/x");
    expect(requestTarget("/relative?q")).toBe("/relative?q");
    expect(requestTarget("http://localhost")).toBe("/");
  });

  test("removeHopByHopHeaders removes the RFC 9110 set and what Connection names", () => {
    const headers = new Headers({ connection: "close, X-A", "x-a": "1", "x-b": "2", te: "trailers", "transfer-encoding": "chunked", upgrade: "websocket" });
    removeHopByHopHeaders(headers);
    expect([...headers.keys()]).toEqual(["x-b"]);
  });

  test("usageInBody reads usage in place: pretty-printed, escaped, nested and hostile shapes, the last usage and the nearest model", () => {
    const read = (text: string) => usageInBody(new TextEncoder().encode(text));
    const cases: [string, Usage | undefined][] = [
      ['{\n  "model" : "gpt-4o",\n  "usage" : {\n    "prompt_tokens" : 3 ,\n    "completion_tokens" : 4\n  }\n}', { model: "gpt-4o", tokens: [3, 4, -1, -1] }],
      ['{"model":"a","usage":{"note":"has \\"quotes\\" and {braces}","extra":[1,{"x":[2]}],"prompt_tokens":7,"completion_tokens":0,"prompt_tokens_details":{"audio_tokens":1,"cached_tokens":5}}}', { model: "a", tokens: [7, 0, 5, -1] }],
      // A usage inside content is a string, escaped; the last real key wins.
      ['{"model":"m","choices":[{"text":"\\"usage\\":{\\"prompt_tokens\\":99}"}],"usage":{"input_tokens":1,"output_tokens":2,"output_tokens_details":{"reasoning_tokens":2}}}', { model: "m", tokens: [1, 2, -1, 2] }],
      // Azure's order: the model nearest before the usage, not a model key named in an earlier object's value.
      ['{"choices":[],"created":1,"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":1,"completion_tokens":1}}', { model: "gpt-4o-2024-08-06", tokens: [1, 1, -1, -1] }],
      ['{"usage":{"prompt_tokens":1.5,"completion_tokens":2e3}}', undefined],
      ['{"usage":{"prompt_tokens":-1,"completion_tokens":2}}', { model: "", tokens: [-1, 2, -1, -1] }],
      ['{"usage":{"prompt_tokens":1,"completion_tokens":2,}}', undefined],
      ['{"usage":{"prompt_tokens":1 "completion_tokens":2}}', undefined],
      ['{"usage":{"prompt_tokens":100000001}}', undefined],
      ['{"model":"x y","usage":{"prompt_tokens":1}}', { model: "", tokens: [1, -1, -1, -1] }],
      ['{"model":"gpt-4o","usage":{"completion_tokens":3,"completion_tokens_details":{"reasoning_tokens":4}}}', { model: "gpt-4o", tokens: [-1, 3, -1, -1] }],
    ];
    for (const [text, expected] of cases) expect(read(text), text).toEqual(expected);
    // Realtime's shape (`input_token_details`), read by the same reader.
    expect(read('{"type":"response.done","response":{"usage":{"input_tokens":10,"output_tokens":2,"input_token_details":{"cached_tokens":4}}}}')).toEqual({ model: "", tokens: [10, 2, 4, -1] });
    expect(read('{"type":"response.done","response":{"usage":{"input_tokens":"10","output_tokens":null}}}')).toBeUndefined();
  });

  test("deploymentLabel names the deployment whole, whether or not it is the last one seen", () => {
    const metrics = newMetrics();
    const label = (target: string) => deploymentLabel(metrics, target);
    expect(label("/openai/models")).toBe("");
    expect(label("/openai/deployments/gpt-4o/chat/completions")).toBe("gpt-4o");
    // The last one seen must match whole: a longer name sharing its start is another deployment.
    expect(label("/openai/deployments/gpt-4o-mini/chat/completions")).toBe("gpt-4o-mini");
    expect(label("/openai/deployments/gpt-4o/chat/completions")).toBe("gpt-4o");
    expect(label("/openai/deployments/gpt-4?x=/y")).toBe("gpt-4");
    expect(label("/openai/deployments/gpt-4")).toBe("gpt-4");
    expect(label("/openai/deployments/gpt-4o?api-version=1")).toBe("gpt-4o");
    expect(label("/openai/deployments/gpt-4%20o/chat")).toBe("other");
    expect(label("/openai/deployments//chat")).toBe("other");
    expect([...metrics.deployments]).toEqual(["gpt-4o", "gpt-4o-mini", "gpt-4"]);
  });

  test("a burst is collected at every 1,000 more requests in flight, and the mark follows the count back down", () => {
    let mark = 1000;
    const step = (inFlight: number) => {
      const collected = inFlight >= mark;
      mark = nextCollectionMark(inFlight, mark);
      return collected;
    };
    expect([1, 500, 999].map(step)).toEqual([false, false, false]);
    expect(step(1000)).toBe(true);
    expect(mark).toBe(2000);
    expect([1500, 1999, 1200, 1001].map(step)).toEqual([false, false, false, false]);
    expect(step(2000)).toBe(true);
    // A count swinging by less than 2,000 under the mark never re-arms it, so steady load is never collected.
    expect([1500, 2500, 1100, 2999].map(step)).toEqual([false, false, false, false]);
    expect(mark).toBe(3000);
    // Back down to a trickle: the next burst is collected from 1,000 above it.
    expect(step(3)).toBe(false);
    expect(mark).toBe(1003);
    expect(step(1003)).toBe(true);
  });

  test("matchRoute takes the longest prefix that matches on a segment boundary", () => {
    const routes = [{ match: "/search/special" }, { match: "/search" }, { match: "" }];
    const matched = (target: string) => routes.indexOf(matchRoute(routes, target)!);
    expect(["/search", "/search/x", "/search?x=1", "/search/specialty"].map(matched)).toEqual([1, 1, 1, 1]);
    expect(["/search/special", "/search/special/y", "/search/special?z"].map(matched)).toEqual([0, 0, 0]);
    expect(["/searching", "/", "/openai/models"].map(matched)).toEqual([2, 2, 2]);
    expect(matchRoute(routes.slice(0, 2), "/other")).toBeUndefined();
  });

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

  test("parseCredential computes the SHA-256 thumbprint and puts the leaf first in the chain", () => {
    const chained = certs.chained("order");
    const credential = parseCredential(chained.issuerPem + chained.privateKeyPem + chained.certificatePem, undefined, "test.pem");
    expect(credential.thumbprintSha256).toBe(thumbprintOf(chained.certificatePem));
    expect(credential.certificateChainPem.indexOf(chained.certificatePem.trim().split("\n")[1]!)).toBe(28);
    expect(credential.subject).toBe("CN=order");
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

  test("WebSocket pieces: ws/wss base, credential query parameters and subprotocols removed, the rest kept", () => {
    expect(websocketBaseUrl("https://x.openai.azure.com/base")).toBe("wss://x.openai.azure.com/base");
    expect(websocketBaseUrl("http://127.0.0.1:9000")).toBe("ws://127.0.0.1:9000");
    expect(withoutCredentialParameters("/r?api-key=a&b=1&API-KEY=c&api%2Dkey=d&b=%2F&Authorization=Bearer%20x&c")).toBe("/r?b=1&b=%2F&c");
    expect(withoutCredentialParameters("/r?api-key=a")).toBe("/r");
    expect(withoutCredentialParameters("/r?q=%zz&api-key")).toBe("/r?q=%zz");
    expect(upstreamSubprotocols("realtime, openai-insecure-api-key.sk-1 ,openai-beta.realtime-v1,")).toEqual(["realtime", "openai-beta.realtime-v1"]);
    expect(upstreamSubprotocols(null)).toEqual([]);
  });

  test("access-line encoding: numbers as JSON writes them, milliseconds rounded to hundredths, strings escaped as JSON must", () => {
    const encoded = (encode: (buffer: Buffer, at: number) => number) => {
      const buffer = Buffer.alloc(1024, "#");
      const end = encode(buffer, 3);
      expect(buffer.subarray(0, 3).toString()).toBe("###");
      expect(String.fromCharCode(buffer[end]!)).toBe("#");
      return buffer.toString("utf8", 3, end);
    };
    for (const value of [0, 7, 10, 99, 200, 499, 1_000_001, 2 ** 40 + 3]) expect(encoded((b, at) => encodeInteger(b, at, value))).toBe(String(value));
    for (const ms of [0, 0.004, 0.005, 0.1, 0.123, 1.05, 1.5, 2, 12.3456, 99.999, 1234.5678, 600_000.126]) {
      const text = encoded((b, at) => encodeMillis(b, at, ms));
      expect(JSON.parse(text)).toBe(Math.round(ms * 100) / 100);
      expect(text).toBe(String(Math.round(ms * 100) / 100));
    }
    expect(encoded((b, at) => encodeMillis(b, at, -0.2))).toBe("0");
    for (const text of ["/openai/deployments/gpt-4o/chat/completions", "", '/a"b', "/a\\b", "/tab\there", "/nul\u0000", "/ü/✓", "/\ud800", "~\u007f"]) {
      expect(JSON.parse(encoded((b, at) => encodeJsonString(b, at, text, text.length)))).toBe(text);
    }
    expect(encoded((b, at) => encodeJsonString(b, at, "/path?query", 5))).toBe('"/path"');
    expect(encoded((b, at) => encodeJsonString(b, at, '/a"b?q', 4))).toBe('"/a\\"b"');
    expect(encoded((b, at) => encodeBytes(b, at, asciiBytes(',"name":')))).toBe(',"name":');
  });

  test("describeTokenError keeps the AADSTS code and first line, not the trace ids", () => {
    const described = describeTokenError({ errorCode: "invalid_client", errorMessage: "AADSTS700027: Client assertion failed signature validation.\r\nTrace ID: abc\r\nCorrelation ID: def" });
    expect(described).toEqual({ aadsts: "AADSTS700027", message: "AADSTS700027: Client assertion failed signature validation." });
  });
});

// ---------------------------------------------------------------- long silences

describe("Forwarding without timeouts", () => {
  test(`a response silent for ${LONG_SILENCE_MS / 1000} s before its first byte, and a stream silent as long mid-way, complete`, async () => {
    const [firstByteLate, silentMidStream] = await longSilences;
    expect(JSON.parse(firstByteLate)).toEqual({ late: true });
    expect(silentMidStream).toBe('data: {"before":"silence"}\n\ndata: {"after":"silence"}\n\n');
  }, LONG_SILENCE_MS + 30_000);

  test(`keep-alive connections idle after a forwarded request are closed after ${KEEP_ALIVE_IDLE_SECONDS} s, as after /live`, async () => {
    const connections = await idleConnections;
    for (const { target, closedAfterMs, response } of connections) {
      expect(`${target}: ${response.slice(0, 12)}`).toMatch(/: HTTP\/1\.1 (200|502)/);
      // Reaped, not cut early and not kept for good.
      expect(closedAfterMs).toBeDefined();
      expect(closedAfterMs!).toBeGreaterThan((KEEP_ALIVE_IDLE_SECONDS - 5) * 1000);
      expect(closedAfterMs!).toBeLessThan(KEEP_ALIVE_WAIT_MS);
    }
    expect(connections.filter(({ response }) => response.includes('{"late":true}'))).toHaveLength(2);
    expect(connections.filter(({ response }) => response.startsWith("HTTP/1.1 502"))).toHaveLength(2);
  }, KEEP_ALIVE_WAIT_MS + 60_000);

  test(`uploads that stall while a pool holds their bodies never take failover from others, and are closed with 408 after ${KEEP_ALIVE_IDLE_SECONDS} s, their hold released`, async () => {
    const { ordinary, heldWhileStalled, heldAfter, uploads, lines } = await stalledUploads;
    // Bytes received count, not bytes announced; bodies still arriving hold at most half the 64 MiB budget.
    expect(ordinary).toEqual({ status: 200, backend: "stall-secondary" });
    expect(heldWhileStalled).toBeGreaterThanOrEqual(16);
    expect(heldWhileStalled).toBeLessThanOrEqual(32 * 1024 * 1024);
    const closed = uploads.filter(({ response }) => response.startsWith("HTTP/1.1 408"));
    // Every one-byte upload was held, and so were the 3 MiB ones the budget took (the others stream on to one backend).
    expect(closed.filter(({ sent }) => sent === 1)).toHaveLength(16);
    expect(closed.length).toBeGreaterThanOrEqual(16 + 10);
    for (const { response, closedAfterMs } of closed) {
      expect(response).toContain('"code":"request_body_stalled"');
      expect(closedAfterMs).toBeGreaterThan((KEEP_ALIVE_IDLE_SECONDS - 1) * 1000);
      expect(closedAfterMs).toBeLessThan((KEEP_ALIVE_IDLE_SECONDS + 10) * 1000);
    }
    expect(heldAfter).toBe(0);
    expect(lines.filter((line) => line.msg === "request" && line.status === 408)).toHaveLength(closed.length);
  }, STALLED_UPLOAD_WAIT_MS + 60_000);

  test(`a WebSocket session silent for ${SILENT_SESSION_MS / 1000} s stays open and relays again`, async () => {
    expect(await silentSession).toBe("after the silence");
  }, SILENT_SESSION_MS + 30_000);
});

// ---------------------------------------------------------------- deployment

describe("Deployment artifacts", () => {
  const manifests = readdirSync(join(ROOT, "deploy/kubernetes"))
    .filter((file) => file.endsWith(".yaml"))
    // Bun.YAML.parse gives an array for a multi-document file and the document itself otherwise.
    .flatMap((file) => ([] as any[]).concat(Bun.YAML.parse(readFileSync(join(ROOT, "deploy/kubernetes", file), "utf8"))).map((doc) => ({ file, doc })));
  const deployments = manifests.filter(({ doc }) => doc.kind === "Deployment");
  // The sidecar manifests: an app container beside the proxy (gateway.yaml is the shared gateway).
  const sidecars = deployments.filter(({ doc }) => doc.spec.template.spec.containers.some((c: any) => c.name === "app"));
  const proxyOf = (doc: any) => [...(doc.spec.template.spec.initContainers ?? []), ...doc.spec.template.spec.containers].find((c: any) => c.name === "auth-proxy");
  const envOf = (container: any) => Object.fromEntries(container.env.map((e: any) => [e.name, e.value]));

  test("each manifest applies alone: every Secret and ServiceAccount a Deployment names is in its own file", () => {
    for (const { file, doc } of deployments) {
      const spec = doc.spec.template.spec;
      const secrets = (spec.volumes ?? []).flatMap((volume: any) => (volume.secret ? [volume.secret.secretName] : []));
      const configMaps = (spec.volumes ?? []).flatMap((volume: any) => (volume.configMap ? [volume.configMap.name] : []));
      const inFile = (kind: string, name: string) => manifests.some((other) => other.file === file && other.doc.kind === kind && other.doc.metadata.name === name);
      for (const name of secrets) expect(inFile("Secret", name), `${file}: Secret ${name}`).toBe(true);
      for (const name of configMaps) expect(inFile("ConfigMap", name), `${file}: ConfigMap ${name}`).toBe(true);
      if (spec.serviceAccountName) expect(inFile("ServiceAccount", spec.serviceAccountName), `${file}: ServiceAccount`).toBe(true);
    }
  });

  test("the app's environment works for LiteLLM and the OpenAI SDKs alike, and keeps localhost off any outbound proxy", () => {
    for (const { file, doc } of sidecars) {
      const app = doc.spec.template.spec.containers.find((container: any) => container.name === "app");
      expect(Object.keys(envOf(app)).sort(), file).toEqual(
        ["AZURE_API_BASE", "AZURE_API_KEY", "AZURE_API_VERSION", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "NO_PROXY", "OPENAI_API_VERSION"].sort(),
      );
      expect(envOf(app).AZURE_OPENAI_ENDPOINT).toBe("http://127.0.0.1:8080");
    }
  });

  test("every Kubernetes manifest validates against the Kubernetes OpenAPI schemas", () => {
    expect(deployments.map(({ file }) => file).sort()).toEqual(["classic-sidecar.yaml", "gateway.yaml", "native-sidecar.yaml", "workload-identity.yaml"]);
    const models: Record<string, new (doc: any) => { validate(): void }> = { Deployment, Secret, ServiceAccount, ConfigMap, Service, PodDisruptionBudget, HorizontalPodAutoscaler, NetworkPolicy };
    for (const { file, doc } of manifests) {
      const model = models[doc.kind] === undefined ? undefined : new models[doc.kind]!(doc);
      expect(model, `${file}: ${doc.kind}`).toBeDefined();
      model!.validate();
    }
    expect(() => new Deployment({ ...deployments[0]!.doc, spec: { ...deployments[0]!.doc.spec, replicas: "two" } }).validate()).toThrow();
  });

  test("the native sidecar is an init container with restartPolicy Always and a startup probe that waits for a token", () => {
    const native = deployments.find(({ file }) => file === "native-sidecar.yaml")!.doc;
    const proxy = native.spec.template.spec.initContainers.find((c: any) => c.name === "auth-proxy");
    expect(proxy.restartPolicy).toBe("Always");
    expect(proxy.startupProbe.httpGet).toEqual({ path: "/health", port: "admin" });
  });

  test("the proxy runs locked down, bound to loopback beside its app (the gateway: the pod IP), probed on the admin port, and drains before SIGKILL", () => {
    for (const { file, doc } of deployments) {
      const pod = doc.spec.template.spec;
      expect(pod.securityContext).toMatchObject({ runAsNonRoot: true, runAsUser: 65532, seccompProfile: { type: "RuntimeDefault" } });
      const proxy = proxyOf(doc);
      expect(proxy.securityContext).toMatchObject({ runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ["ALL"] } });
      expect(proxy.resources.requests.memory).toBeDefined();
      expect(proxy.resources.limits.memory).toBeDefined();
      const env = envOf(proxy);
      expect(env.HOST).toBe(file === "gateway.yaml" ? "0.0.0.0" : "127.0.0.1");
      // kubelet's HTTP probes reach the pod IP, never 127.0.0.1: every probe goes to the admin listener.
      for (const probe of [proxy.readinessProbe, proxy.livenessProbe, proxy.startupProbe]) expect(probe.httpGet.port).toBe("admin");
      expect(env.ADMIN_HOST ?? "0.0.0.0").toBe("0.0.0.0");
      expect(pod.terminationGracePeriodSeconds).toBeGreaterThan(Number(env.SHUTDOWN_TIMEOUT ?? 25) + (proxy.lifecycle?.preStop?.sleep?.seconds ?? 0));
      for (const mount of proxy.volumeMounts ?? []) expect(mount.readOnly).toBe(true);
    }
  });

  test("the shared gateway: 2 replicas spread over nodes and zones, a Service, a PDB, a CPU autoscaler, a NetworkPolicy for labelled callers, caller keys from a Secret and a routes file the proxy accepts", () => {
    const docs = manifests.filter(({ file }) => file === "gateway.yaml").map(({ doc }) => doc);
    const of = (kind: string) => docs.find((doc) => doc.kind === kind);
    const deployment = of("Deployment");
    const pod = deployment.spec.template;
    const selector = deployment.spec.selector.matchLabels;
    expect(deployment.spec.replicas).toBe(2);
    expect(pod.spec.topologySpreadConstraints.map((c: any) => c.topologyKey).sort()).toEqual(["kubernetes.io/hostname", "topology.kubernetes.io/zone"]);
    for (const constraint of pod.spec.topologySpreadConstraints) expect(constraint.labelSelector.matchLabels).toEqual(selector);
    // Workload identity: the annotated ServiceAccount and the webhook's label.
    expect(pod.spec.serviceAccountName).toBe(of("ServiceAccount").metadata.name);
    expect(pod.metadata.labels["azure.workload.identity/use"]).toBe("true");
    expect(of("Service").spec.selector).toEqual(selector);
    expect(of("Service").spec.ports[0].targetPort).toBe("http");
    expect(of("PodDisruptionBudget").spec).toMatchObject({ minAvailable: 1, selector: { matchLabels: selector } });
    const autoscaler = of("HorizontalPodAutoscaler");
    expect(autoscaler.spec.scaleTargetRef).toEqual({ apiVersion: "apps/v1", kind: "Deployment", name: deployment.metadata.name });
    expect(autoscaler.spec.minReplicas).toBe(2);
    expect(autoscaler.spec.metrics[0].resource.name).toBe("cpu");
    const proxy = proxyOf(deployment);
    expect(proxy.resources.requests.cpu).toBeDefined(); // utilization is measured against the request
    // Only labelled callers reach the proxy's port; the admin port only Prometheus.
    const policy = of("NetworkPolicy");
    expect(policy.spec.podSelector.matchLabels).toEqual(selector);
    expect(policy.spec.ingress.find((rule: any) => rule.ports[0].port === "http").from).toEqual([{ namespaceSelector: {}, podSelector: { matchLabels: { "auth-proxy-client": "true" } } }]);
    expect(policy.spec.ingress.every((rule: any) => rule.from.every((peer: any) => peer.podSelector?.matchLabels))).toBe(true);
    // The keys file and the routes file are where the Secret and the ConfigMap are mounted.
    const env = envOf(proxy);
    const mountOf = (volume: string) => proxy.volumeMounts.find((mount: any) => mount.name === volume).mountPath;
    const volumeOf = (predicate: (volume: any) => boolean) => pod.spec.volumes.find(predicate).name;
    const keysVolume = volumeOf((volume) => volume.secret?.secretName === of("Secret").metadata.name);
    const routesVolume = volumeOf((volume) => volume.configMap?.name === of("ConfigMap").metadata.name);
    expect(env.PROXY_API_KEYS_FILE).toBe(`${mountOf(keysVolume)}/${Object.keys(of("Secret").stringData)[0]}`);
    expect(env.AUTH_PROXY_ROUTES).toBe(`${mountOf(routesVolume)}/routes.yaml`);
    const { routes, faults } = parseRoutes(of("ConfigMap").data["routes.yaml"], "https://cognitiveservices.azure.com/.default");
    expect(faults).toEqual([]);
    expect(routes.map((route) => route.prefix)).toEqual(["/search", "/"]);
    expect(env.API_BASE_URL).toBeUndefined();
  });

  test("the workload-identity variant: an annotated ServiceAccount, the webhook's pod label, no certificate, and the webhook's variables choose the mode", () => {
    const docs = manifests.filter(({ file }) => file === "workload-identity.yaml").map(({ doc }) => doc);
    const serviceAccount = docs.find((doc) => doc.kind === "ServiceAccount");
    const deployment = docs.find((doc) => doc.kind === "Deployment");
    const pod = deployment.spec.template;
    expect(serviceAccount.metadata.annotations["azure.workload.identity/client-id"]).toMatch(/^[0-9a-f-]{36}$/);
    expect(pod.spec.serviceAccountName).toBe(serviceAccount.metadata.name);
    expect(pod.metadata.labels["azure.workload.identity/use"]).toBe("true");
    // Only the proxy gets the token: the app container is skipped by the webhook.
    expect(pod.metadata.annotations["azure.workload.identity/skip-containers"]).toBe("app");
    expect(pod.spec.containers.map((c: any) => c.name)).toContain("app");
    expect(pod.spec.volumes ?? []).toEqual([]);
    const proxy = proxyOf(deployment);
    expect(proxy.restartPolicy).toBe("Always");
    const env = envOf(proxy);
    expect(env.AZURE_CERTIFICATE_PATH).toBeUndefined();
    // What the webhook injects, its authority host with the trailing slash it uses.
    const injected = {
      AZURE_CLIENT_ID: serviceAccount.metadata.annotations["azure.workload.identity/client-id"],
      AZURE_TENANT_ID: "11111111-2222-3333-4444-555555555555",
      AZURE_AUTHORITY_HOST: "https://login.microsoftonline.com/",
      AZURE_FEDERATED_TOKEN_FILE: "/var/run/secrets/azure/tokens/azure-identity-token",
    };
    const { config, errors } = loadConfig({ ...env, ...injected });
    expect(errors).toEqual([]);
    expect(config).toMatchObject({ authMode: "workload-identity", authModeReason: "AZURE_AUTH_MODE=workload-identity", authorityHost: "https://login.microsoftonline.com", federatedTokenFile: injected.AZURE_FEDERATED_TOKEN_FILE });
  });

  test("the PrometheusRule's groups pass promtool check rules, and promtool test rules proves each alert fires and stays quiet and the tokens-per-minute rule records", async () => {
    const rule = Bun.YAML.parse(readFileSync(join(ROOT, "deploy/monitoring/prometheus-rule.yaml"), "utf8")) as any;
    expect(rule).toMatchObject({ apiVersion: "monitoring.coreos.com/v1", kind: "PrometheusRule" });
    const alerts = rule.spec.groups.flatMap((group: any) => group.rules.filter((r: any) => r.alert).map((r: any) => r.alert));
    const records = rule.spec.groups.flatMap((group: any) => group.rules.filter((r: any) => r.record).map((r: any) => r.record));
    expect(records).toEqual(["job_deployment_model_type:auth_proxy_model_tokens:per_minute_rate5m"]);
    expect(alerts).toEqual(["AuthProxyNoToken", "AuthProxyTokenRefreshFailing", "AuthProxyCertificateExpiringSoon", "AuthProxyUpstream5xxRatio", "AuthProxyUpstreamErrors", "AuthProxyBackendResting"]);
    const dir = join(certs.dir, "rules");
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "rules.yaml"), JSON.stringify({ groups: rule.spec.groups }));
    writeFileSync(join(dir, "alerts.test.yaml"), readFileSync(join(ROOT, "deploy/monitoring/alerts.test.yaml")));
    const checked = await promtool(["check", "rules", join(dir, "rules.yaml")]);
    expect(checked.output).toContain("SUCCESS: 7 rules found");
    expect(checked.exitCode).toBe(0);
    const tested = await promtool(["test", "rules", join(dir, "alerts.test.yaml")]);
    expect(tested.output).toContain("SUCCESS");
    expect(tested.exitCode).toBe(0);
    // Each test group names an alert that fires in it: none is tested only for silence.
    const unitTests = Bun.YAML.parse(readFileSync(join(ROOT, "deploy/monitoring/alerts.test.yaml"), "utf8")) as any;
    const firing = new Set(unitTests.tests.flatMap((t: any) => (t.alert_rule_test ?? []).filter((a: any) => a.exp_alerts.length > 0).map((a: any) => a.alertname)));
    expect([...firing].sort()).toEqual([...alerts].sort());
    const recorded = new Set(unitTests.tests.flatMap((t: any) => (t.promql_expr_test ?? []).map((e: any) => e.expr)));
    expect([...recorded]).toEqual(records);
  });

  test("the release workflow validates against GitHub's workflow schema and pushes both architectures with provenance and an SBOM, and the binaries with SHA-256 sums", () => {
    const text = readFileSync(join(ROOT, ".github/workflows/release.yml"), "utf8");
    expect(validateWorkflow(text).errors).toEqual([]);
    // The validator can fail: a job without steps' list is refused.
    expect(validateWorkflow("on: push\njobs:\n  x:\n    runs-on: 5\n    steps: nope\n").errors.length).toBeGreaterThan(0);
    const workflow = Bun.YAML.parse(text) as any;
    expect(workflow.on.push.tags).toEqual(["v*"]);
    const pushes = workflow.jobs.image.steps.filter((step: any) => String(step.uses).startsWith("docker/build-push-action"));
    expect(pushes.map((step: any) => step.with.target ?? "distroless")).toEqual(["distroless", "scratch"]);
    for (const step of pushes) expect(step.with).toMatchObject({ platforms: "linux/amd64,linux/arm64", push: true, provenance: "mode=max", sbom: true });
    const binaries = workflow.jobs.binaries.steps.map((step: any) => step.run ?? "").join("\n");
    expect(binaries).toContain("make build");
    expect(binaries).toContain("sha256sum auth-proxy-linux-x64 auth-proxy-linux-arm64 > SHA256SUMS");
  });

  test("the PodMonitor scrapes /metrics on the admin port the manifests name", () => {
    const monitor = Bun.YAML.parse(readFileSync(join(ROOT, "deploy/monitoring/pod-monitor.yaml"), "utf8")) as any;
    expect(monitor.kind).toBe("PodMonitor");
    expect(monitor.spec.podMetricsEndpoints).toEqual([{ port: "admin", path: "/metrics", interval: "30s" }]);
    // Every manifest's pods are selected, the classic sidecar's too.
    for (const { file, doc } of deployments) {
      const labels = doc.spec.template.metadata.labels;
      for (const [key, value] of Object.entries(monitor.spec.selector.matchLabels)) expect(labels[key], file).toBe(value);
    }
  });

  test("the Dockerfile builds with the pinned Bun, the shared build script and rootfs layout, and runs as uid 65532", () => {
    const dockerfile = readFileSync(join(ROOT, "Dockerfile"), "utf8");
    expect(dockerfile).toContain(`ARG BUN_IMAGE=oven/bun:${packageJson.devDependencies.bun}-debian`);
    expect(dockerfile).toContain("bun install --frozen-lockfile");
    expect(dockerfile).toContain("bun run typecheck");
    expect(dockerfile).toContain("bun run build --target=");
    expect(dockerfile).toContain("sh /rootfs.sh /out/auth-proxy /rootfs");
    const stages = dockerfile.split(/^FROM /m).slice(1);
    const finals = stages.filter((stage) => /^(scratch|\$\{DISTROLESS_IMAGE\})/.test(stage));
    expect(finals).toHaveLength(2);
    for (const stage of finals) {
      expect(stage).toContain("USER 65532:65532");
      expect(stage).toContain("EXPOSE 8080");
      expect(stage).toContain('HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["/auth-proxy", "--healthcheck"]');
      expect(stage).toContain('ENTRYPOINT ["/auth-proxy"]');
      expect(stage).toContain("org.opencontainers.image.revision");
    }
    expect(stages.at(-1)).toStartWith("${DISTROLESS_IMAGE} AS distroless"); // the default target
  });

  test("docker-compose.yml mounts the certificate read-only and publishes on loopback only", () => {
    const compose = Bun.YAML.parse(readFileSync(join(ROOT, "docker-compose.yml"), "utf8")) as any;
    const service = compose.services["auth-proxy"];
    expect(service.volumes).toEqual(["./certs:/certs:ro"]);
    expect(service.read_only).toBe(true);
    expect(service.ports).toEqual(["127.0.0.1:8080:8080"]);
    // The build passes the revision, and the certificate folder and .env stay out of git.
    expect(service.build.args.GIT_COMMIT).toBe("${GIT_COMMIT:-unknown}");
    const ignored = readFileSync(join(ROOT, ".gitignore"), "utf8").split("\n");
    expect(ignored).toContain("certs/");
    expect(ignored).toContain(".env");
  });
});

// ---------------------------------------------------------------- documentation

describe("Documentation", () => {
  /** The text of a README section: from its heading to the next heading of the same or a higher level. */
  function section(markdown: string, heading: string): string {
    const start = markdown.indexOf(`\n${heading}`);
    expect(start, heading).toBeGreaterThan(-1);
    const level = heading.split(" ")[0]!;
    const next = markdown.slice(start + heading.length + 1).search(new RegExp(`\\n#{1,${level.length}} `));
    return markdown.slice(start, next === -1 ? undefined : start + heading.length + 1 + next);
  }

  test("measured figures live in bench/RESULTS.md: what the README's Performance and Known limits quote is there, the manifests quote none", () => {
    const results = readFileSync(join(ROOT, "bench/RESULTS.md"), "utf8");
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const measured = /\d[\d,.]*\s?(MB|ms|µs|req\/s|×)(?![\w/])/g;
    let quoted = 0;
    for (const heading of ["## Performance", "### Known limits"]) {
      for (const [figure] of section(readme, heading).matchAll(measured)) {
        quoted += 1;
        expect(results, `README ${heading} quotes ${figure}`).toContain(figure);
      }
    }
    expect(quoted).toBeGreaterThan(0); // the check can fail: the Known limits quote RESULTS' figures
    for (const file of readdirSync(join(ROOT, "deploy/kubernetes"))) {
      const text = readFileSync(join(ROOT, "deploy/kubernetes", file), "utf8");
      expect(text.match(/\d[\d,.]*\s?(MB|req\/s)\b/g), file).toBeNull();
    }
  });

  test("LICENSE says what package.json and the image labels say (MIT); a CHANGELOG exists", () => {
    expect(packageJson.license).toBe("MIT");
    expect(readFileSync(join(ROOT, "LICENSE"), "utf8")).toStartWith("MIT License");
    expect(readFileSync(join(ROOT, "Dockerfile"), "utf8")).toContain('org.opencontainers.image.licenses="MIT"');
    expect(readFileSync(join(ROOT, "CHANGELOG.md"), "utf8")).toContain("## Unreleased");
  });
});

// ---------------------------------------------------------------- secrets

describe("Secrets", () => {
  test("no token, client assertion, federated token, client secret, private key or password appears in any output or proxy response", () => {
    const output = allOutput.join("") + proxyBodies.join("\n");
    expect(output.length).toBeGreaterThan(1000);
    expect(entra.issued.size).toBeGreaterThan(5);
    for (const token of entra.issued.keys()) expect(output).not.toContain(token);
    expect(entra.assertions.length).toBeGreaterThan(5);
    for (const assertion of entra.assertions) expect(output).not.toContain(assertion.split(".")[2]!);
    // Every private key this run generated (app, rotation, PKCS#1, encrypted, SNI, server), line by line.
    const keyFiles = readdirSync(certs.dir).filter((file) => file.endsWith(".key"));
    expect(keyFiles.length).toBeGreaterThan(5);
    for (const file of keyFiles) {
      for (const line of certs.read(file).split("\n").filter((text) => text.length > 40)) expect(output).not.toContain(line);
    }
    expect(output).not.toContain(PASSWORD);
    expect(output).not.toContain("Bearer fake-at-");
    // Client secrets (the right ones and the wrong one) and managed identity endpoint secrets.
    expect(entra.clientSecrets.length).toBeGreaterThan(3);
    for (const secret of [...entra.clientSecrets, CLIENT_SECRET, ROTATED_SECRET, ...identityHeaders]) expect(output).not.toContain(secret);
    // Federated tokens (service account tokens): whole, and their signatures.
    const federated = entra.assertions.filter((assertion) => String(JSON.parse(Buffer.from(assertion.split(".")[1]!, "base64url").toString()).iss).startsWith("https://oidc."));
    expect(federated.length).toBeGreaterThan(3);
    for (const token of federated) expect(output).not.toContain(token.split(".")[2]!);
    // Keys WebSocket clients carried in the query and the subprotocols.
    for (const clientKey of ["sk-query-secret", "sk-proto-secret", "placeholder-api-key", "caller-key-one-3f9a", "caller-key-two-77c1", "old-caller-key", "new-caller-key"]) expect(output).not.toContain(clientKey);
  });
});
