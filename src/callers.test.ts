/**
 * Inbound caller keys (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/callers.ts called directly.
 */
import { describe, expect, test } from "bun:test";
import { createHash, createHmac, generateKeyPairSync } from "node:crypto";
import { renameSync, writeFileSync } from "node:fs";
import { spawnProxy, startProxy } from "../test/harness.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import { rawUpgrade, TestSocket } from "../test/websocket.ts";
import { baseEnv, certs, describeSecrets, entra, lastReceived, proxyBodies, readJson, realtime, upstream, useSuite } from "../test/suite.ts";
useSuite();

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
    // The session line names its caller: the key's hash prefix, never the key.
    const session = await proxy.waitForLog((line) => line.msg === "websocket session");
    expect([createHash("sha256").update(KEYS[0]!).digest("hex").slice(0, 8), createHash("sha256").update(KEYS[1]!).digest("hex").slice(0, 8)]).toContain(session.caller as string);
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

describe("Named callers", () => {
  const AUDIENCE = "api://auth-proxy-gateway";
  const RAG_APP = "5f1c0000-0000-4000-8000-0000000000aa";
  const OTHER_APP = "5f1c0000-0000-4000-8000-0000000000bb";
  const KEY_HASHED = "chat-frontend-key-hashed-9d1e";
  const KEY_FROM_ENV = "chat-frontend-key-from-env-4b7c";
  const KEY_PLAIN = "batch-key-plain-0c22";
  const callersFile = () =>
    certs.write(
      "callers.yaml",
      `callers:
  - name: chat-frontend
    keys:
      - sha256:${createHash("sha256").update(KEY_HASHED).digest("hex")}
      - \${CHAT_FRONTEND_KEY}
    routes: [/openai/deployments/gpt-4o]
  - name: rag-indexer
    entra:
      tenant: ${entra.tenantId}
      app_ids: [${RAG_APP}]
    routes: [/search, /openai/deployments/text-embedding-3-large]
  - name: batch
    keys: [${KEY_PLAIN}]
`,
    );
  const callersEnv = (overrides: Record<string, string | undefined> = {}) => baseEnv({ AUTH_PROXY_CALLERS: callersFile(), AUTH_PROXY_AUDIENCE: AUDIENCE, CHAT_FRONTEND_KEY: KEY_FROM_ENV, ...overrides });
  const CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
  const EMBEDDINGS = "/openai/deployments/text-embedding-3-large/embeddings?api-version=2024-10-21";

  test("each kind of credential names its caller: a key by hash, by variable or as itself, an Entra ID token v2 or v1; the caller labels requests, durations, tokens and the access line; no credential is forwarded or logged", async () => {
    const proxy = await startProxy(callersEnv());
    await proxy.waitForHealth();
    await proxy.waitForLog((line) => line.msg === "caller token signing keys fetched");
    const v2 = entra.mintCallerToken({ appId: RAG_APP, audience: AUDIENCE });
    const v1 = entra.mintCallerToken({ appId: RAG_APP, audience: AUDIENCE, version: 1 });
    const asked: [Record<string, string>, string, string][] = [
      [{ "api-key": KEY_HASHED }, CHAT, "chat-frontend"],
      [{ authorization: `Bearer ${KEY_FROM_ENV}` }, CHAT, "chat-frontend"],
      [{ "api-key": KEY_PLAIN }, "/anything/at/all", "batch"],
      [{ authorization: `Bearer ${v2}` }, EMBEDDINGS, "rag-indexer"],
      [{ authorization: `Bearer ${v1}` }, "/search/indexes/docs/docs?search=x", "rag-indexer"],
    ];
    for (const [headers, target, caller] of asked) {
      const response = await fetch(`${proxy.url}${target}`, { method: target === CHAT ? "POST" : "GET", headers, body: target === CHAT ? JSON.stringify({ messages: [] }) : undefined });
      expect(response.status, caller).toBe(200);
      await response.text();
      const received = lastReceived();
      expect(received.tokenValid).toBe(true);
      expect(received.headers["api-key"]).toBeUndefined();
      const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === target.split("?")[0] && entry.caller === caller);
      expect(line.status).toBe(200);
    }
    const { text, samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "chat-frontend", deployment: "gpt-4o", code: "200" })).toBe(2);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "rag-indexer", code: "200" })).toBe(2);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "batch", code: "200" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_request_duration_seconds_count", { caller: "chat-frontend", deployment: "gpt-4o" })).toBe(2);
    expect(valueOf(samples, "auth_proxy_model_tokens_total", { caller: "chat-frontend", deployment: "gpt-4o", type: "input" })).toBeGreaterThan(0);
    expect(samples.filter((sample) => sample.name === "auth_proxy_requests_total").every((sample) => sample.labels.caller !== undefined)).toBe(true);
    expect((await promtool(["check", "metrics"], text)).exitCode).toBe(0);
    const output = proxy.lines.map((line) => JSON.stringify(line)).join("\n") + text;
    for (const secret of [KEY_HASHED, KEY_FROM_ENV, KEY_PLAIN, v2, v1, v2.split(".")[2]!]) expect(output).not.toContain(secret);
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({ callers: ["chat-frontend", "rag-indexer", "batch"] });
    await proxy.stop();
  });

  test("refusals: no credential, an unknown key, and each fault of a token, 401 with its code and reason; a path the caller may not use, 403; nothing forwarded; counted by caller and reason", async () => {
    const proxy = await startProxy(callersEnv());
    await proxy.waitForHealth();
    await proxy.waitForLog((line) => line.msg === "caller token signing keys fetched");
    const now = Math.floor(Date.now() / 1000);
    const token = (options: Partial<Parameters<typeof entra.mintCallerToken>[0]> = {}) => entra.mintCallerToken({ appId: RAG_APP, audience: AUDIENCE, ...options });
    const valid = token();
    const [validHeader, , validSignature] = valid.split(".");
    const tampered = `${validHeader}.${Buffer.from(JSON.stringify({ aud: AUDIENCE, iss: `${entra.authorityHost}/${entra.tenantId}/v2.0`, azp: RAG_APP, exp: now + 99_999 })).toString("base64url")}.${validSignature}`;
    const unsigned = `${Buffer.from(JSON.stringify({ alg: "none", typ: "JWT" })).toString("base64url")}.${valid.split(".")[1]}.`;
    const hmac = (() => {
      const head = `${Buffer.from(JSON.stringify({ alg: "HS256", typ: "JWT", kid: "x" })).toString("base64url")}.${valid.split(".")[1]}`;
      return `${head}.${createHmac("sha256", "guessable").update(head).digest("base64url")}`;
    })();
    const strangerKey = generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey;
    const cases: [string, Record<string, string>, number, string, string][] = [
      ["no credential", {}, 401, "missing_credentials", "requires a caller credential"],
      ["an unknown key", { "api-key": "nobody-has-this-key" }, 401, "invalid_api_key", "does not know the key"],
      ["an expired token", { authorization: `Bearer ${token({ claims: { exp: now - 400 } })}` }, 401, "invalid_token", "expired"],
      ["a token not yet valid", { authorization: `Bearer ${token({ claims: { nbf: now + 400 } })}` }, 401, "invalid_token", "not yet valid"],
      ["a token for another audience", { authorization: `Bearer ${token({ audience: "https://cognitiveservices.azure.com" })}` }, 401, "invalid_token", "wrong audience"],
      ["a token from another tenant", { authorization: `Bearer ${token({ claims: { iss: "https://sts.windows.net/99999999-0000-4000-8000-000000000000/" } })}` }, 401, "invalid_token", "wrong tenant"],
      ["a token of an app no caller lists", { authorization: `Bearer ${token({ appId: OTHER_APP })}` }, 401, "invalid_token", "unknown app"],
      ["a tampered token", { authorization: `Bearer ${tampered}` }, 401, "invalid_token", "bad signature"],
      ["alg none", { authorization: `Bearer ${unsigned}` }, 401, "invalid_token", 'unsupported algorithm "none"'],
      ["an HMAC token", { authorization: `Bearer ${hmac}` }, 401, "invalid_token", 'unsupported algorithm "HS256"'],
      ["a caller on a path it may not use", { "api-key": KEY_HASHED }, 403, "route_not_allowed", "caller chat-frontend may not use /search/indexes"],
    ];
    const forwarded = upstream.received.length;
    for (const [name, headers, status, code, reason] of cases) {
      const response = await fetch(`${proxy.url}${name.startsWith("a caller") ? "/search/indexes" : EMBEDDINGS}`, { headers });
      expect(response.status, name).toBe(status);
      const error = (await readJson(response)).error;
      expect(error.code, name).toBe(code);
      expect(error.message, name).toContain(reason);
      proxyBodies.push(JSON.stringify(error));
    }
    // A key Entra does not publish: the keys are fetched once more, at most once in 10 s, and the token refused.
    const fetchesBefore = entra.keysFetches;
    for (let attempt = 0; attempt < 3; attempt += 1) {
      const response = await fetch(`${proxy.url}${EMBEDDINGS}`, { headers: { authorization: `Bearer ${token({ key: strangerKey, header: { kid: `unknown-${attempt}` } })}` } });
      expect(response.status).toBe(401);
      expect((await readJson(response)).error.message).toContain("unknown kid");
    }
    expect(entra.keysFetches - fetchesBefore).toBe(1);
    expect(upstream.received.length).toBe(forwarded);
    const { samples } = await scrape(proxy.url);
    const rejected = (caller: string, reason: string) => valueOf(samples, "auth_proxy_caller_rejections_total", { caller, reason });
    expect([rejected("unknown", "missing_credentials"), rejected("unknown", "invalid_api_key"), rejected("unknown", "invalid_token"), rejected("chat-frontend", "route_not_allowed")]).toEqual([1, 1, 11, 1]);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "unknown", code: "401" })).toBe(13);
    await proxy.stop();
  });

  test("Entra ID rolls its signing key: a token signed with the new key is accepted after one fetch of the keys", async () => {
    const proxy = await startProxy(callersEnv());
    await proxy.waitForHealth();
    await proxy.waitForLog((line) => line.msg === "caller token signing keys fetched");
    const before = entra.keysFetches;
    entra.rotateSigningKey();
    try {
      const response = await fetch(`${proxy.url}${EMBEDDINGS}`, { headers: { authorization: `Bearer ${entra.mintCallerToken({ appId: RAG_APP, audience: AUDIENCE })}` } });
      expect(response.status).toBe(200);
      await response.text();
      expect(entra.keysFetches - before).toBe(1);
    } finally {
      entra.rotateSigningKey(true);
    }
    await proxy.stop();
  });

  test("AUTH_PROXY_CALLER names the app behind a sidecar: no credential asked, its traffic labelled", async () => {
    const proxy = await startProxy(baseEnv({ AUTH_PROXY_CALLER: "chat-app" }));
    await proxy.waitForHealth();
    const response = await fetch(`${proxy.url}${CHAT}`, { method: "POST", body: "{}" });
    expect(response.status).toBe(200);
    await response.text();
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "chat-app", code: "200" })).toBe(1);
    expect((await proxy.waitForLog((line) => line.msg === "request")).caller).toBe("chat-app");
    await proxy.stop();
  });

  test("PROXY_API_KEYS' keys are callers labelled by the first 8 hex digits of their SHA-256", async () => {
    const proxy = await startProxy(baseEnv({ PROXY_API_KEYS: KEY_PLAIN }));
    await proxy.waitForHealth();
    expect((await fetch(`${proxy.url}/openai/models`, { headers: { "api-key": KEY_PLAIN } })).status).toBe(200);
    const label = createHash("sha256").update(KEY_PLAIN).digest("hex").slice(0, 8);
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: label, code: "200" })).toBe(1);
    await proxy.stop();
  });

  const badConfigurations: [string, () => Record<string, string | undefined>, string[]][] = [
    // Where the YAML breaks, by line number only: the line itself may hold a key.
    ["a callers file that is not YAML", () => callersEnv({ AUTH_PROXY_CALLERS: certs.write("broken-callers.yaml", "callers:\n  - name: a\n    keys: [secret-key-in-line-3\n   routes: [/]\n") }), ["is not YAML or JSON: Unexpected token at line"]],
    ["a callers file with PROXY_API_KEYS", () => callersEnv({ PROXY_API_KEYS: "k" }), ["set AUTH_PROXY_CALLERS or PROXY_API_KEYS, not both"]],
    ["entra callers without AUTH_PROXY_AUDIENCE", () => callersEnv({ AUTH_PROXY_AUDIENCE: undefined }), ["has entra callers: set AUTH_PROXY_AUDIENCE"]],
    ["an AUTH_PROXY_CALLER the file does not name", () => callersEnv({ AUTH_PROXY_CALLER: "nobody" }), ["AUTH_PROXY_CALLER=nobody is no caller of"]],
    ["a key variable that is not set", () => callersEnv({ CHAT_FRONTEND_KEY: undefined }), ["callers[0].keys[1] names ${CHAT_FRONTEND_KEY}, which is not set"]],
    [
      "a file with faults at each level",
      () =>
        callersEnv({
          AUTH_PROXY_CALLERS: certs.write("bad-callers.yaml", `callers:\n  - name: Bad Name\n    keys: [sha256:abc]\n  - name: twin\n    keys: [same-key]\n    limit: 1\n  - name: twin\n    keys: [same-key]\n    entra: { tenant: nope, app_ids: [] }\n    routes: [search]\n`),
        }),
      [
        "callers[0].name must be lower-case letters",
        "callers[0].keys[0] starts with sha256: but is not 64 hex digits",
        "callers[1].limit is not a setting",
        "callers[2].name twin is another caller's name too",
        "callers[2].keys[0] is callers[1]'s key too",
        "callers[2].entra.tenant must be the callers' tenant ID",
        "callers[2].entra must list app_ids (appid/azp) or object_ids (oid)",
        "callers[2].routes must list path prefixes starting with /",
      ],
    ],
  ];
  for (const [name, env, expected] of badConfigurations) {
    test(`${name}: exit 1 within 2 s, one line per fault`, async () => {
      const startedAt = performance.now();
      const proxy = spawnProxy({ ...env(), PORT: "0", HOST: "127.0.0.1" });
      expect(await proxy.exited).toBe(1);
      expect(performance.now() - startedAt).toBeLessThan(2000);
      for (const text of expected) expect(proxy.stderr).toContain(text);
      expect(proxy.stderr.trim().split("\n")).toHaveLength(expected.length);
      expect(proxy.stderr).not.toMatch(/^\s+at /m);
      expect(proxy.stderr).not.toContain("secret-key");
    });
  }
});

describeSecrets();
