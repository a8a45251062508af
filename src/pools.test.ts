/**
 * Backend pools and failover, also under hostile backends (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/pools.ts called directly.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createHash, randomBytes } from "node:crypto";
import { ScriptedBackend } from "../test/fakes.ts";
import { freePort, startProxy, type ProxyProcess } from "../test/harness.ts";
import { rawRequest, startBlackHole, startSilentListener } from "../test/http.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import { TestSocket } from "../test/websocket.ts";
import { baseEnv, certs, describeSecrets, entra, readJson, rejection, upstream, useSuite } from "../test/suite.ts";
useSuite();

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

  test("x-ratelimit-remaining-* are kept per route, backend and deployment: two regions' quotas never overwrite each other", async () => {
    const remaining = (requests: number, tokens: number) => ({ status: 200, headers: { "x-ratelimit-remaining-requests": String(requests), "x-ratelimit-remaining-tokens": String(tokens) } });
    // Smooth round-robin alternates between equal backends: east, west, east, west.
    const east = backend("rl-east").then(remaining(11, 1100), remaining(12, 1200));
    const west = backend("rl-west").then(remaining(21, 2100), remaining(22, 2200));
    const proxy = await poolProxy(route("/", [{ backend: east }, { backend: west }]));
    for (const deployment of ["gpt-4o", "gpt-4o", "embed", "embed"]) {
      expect((await fetch(`${proxy.url}/openai/deployments/${deployment}/chat/completions`, { method: "POST", body: "{}" })).status).toBe(200);
    }
    const { text, samples } = await scrape(proxy.url);
    const seen = (backendName: string, deployment: string, kind: string) => valueOf(samples, "auth_proxy_upstream_ratelimit_remaining", { route: "/", backend: backendName, deployment, kind });
    expect([seen("rl-east", "gpt-4o", "requests"), seen("rl-east", "gpt-4o", "tokens"), seen("rl-west", "gpt-4o", "requests"), seen("rl-west", "gpt-4o", "tokens")]).toEqual([11, 1100, 21, 2100]);
    expect([seen("rl-east", "embed", "requests"), seen("rl-east", "embed", "tokens"), seen("rl-west", "embed", "requests"), seen("rl-west", "embed", "tokens")]).toEqual([12, 1200, 22, 2200]);
    expect(samples.filter((sample) => sample.name === "auth_proxy_upstream_ratelimit_remaining")).toHaveLength(8);
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

  test("AUTH_PROXY_CONNECT_TIMEOUT bounds the connect to API_BASE_URL: a SYN-dropping upstream is a 502 after it, not after the kernel's retries", async () => {
    const dark = await startBlackHole();
    const proxy = await startProxy(baseEnv({ API_BASE_URL: `http://127.0.0.1:${dark.port}`, AUTH_PROXY_CONNECT_TIMEOUT: "1" }));
    await proxy.waitForHealth();
    const answer = await timedFetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions`, { method: "POST", body: "{}" });
    expect(answer.status).toBe(502);
    expect(answer.ms).toBeLessThan(1000 + 1500);
    expect(JSON.parse(answer.body).error.message).toContain("no connection within 1 s (connect_timeout)");
    await proxy.stop();
    dark.close();
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

describeSecrets();
