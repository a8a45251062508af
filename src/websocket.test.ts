/**
 * The WebSocket relay (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/websocket.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { websocketBaseUrl } from "../src/routes.ts";
import { upstreamSubprotocols, withoutCredentialParameters } from "../src/websocket.ts";
import { FakeRealtime, patternBytes } from "../test/fakes.ts";
import { freePort, memoryKiB, ROOT, startProxy, type ProxyProcess } from "../test/harness.ts";
import { startConnectProxy } from "../test/http.ts";
import { scrape, valueOf } from "../test/prometheus.ts";
import { rawUpgrade, TestSocket } from "../test/websocket.ts";
import { baseEnv, describeSecrets, entra, proxyBodies, realtime, rejection, sha256, tls, useSuite, waitFor, waitForFrame } from "../test/suite.ts";
useSuite();

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

describe("Pure pieces", () => {
  test("WebSocket pieces: ws/wss base, credential query parameters and subprotocols removed, the rest kept", () => {
    expect(websocketBaseUrl("https://x.openai.azure.com/base")).toBe("wss://x.openai.azure.com/base");
    expect(websocketBaseUrl("http://127.0.0.1:9000")).toBe("ws://127.0.0.1:9000");
    expect(withoutCredentialParameters("/r?api-key=a&b=1&API-KEY=c&api%2Dkey=d&b=%2F&Authorization=Bearer%20x&c")).toBe("/r?b=1&b=%2F&c");
    expect(withoutCredentialParameters("/r?api-key=a")).toBe("/r");
    expect(withoutCredentialParameters("/r?q=%zz&api-key")).toBe("/r?q=%zz");
    expect(upstreamSubprotocols("realtime, openai-insecure-api-key.sk-1 ,openai-beta.realtime-v1,")).toEqual(["realtime", "openai-beta.realtime-v1"]);
    expect(upstreamSubprotocols(null)).toEqual([]);
  });
});

describeSecrets();
