/**
 * Identities (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/identity.ts called directly.
 */
import { describe, expect, test } from "bun:test";
import { renameSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";


import { MIN_TOKEN_REQUEST_INTERVAL_MS } from "../proxy.ts";
import { chooseAuthMode, loadConfig } from "../src/config.ts";
import { describeTokenError, federatedCredentialHint } from "../src/identity.ts";
import { FakeManagedIdentityEndpoint, FakeOidcIssuer } from "../test/fakes.ts";
import { freePort, type LogLine, spawnProxy, startProxy, type ProxyProcess } from "../test/harness.ts";
import { scrape, valueOf } from "../test/prometheus.ts";
import { appCertificate, baseEnv, certs, CLIENT_ID, CLIENT_SECRET, describeSecrets, entra, identityHeaders, lastReceived, readJson, ROTATED_SECRET, thumbprintOf, useSuite } from "../test/suite.ts";
useSuite();

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
      expect(missing({ AZURE_FEDERATED_TOKEN_FILE: "/t" })).toStartWith("Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, API_BASE_URL (or AUTH_PROXY_ROUTES) (workload-identity mode: AZURE_FEDERATED_TOKEN_FILE is set); the workload identity webhook injects");
      // Explicit workload identity on a pod the webhook did not mutate: the line says what mutates it.
      expect(missing({ AZURE_AUTH_MODE: "workload-identity", API_BASE_URL: "https://r.openai.azure.com" })).toBe(
        'Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE (workload-identity mode: AZURE_AUTH_MODE=workload-identity); the workload identity webhook injects AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE into pods labelled azure.workload.identity/use: "true" whose ServiceAccount has the azure.workload.identity/client-id annotation',
      );
      expect(missing({ AZURE_AUTH_MODE: "client-secret" })).toBe("Missing required Azure AD configuration: AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET (or AZURE_CLIENT_SECRET_FILE), API_BASE_URL (or AUTH_PROXY_ROUTES) (client-secret mode: AZURE_AUTH_MODE=client-secret)");
      expect(missing({ AZURE_AUTH_MODE: "managed-identity" })).toBe("Missing required Azure AD configuration: API_BASE_URL (or AUTH_PROXY_ROUTES) (managed-identity mode: AZURE_AUTH_MODE=managed-identity)");
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

describe("Pure pieces", () => {
  test("describeTokenError keeps the AADSTS code and first line, not the trace ids", () => {
    const described = describeTokenError({ errorCode: "invalid_client", errorMessage: "AADSTS700027: Client assertion failed signature validation.\r\nTrace ID: abc\r\nCorrelation ID: def" });
    expect(described).toEqual({ aadsts: "AADSTS700027", message: "AADSTS700027: Client assertion failed signature validation." });
  });
});

describeSecrets({ clientSecrets: 4, federatedTokens: 4 });
