/**
 * Inbound caller keys (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/callers.ts called directly.
 */
import { describe, expect, test } from "bun:test";
import { renameSync, writeFileSync } from "node:fs";
import { startProxy } from "../test/harness.ts";
import { rawUpgrade, TestSocket } from "../test/websocket.ts";
import { baseEnv, certs, describeSecrets, lastReceived, readJson, realtime, upstream, useSuite } from "../test/suite.ts";
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

describeSecrets();
