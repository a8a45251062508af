/**
 * What every test file of the suite shares: the fake Entra ID over HTTPS
 * (verifying client assertions) and the fake Azure OpenAI and Realtime
 * upstreams, started fresh for each file by `useSuite()`, the environment
 * that points a proxy at them, small helpers, and the check, at each
 * file's end, that no secret reached any output or proxy response.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash, X509Certificate } from "node:crypto";
import { existsSync, readdirSync, rmSync } from "node:fs";
import { CertificateFactory, type ClientCertificate } from "./certificates.ts";
import { FakeAzureOpenAI, FakeEntraId, FakeRealtime } from "./fakes.ts";
import { allOutput, stopAllProxies } from "./harness.ts";
import type { TestSocket } from "./websocket.ts";

export const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
export const PASSWORD = "correct horse battery staple";
export const CLIENT_SECRET = "Zq8~Xf2.secret-value-for-tests~9d2fK1";
export const ROTATED_SECRET = "Lm3~Yt7.rotated-secret-value~4c8eJ0";
export const OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default";
export const SEARCH_SCOPE = "https://search.azure.com/.default";
/** App Service's per-instance IDENTITY_HEADER values the managed identity tests used: secrets too. */
export const identityHeaders: string[] = [];
/** Bodies the proxy itself answered with (errors, health): checked for secrets at the end. */
export const proxyBodies: string[] = [];

/** Made at import, as describe-time tables name its files; made anew for a file run after another removed it. */
export let certs = new CertificateFactory();
export let tls: ReturnType<CertificateFactory["serverTls"]>;
export let entra: FakeEntraId;
export let upstream: FakeAzureOpenAI;
export let realtime: FakeRealtime;
export let appCertificate: ClientCertificate;

/** Starts the fakes before the file's tests and stops them, and every proxy the file started, after. */
export function useSuite(): void {
  beforeAll(async () => {
    if (!existsSync(certs.dir)) certs = new CertificateFactory();
    tls = certs.serverTls();
    entra = new FakeEntraId(tls).start();
    appCertificate = certs.client("app");
    resetEntra();
    upstream = await new FakeAzureOpenAI(entra).start();
    realtime = new FakeRealtime(entra).start();
  });
  afterAll(async () => {
    await stopAllProxies();
    entra.stop();
    await upstream.stop();
    realtime.stop();
    rmSync(certs.dir, { recursive: true, force: true });
  });
}

export function baseEnv(overrides: Record<string, string | undefined> = {}): Record<string, string | undefined> {
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

export async function readJson(response: Response): Promise<any> {
  const text = await response.text();
  proxyBodies.push(text);
  return JSON.parse(text);
}

/** The SHA-256 thumbprint as Entra ID shows it, computed here independently of the proxy's code. */
export function thumbprintOf(certificatePem: string): string {
  return new X509Certificate(certificatePem).fingerprint256.replace(/:/g, "");
}

export function lastReceived() {
  return upstream.received.at(-1)!;
}

/** Restores the fake Entra ID to a healthy, long-lived default after a test changed it. */
export function resetEntra(): void {
  entra.outage = undefined;
  entra.releaseHanging();
  entra.tokenLifetimeSeconds = 3600;
  entra.refreshInSeconds = undefined;
  entra.register({ clientId: CLIENT_ID, certificates: [appCertificate.certificatePem] });
}

export function sha256(data: string | Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * The error `promise` rejects with; fails the test if it resolves. Not
 * `expect(promise).rejects`: on Bun 1.4.5 it waits inside the event loop,
 * and after it the test process read no more of a proxy's stdout (a refused
 * WebSocket test then waited 15 s for lines the proxy had written).
 */
export async function rejection(promise: Promise<unknown>): Promise<unknown> {
  const outcome = await promise.then(
    () => ({ resolved: true as const }),
    (error: unknown) => ({ resolved: false as const, error }),
  );
  if (outcome.resolved) throw new Error("expected a rejection, but the promise resolved");
  return outcome.error;
}

export async function waitFor(condition: () => boolean | Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await Bun.sleep(5);
  }
}

export async function waitForFrame(client: TestSocket, predicate: (frame: string | Buffer) => boolean, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const index = client.frames.findIndex(predicate);
    if (index !== -1) return index;
    if (Date.now() > deadline) throw new Error(`frame not seen within ${timeoutMs} ms (${client.frames.length} frames)`);
    await Bun.sleep(20);
  }
}

export const METRIC_FAMILIES = [
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

/** How much of each kind of secret a file's tests must have made, so its check cannot pass by having nothing to look at. */
export interface SecretsMade {
  tokens?: number;
  assertions?: number;
  privateKeys?: number;
  clientSecrets?: number;
  federatedTokens?: number;
}

/**
 * The file's last test: no token, client assertion, federated token, client
 * secret, private key or password appears in any output or proxy response
 * of the file's proxies.
 */
export function describeSecrets(made: SecretsMade = {}): void {
  describe("Secrets", () => {
    test("no token, client assertion, federated token, client secret, private key or password appears in any output or proxy response", () => {
      const output = allOutput.join("") + proxyBodies.join("\n");
      expect(output.length).toBeGreaterThan(1000);
      expect(entra.issued.size).toBeGreaterThan(made.tokens ?? 0);
      for (const token of entra.issued.keys()) expect(output).not.toContain(token);
      expect(entra.assertions.length).toBeGreaterThan(made.assertions ?? 0);
      for (const assertion of entra.assertions) expect(output).not.toContain(assertion.split(".")[2]!);
      // Every private key this file generated (app, rotation, PKCS#1, encrypted, SNI, server), line by line.
      const keyFiles = readdirSync(certs.dir).filter((file) => file.endsWith(".key"));
      expect(keyFiles.length).toBeGreaterThan(made.privateKeys ?? 1);
      for (const file of keyFiles) {
        for (const line of certs.read(file).split("\n").filter((text) => text.length > 40)) expect(output).not.toContain(line);
      }
      expect(output).not.toContain(PASSWORD);
      expect(output).not.toContain("Bearer fake-at-");
      // Client secrets (the right ones and the wrong one) and managed identity endpoint secrets.
      expect(entra.clientSecrets.length).toBeGreaterThanOrEqual(made.clientSecrets ?? 0);
      for (const secret of [...entra.clientSecrets, CLIENT_SECRET, ROTATED_SECRET, ...identityHeaders]) expect(output).not.toContain(secret);
      // Federated tokens (service account tokens): whole, and their signatures.
      const federated = entra.assertions.filter((assertion) => String(JSON.parse(Buffer.from(assertion.split(".")[1]!, "base64url").toString()).iss).startsWith("https://oidc."));
      expect(federated.length).toBeGreaterThanOrEqual(made.federatedTokens ?? 0);
      for (const token of federated) expect(output).not.toContain(token.split(".")[2]!);
      // Keys WebSocket clients carried in the query and the subprotocols.
      for (const clientKey of ["sk-query-secret", "sk-proto-secret", "placeholder-api-key", "caller-key-one-3f9a", "caller-key-two-77c1", "old-caller-key", "new-caller-key"]) expect(output).not.toContain(clientKey);
    });
  });
}
