/**
 * Limits per caller (shared/CONTRACT.md "Limits"), through real sockets: the
 * proxy as its own process, its counts in memory or in a real redis-server,
 * an upstream answering known usage; the pure pieces of src/limits.ts and
 * src/stream-usage.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { writeFileSync } from "node:fs";
import { spawnProxy, startProxy, type ProxyProcess } from "../test/harness.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import { TestSocket } from "../test/websocket.ts";
import { ANSWER_USAGE, chatStream, RedisServer, UsageUpstream } from "../test/limits.ts";
import * as usageFixtures from "../test/usage.ts";
import { baseEnv, certs, entra, readJson, realtime, useSuite, waitFor } from "../test/suite.ts";
import { REDIS_RESOURCE, SERVICE_PRINCIPAL_OID } from "../test/fakes.ts";
import { calendarKeys, type CallerLimits, DEFAULT_OUTPUT_RESERVATION, INLINE_MEDIA_RESERVATION, MemoryStore, parseLimits, quotaResetsAt, reservationFor } from "./limits.ts";
import { stripChunk, takesStreamOptions, type UsageStrip } from "./stream-usage.ts";
useSuite();

const CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const limits = (given: Partial<CallerLimits>): CallerLimits => ({ tokens_per_minute: 0, requests_per_minute: 0, tokens_per_day: 0, tokens_per_month: 0, ...given });
const encode = (text: string) => new TextEncoder().encode(text);

describe("Limits: what a request reserves", () => {
  test("input is the body's bytes / 4, inline media a fixed amount each; output the cap it names (times n) or the default", () => {
    const chat = JSON.stringify({ messages: [{ role: "user", content: "x".repeat(400) }], max_tokens: 100 });
    expect(reservationFor("/openai/deployments/d/chat/completions", CHAT, encode(chat), chat.length, limits({})).tokens).toBe(Math.ceil(chat.length / 4) + 100);
    const two = JSON.stringify({ messages: [], max_completion_tokens: 50, max_tokens: 999, n: 3 });
    expect(reservationFor("/v1/chat/completions", "/v1/chat/completions", encode(two), two.length, limits({})).tokens).toBe(Math.ceil(two.length / 4) + 150);
    const none = JSON.stringify({ messages: [] });
    expect(reservationFor("/v1/chat/completions", "/v1/chat/completions", encode(none), none.length, limits({})).tokens).toBe(Math.ceil(none.length / 4) + DEFAULT_OUTPUT_RESERVATION);
    const image = `data:image/png;base64,${"A".repeat(1_000_000)}`;
    const vision = JSON.stringify({ messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: image } }] }], max_tokens: 10 });
    expect(reservationFor("/v1/chat/completions", "/v1/chat/completions", encode(vision), vision.length, limits({})).tokens).toBe(Math.ceil((vision.length - image.length) / 4) + INLINE_MEDIA_RESERVATION + 10);
    const embeddings = JSON.stringify({ input: "y".repeat(800) });
    expect(reservationFor("/openai/deployments/e/embeddings", "/openai/deployments/e/embeddings", encode(embeddings), embeddings.length, limits({})).tokens).toBe(Math.ceil(embeddings.length / 4));
    const responses = JSON.stringify({ input: "hi", max_output_tokens: 70 });
    expect(reservationFor("/openai/v1/responses", "/openai/v1/responses", encode(responses), responses.length, limits({})).tokens).toBe(Math.ceil(responses.length / 4) + 70);
    // A body not held (chunked, or over the hold budget): its Content-Length, and the default output for a path that generates.
    expect(reservationFor("/v1/chat/completions", "/v1/chat/completions", undefined, 4000, limits({})).tokens).toBe(1000 + DEFAULT_OUTPUT_RESERVATION);
  });

  test("a chat stream of a caller with token limits asks for usage, written in as the first member; every other byte as sent", () => {
    const body = '{"messages":[{"role":"user","content":"\\u00e9 1.0e2"}],"stream":true,"seed":12345678901234567890}';
    const asked = reservationFor("/openai/deployments/d/chat/completions", CHAT, encode(body), body.length, limits({ tokens_per_minute: 10_000 }));
    expect(asked.injected).toBe(true);
    expect(new TextDecoder().decode(asked.body as Uint8Array)).toBe(`{"stream_options":{"include_usage":true},${body.slice(1)}`);
    const own = '{"stream":true,"stream_options":{"include_usage":false},"messages":[]}';
    expect(JSON.parse(new TextDecoder().decode(reservationFor("/v1/chat/completions", "/v1/chat/completions", encode(own), own.length, limits({ tokens_per_day: 5 })).body as Uint8Array)).stream_options).toEqual({ include_usage: true });
    for (const [why, target, given] of [
      ["only requests limited", CHAT, limits({ requests_per_minute: 5 })],
      ["an api-version before 2024-09-01", "/openai/deployments/d/chat/completions?api-version=2024-06-01", limits({ tokens_per_minute: 5 })],
    ] as const) {
      expect(reservationFor("/openai/deployments/d/chat/completions", target, encode(body), body.length, given).injected, why).toBe(false);
    }
    const asking = '{"stream":true,"stream_options":{"include_usage":true}}';
    expect(reservationFor("/v1/chat/completions", "/v1/chat/completions", encode(asking), asking.length, limits({ tokens_per_minute: 5 })).injected).toBe(false);
  });

  test("api-versions that take stream_options: 2024-09-01-preview on, GA 2024-10-21 on, the v1 API; not 2024-08-01-preview, 2024-06-01, 2024-02-01, nor a deployment path without one", () => {
    const cases: [string, boolean][] = [
      ["/openai/deployments/d/chat/completions?api-version=2024-10-21", true],
      ["/openai/deployments/d/chat/completions?api-version=2024-09-01-preview", true],
      ["/openai/deployments/d/chat/completions?api-version=2025-04-01-preview", true],
      ["/openai/v1/chat/completions?api-version=preview", true],
      ["/openai/v1/chat/completions", true],
      ["/v1/chat/completions", true],
      ["/openai/deployments/d/chat/completions?api-version=2024-08-01-preview", false],
      ["/openai/deployments/d/chat/completions?api-version=2024-06-01", false],
      ["/openai/deployments/d/chat/completions?api-version=2024-02-01", false],
      ["/openai/deployments/d/chat/completions", false],
    ];
    for (const [target, takes] of cases) expect(takesStreamOptions(target), target).toBe(takes);
  });

  test("the limits mapping: whole numbers above 0, known names, every fault by place", () => {
    const faults: string[] = [];
    expect(parseLimits({ tokens_per_minute: 100, requests_per_minute: 5 }, "callers[0].limits", faults)).toEqual(limits({ tokens_per_minute: 100, requests_per_minute: 5 }));
    parseLimits({ tokens_per_minute: -1, requests_per_day: 5, tokens_per_month: 1.5 }, "callers[1].limits", faults);
    parseLimits([1], "callers[2].limits", faults);
    expect(faults).toEqual([
      "callers[1].limits.tokens_per_minute must be a whole number above 0, not -1",
      "callers[1].limits.requests_per_day is not a limit (tokens_per_minute, requests_per_minute, tokens_per_day, tokens_per_month)",
      "callers[1].limits.tokens_per_month must be a whole number above 0, not 1.5",
      "callers[2].limits must be a mapping of tokens_per_minute, requests_per_minute, tokens_per_day, tokens_per_month",
    ]);
  });
});

describe("Limits: the windows", () => {
  test("per minute: in any 60 s no more than the limit is admitted, and a refusal says when enough has slid out", () => {
    const store = new MemoryStore();
    const given = limits({ tokens_per_minute: 1000 });
    const start = Date.UTC(2026, 11, 7, 12, 0, 0, 500);
    const admitted: [number, number][] = [];
    // 100 tokens offered every 700 ms for 5 minutes: 7 times what fits.
    for (let at = start; at < start + 300_000; at += 700) {
      const verdict = store.admit("app", given, 100, at);
      if (verdict.admitted) admitted.push([at, 100]);
      else if (verdict.limit === "tokens_per_minute") {
        expect(verdict.retryAfterMs).toBeGreaterThan(0);
        expect(verdict.retryAfterMs).toBeLessThanOrEqual(61_000);
        // Waiting as told admits it.
        const probe = new MemoryStore();
        for (const [when, tokens] of admitted) if (when > at - 61_000) probe.admit("app", given, tokens, when);
        expect(probe.admit("app", given, 100, at + verdict.retryAfterMs).admitted).toBe(true);
      }
    }
    for (const [from] of admitted) {
      const inWindow = admitted.filter(([when]) => when >= from && when < from + 60_000).reduce((sum, [, tokens]) => sum + tokens, 0);
      expect(inWindow).toBeLessThanOrEqual(1000);
    }
    // At least 60/61 of the limit a minute once it runs full.
    expect(admitted.length * 100).toBeGreaterThanOrEqual(((300_000 - 61_000) / 61_000) * 1000);
  });

  test("a day's and a month's quota are calendar windows in UTC: a new day starts at 0; refusals name the reset", () => {
    const store = new MemoryStore();
    const given = limits({ tokens_per_day: 300, tokens_per_month: 1000 });
    const evening = Date.UTC(2026, 11, 31, 23, 59, 0);
    expect(store.admit("app", given, 200, evening).admitted).toBe(true);
    expect(store.admit("app", given, 200, evening + 1000)).toMatchObject({ admitted: false, limit: "tokens_per_day", used: 200 });
    expect(store.admit("app", given, 200, evening + 61_000).admitted).toBe(true);
    expect(quotaResetsAt("tokens_per_day", evening).toISOString()).toBe("2027-01-01T00:00:00.000Z");
    expect(quotaResetsAt("tokens_per_month", Date.UTC(2026, 1, 10)).toISOString()).toBe("2026-03-01T00:00:00.000Z");
    expect(calendarKeys(evening)).toEqual({ day: "20261231", month: "202612" });
  });
});

describe("Limits: the usage chunk the proxy asked for is taken out", () => {
  test("cut at every byte, the stream comes out as it would have without the option, and its usage is kept", () => {
    const withUsage = new TextEncoder().encode(chatStream(true));
    const expected = chatStream(false);
    for (let cut = 1; cut < withUsage.length; cut += 7) {
      const strip: UsageStrip = { carry: undefined, usage: undefined };
      const out = [stripChunk(strip, withUsage.subarray(0, cut)), stripChunk(strip, withUsage.subarray(cut))];
      expect(out.map((part) => new TextDecoder().decode(part)).join("") + new TextDecoder().decode(strip.carry ?? new Uint8Array())).toBe(expected);
      expect(strip.usage?.tokens.slice(0, 2)).toEqual([ANSWER_USAGE.prompt, ANSWER_USAGE.completion]);
    }
  });

  test("Azure's shape (prompt filter results first, usage:null in every chunk, CRLF or LF) and a chunk of one byte at a time", () => {
    const source = usageFixtures.chatStreamEvents().join("");
    const strip: UsageStrip = { carry: undefined, usage: undefined };
    const bytes = new TextEncoder().encode(source.replaceAll("\n", "\r\n"));
    let out = "";
    for (let at = 0; at < bytes.length; at += 1) out += new TextDecoder().decode(stripChunk(strip, bytes.subarray(at, at + 1)));
    expect(out).not.toContain('"usage"');
    expect(out).toContain("data: [DONE]\r\n\r\n");
    expect(strip.usage).toBeDefined();
  });
});

/** A callers file of limited callers, each with a key of its own name. */
function limitedCallers(): string {
  return certs.write(
    "limited-callers.yaml",
    `callers:
  - name: rpm
    keys: [rpm-key-0001]
    limits: { requests_per_minute: 3 }
  - name: tpm
    keys: [tpm-key-0001]
    limits: { tokens_per_minute: 1000 }
  - name: daily
    keys: [daily-key-0001]
    limits: { tokens_per_day: 500 }
  - name: monthly
    keys: [monthly-key-0001]
    limits: { tokens_per_month: 500 }
  - name: streams
    keys: [streams-key-0001]
    limits: { tokens_per_minute: 100000, requests_per_minute: 1000 }
  - name: open
    keys: [open-key-0001]
  - name: pooled
    keys: [pooled-key-0001]
    limits: { tokens_per_minute: 1000 }
  - name: realtime
    keys: [realtime-key-0001]
    limits: { tokens_per_day: 500 }
`,
  );
}

const SMALL_CHAT = JSON.stringify({ messages: [{ role: "user", content: "hello" }], max_tokens: 100 });
const SMALL_RESERVATION = Math.ceil(SMALL_CHAT.length / 4) + 100;
const USED = ANSWER_USAGE.prompt + ANSWER_USAGE.completion;

for (const storeKind of ["memory", "redis"] as const) {
  describe(`Limits with the counts in ${storeKind}`, () => {
    const usage = new UsageUpstream();
    const redis = new RedisServer();
    let proxy: ProxyProcess;
    beforeAll(async () => {
      usage.start();
      if (storeKind === "redis") await redis.start();
      proxy = await startProxy(baseEnv({ API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: storeKind === "redis" ? redis.url : undefined }));
      await proxy.waitForHealth();
    });
    afterAll(async () => {
      await proxy.stop();
      usage.stop();
      if (storeKind === "redis") await redis.kill();
    });
    const chat = (key: string, body = SMALL_CHAT, target = CHAT, headers: Record<string, string> = {}) => fetch(`${proxy.url}${target}`, { method: "POST", headers: { "api-key": key, "content-type": "application/json", ...headers }, body });

    test("requests_per_minute: admitted while it fits, each answer saying what remains; then 429 caller_rate_limited with Retry-After and retry-after-ms, nothing forwarded", async () => {
      const remaining: string[] = [];
      for (let index = 0; index < 3; index += 1) {
        const response = await chat("rpm-key-0001");
        expect(response.status).toBe(200);
        remaining.push(response.headers.get("x-auth-proxy-remaining-requests")!);
        expect(response.headers.get("x-auth-proxy-remaining-tokens")).toBeNull();
        // Azure's x-ratelimit-* pass as they came.
        expect([response.headers.get("x-ratelimit-remaining-tokens"), response.headers.get("x-ratelimit-remaining-requests")]).toEqual(["4242", "42"]);
        await response.text();
      }
      expect(remaining).toEqual(["2", "1", "0"]);
      const forwarded = usage.received.length;
      const refused = await chat("rpm-key-0001");
      expect(refused.status).toBe(429);
      const error = (await readJson(refused)).error;
      expect(error).toMatchObject({ code: "caller_rate_limited", type: "auth_proxy_error" });
      expect(error.message).toContain("requests_per_minute of 3");
      const seconds = Number(refused.headers.get("retry-after"));
      const ms = Number(refused.headers.get("retry-after-ms"));
      expect(seconds).toBeGreaterThanOrEqual(1);
      expect(seconds).toBeLessThanOrEqual(61);
      expect(Math.ceil(ms / 1000)).toBe(seconds);
      expect(refused.headers.get("x-auth-proxy-remaining-requests")).toBe("0");
      expect(usage.received.length).toBe(forwarded);
      // Another caller is not touched by it.
      expect((await chat("open-key-0001")).status).toBe(200);
    });

    test("tokens_per_minute: a request reserves its estimate and cap; the answer's usage replaces it; over the limit 429 naming the limit", async () => {
      const first = await chat("tpm-key-0001");
      expect(first.status).toBe(200);
      expect(Number(first.headers.get("x-auth-proxy-remaining-tokens"))).toBe(1000 - SMALL_RESERVATION);
      await first.text();
      await Bun.sleep(50);
      const second = await chat("tpm-key-0001");
      // The first settled to its usage (180), not its reservation.
      expect(Number(second.headers.get("x-auth-proxy-remaining-tokens"))).toBe(1000 - USED - SMALL_RESERVATION);
      await second.text();
      await Bun.sleep(50);
      let refused: Response | undefined;
      for (let index = 0; index < 10 && refused === undefined; index += 1) {
        const response = await chat("tpm-key-0001");
        if (response.status === 429) refused = response;
        else await response.text();
        await Bun.sleep(20);
      }
      expect(refused).toBeDefined();
      const error = (await readJson(refused!)).error;
      expect(error.code).toBe("caller_rate_limited");
      expect(error.message).toContain("tokens_per_minute of 1000");
      expect(Number(refused!.headers.get("retry-after-ms"))).toBeGreaterThan(0);
      // A request that could never fit says so, and is not told to wait.
      const huge = await chat("tpm-key-0001", JSON.stringify({ messages: [], max_tokens: 5000 }));
      expect(huge.status).toBe(429);
      expect(huge.headers.get("retry-after")).toBeNull();
      expect((await readJson(huge)).error.message).toContain("more than its whole tokens_per_minute of 1000");
    });

    test("tokens_per_day and tokens_per_month: 403 caller_quota_exceeded once the reservation no longer fits, saying when the quota resets", async () => {
      for (const [key, name] of [["daily-key-0001", "tokens_per_day"], ["monthly-key-0001", "tokens_per_month"]] as const) {
        let used = 0;
        let refused: Response | undefined;
        for (let index = 0; index < 5 && refused === undefined; index += 1) {
          const response = await chat(key);
          if (response.status !== 200) refused = response;
          else {
            used += USED;
            await response.text();
            await Bun.sleep(30);
          }
        }
        expect(refused?.status, name).toBe(403);
        expect(used + SMALL_RESERVATION).toBeGreaterThan(500);
        const error = (await readJson(refused!)).error;
        expect(error.code).toBe("caller_quota_exceeded");
        expect(error.message).toContain(`the quota resets at ${quotaResetsAt(name, Date.now()).toISOString()}`);
        expect(refused!.headers.get("retry-after")).toBeNull();
      }
    });

    test("a stream that did not ask for usage is sent include_usage, and the client receives the bytes it would have received; the usage settles the reservation", async () => {
      const body = JSON.stringify({ messages: [{ role: "user", content: "stream please" }], stream: true, max_tokens: 200 });
      const before = await chat("streams-key-0001");
      await before.text();
      await Bun.sleep(50);
      const response = await chat("streams-key-0001", body, CHAT, { "x-test-usage": "33,44" });
      const remainingAtAdmission = Number(response.headers.get("x-auth-proxy-remaining-tokens"));
      expect(await response.text()).toBe(chatStream(false));
      const sent = usage.received.at(-1)!;
      expect(sent.body).toBe(`{"stream_options":{"include_usage":true},${body.slice(1)}`);
      await Bun.sleep(50);
      const after = await chat("streams-key-0001");
      await after.text();
      // Settled to 33 + 44: what remained at admission, plus the reservation given back, less the usage, less the next reservation.
      const reservation = Math.ceil(body.length / 4) + 200;
      expect(Number(after.headers.get("x-auth-proxy-remaining-tokens"))).toBe(remainingAtAdmission + reservation - 77 - SMALL_RESERVATION);
      const line = await proxy.waitForLog((entry) => entry.caller === "streams" && entry.input_tokens === 33);
      expect(line).toMatchObject({ output_tokens: 44, limits: storeKind });
    });

    test("an older api-version is not sent the option (the stream keeps its reservation); a client that asked for usage gets it", async () => {
      // The last test's settlements land first (Redis takes them in batches, 10 ms apart).
      await Bun.sleep(50);
      const body = JSON.stringify({ messages: [], stream: true, max_tokens: 10 });
      const old = await chat("streams-key-0001", body, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01");
      const atAdmission = Number(old.headers.get("x-auth-proxy-remaining-tokens"));
      expect(await old.text()).toBe(chatStream(false));
      expect(usage.received.at(-1)!.body).toBe(body);
      await Bun.sleep(50);
      const next = await chat("streams-key-0001");
      await next.text();
      expect(Number(next.headers.get("x-auth-proxy-remaining-tokens"))).toBe(atAdmission - SMALL_RESERVATION);
      const asking = JSON.stringify({ messages: [], stream: true, stream_options: { include_usage: true }, max_tokens: 10 });
      const own = await chat("streams-key-0001", asking);
      expect(await own.text()).toBe(chatStream(true));
      expect(usage.received.at(-1)!.body).toBe(asking);
    });

    test("a Responses stream settles from response.completed; a 503 without usage gives its reservation back; a client that leaves a stream keeps it", async () => {
      const settleAndRead = async () => {
        await Bun.sleep(80);
        const probe = await chat("streams-key-0001");
        await probe.text();
        return Number(probe.headers.get("x-auth-proxy-remaining-tokens")) + SMALL_RESERVATION;
      };
      let level = await settleAndRead();
      level -= USED; // the probe's own usage, settled by the next read
      const responses = JSON.stringify({ input: "hi", stream: true, max_output_tokens: 300 });
      const streamed = await chat("streams-key-0001", responses, "/openai/v1/responses", { "x-test-usage": "10,20" });
      expect(await streamed.text()).toContain("response.completed");
      expect(await settleAndRead()).toBe(level - 30);
      level -= 30 + USED;
      const failed = await chat("streams-key-0001", SMALL_CHAT, "/fail/openai/deployments/x/chat/completions?api-version=2024-10-21");
      expect(failed.status).toBe(503);
      await failed.text();
      expect(await settleAndRead()).toBe(level);
      level -= USED;
      const held = JSON.stringify({ messages: [], stream: true, max_tokens: 500 });
      const aborter = new AbortController();
      const leaving = await fetch(`${proxy.url}/hold/openai/deployments/x/chat/completions?api-version=2024-06-01`, { method: "POST", headers: { "api-key": "streams-key-0001" }, body: held, signal: aborter.signal });
      const reader = leaving.body!.getReader();
      await reader.read();
      aborter.abort();
      await Bun.sleep(100);
      expect(await settleAndRead()).toBe(level - (Math.ceil(held.length / 4) + 500));
    });

    test("a request that fails over to a second backend is reserved and charged once", async () => {
      // Two backends: the first answers 503 (its path holds /fail/), the second the usage.
      const routes = certs.write(`pool-routes-${storeKind}.yaml`, `routes:\n  - prefix: /\n    backends:\n      - { name: first, url: "${usage.url}/fail", priority: 1 }\n      - { name: second, url: "${usage.url}", priority: 2 }\n`);
      const pool = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: routes, AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: storeKind === "redis" ? redis.url : undefined }));
      await pool.waitForHealth();
      const send = () => fetch(`${pool.url}${CHAT}`, { method: "POST", headers: { "api-key": "pooled-key-0001" }, body: SMALL_CHAT });
      const first = await send();
      expect(first.status).toBe(200);
      expect(Number(first.headers.get("x-auth-proxy-remaining-tokens"))).toBe(1000 - SMALL_RESERVATION);
      await first.text();
      const line = await pool.waitForLog((entry) => entry.caller === "pooled");
      expect(line).toMatchObject({ attempts: 2, tried: "first,second", backend: "second" });
      await Bun.sleep(80);
      const second = await send();
      await second.text();
      expect(Number(second.headers.get("x-auth-proxy-remaining-tokens"))).toBe(1000 - USED - SMALL_RESERVATION);
      await pool.stop();
    });

    test("a Realtime session is admitted at its handshake and charged per response.done; one past its quota is not cut, the next handshake is refused", async () => {
      const wsProxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url, AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: storeKind === "redis" ? redis.url : undefined }));
      await wsProxy.waitForHealth();
      const client = new TestSocket(`ws://127.0.0.1:${wsProxy.port}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime`, { headers: { "api-key": "realtime-key-0001" } });
      await client.waitForFrames(1);
      client.send(usageFixtures.realtimeResponseDone(400, 300, 0));
      await client.waitForFrames(2);
      // 701 of 500 spent (the handshake's token and 700): the session goes on.
      client.send('{"type":"response.create"}');
      await client.waitForFrames(3);
      client.socket.close(1000);
      await Bun.sleep(100);
      if (storeKind === "redis") expect((await redis.totals("realtime")).day).toBe(701);
      const handshake = { "api-key": "realtime-key-0001", upgrade: "websocket", connection: "Upgrade", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13" };
      const sessions = realtime.sessions.length;
      const refused = await fetch(`${wsProxy.url}/openai/realtime?deployment=x`, { headers: handshake });
      expect(refused.status).toBe(403);
      expect((await readJson(refused)).error.code).toBe("caller_quota_exceeded");
      // Nothing reached the upstream.
      expect(realtime.sessions.length).toBe(sessions);
      await wsProxy.stop();
    });

    test("the limits' metrics: limits, remaining, rejections, store errors and latency, valid exposition", async () => {
      const { text, samples } = await scrape(proxy.url);
      expect(valueOf(samples, "auth_proxy_caller_limit", { caller: "tpm", limit: "tokens_per_minute" })).toBe(1000);
      expect(valueOf(samples, "auth_proxy_caller_limit_rejections_total", { caller: "rpm", limit: "requests_per_minute" })).toBeGreaterThanOrEqual(1);
      expect(valueOf(samples, "auth_proxy_caller_limit_remaining", { caller: "rpm", limit: "requests_per_minute" })).toBe(0);
      expect(valueOf(samples, "auth_proxy_limits_store_errors_total", { store: storeKind })).toBe(0);
      if (storeKind === "redis") expect(valueOf(samples, "auth_proxy_limits_store_duration_seconds_count", { store: "redis" })).toBeGreaterThan(10);
      expect((await promtool(["check", "metrics"], text)).output).not.toMatch(/error/i);
      expect(proxy.stdout).not.toMatch(/-key-0001/);
    });
  });
}

describe("Limits: a sidecar's app, and a reload", () => {
  test("AUTH_PROXY_CALLER enforces its entry's limits with no credential; a reloaded callers file changes them and the counts go on", async () => {
    const usage = new UsageUpstream().start();
    const file = certs.write("sidecar-callers.yaml", "callers:\n  - name: app\n    keys: [app-key-0001]\n    limits: { requests_per_minute: 3 }\n");
    const proxy = await startProxy(baseEnv({ API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: file, AUTH_PROXY_CALLER: "app" }));
    await proxy.waitForHealth();
    const statuses = async (count: number) => {
      const seen: number[] = [];
      for (let index = 0; index < count; index += 1) {
        const response = await fetch(`${proxy.url}${CHAT}`, { method: "POST", body: SMALL_CHAT });
        seen.push(response.status);
        await response.text();
      }
      return seen;
    };
    expect(await statuses(4)).toEqual([200, 200, 200, 429]);
    writeFileSync(file, "callers:\n  - name: app\n    keys: [app-key-0001]\n    limits: { requests_per_minute: 5 }\n");
    proxy.proc.kill("SIGHUP");
    await proxy.waitForLog((line) => line.msg === "configuration reloaded");
    // Three already counted in this minute: two more fit under 5.
    expect(await statuses(3)).toEqual([200, 200, 429]);
    await proxy.stop();
    usage.stop();
  });
});

describe("Limits: Azure Managed Redis with Entra ID", () => {
  test("the proxy signs in as its identity's object ID with a token for redis.azure.com; each new token is a new sign-in before the old one expires, so a reconnect never uses a stale one", async () => {
    const usage = new UsageUpstream().start();
    const redis = await new RedisServer().start();
    await redis.lockDown();
    // As Azure Managed Redis does: the identity's user accepts a token while it is valid; here, only the newest.
    const tokens: string[] = [];
    entra.onTokenIssued = async (token, scope) => {
      if (!scope.startsWith(REDIS_RESOURCE)) return;
      tokens.push(token);
      await redis.command("ACL", ["SETUSER", SERVICE_PRINCIPAL_OID, "on", "resetpass", `>${token}`, "~auth-proxy:*", "+@all"]);
    };
    entra.tokenLifetimeSeconds = 6;
    try {
      const proxy = await startProxy(baseEnv({ API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: redis.url, AUTH_PROXY_REDIS_AUTH: "entra" }));
      await proxy.waitForHealth();
      await proxy.waitForLog((line) => line.msg === "limits store connected");
      const chat = async () => {
        const response = await fetch(`${proxy.url}${CHAT}`, { method: "POST", headers: { "api-key": "open-key-0001" }, body: SMALL_CHAT });
        await response.text();
        const limited = await fetch(`${proxy.url}${CHAT}`, { method: "POST", headers: { "api-key": "monthly-key-0001" }, body: SMALL_CHAT });
        await limited.text();
        return limited;
      };
      expect((await chat()).status).toBe(200);
      expect(String(await redis.command("CLIENT", ["LIST"]))).toContain(`user=${SERVICE_PRINCIPAL_OID}`);
      // Two refreshes later (6 s tokens, refreshed at half life), the first token no longer signs in; every connection of the identity is cut.
      await waitFor(() => tokens.length >= 3, 15_000);
      await Bun.sleep(500);
      await redis.command("CLIENT", ["KILL", "USER", SERVICE_PRINCIPAL_OID]);
      await Bun.sleep(1500);
      const before = (await redis.totals("monthly")).month;
      expect((await chat()).status).toBe(200);
      await Bun.sleep(100);
      expect((await redis.totals("monthly")).month).toBe(before + USED);
      const line = await proxy.waitForLog((entry) => entry.caller === "monthly" && Date.parse(entry.time as string) > Date.now() - 3000);
      expect(line.limits).toBe("redis");
      await proxy.stop();
      for (const token of tokens) expect(proxy.stdout + proxy.stderr).not.toContain(token.split(".")[2]!);
    } finally {
      entra.onTokenIssued = undefined;
      entra.tokenLifetimeSeconds = 3600;
      usage.stop();
      await redis.kill();
    }
  }, 40_000);
});

describe("Limits: a Redis with a password", () => {
  test("the password in the URL or in AUTH_PROXY_REDIS_PASSWORD_FILE signs in; neither appears in any output", async () => {
    const usage = new UsageUpstream().start();
    const redis = await new RedisServer().start();
    const password = "redis-password-9f3e-for-tests";
    await redis.command("CONFIG", ["SET", "requirepass", password]);
    const file = certs.write("redis-password", `${password}\n`);
    try {
      for (const env of [{ AUTH_PROXY_REDIS_URL: `redis://:${password}@127.0.0.1:${redis.port}` }, { AUTH_PROXY_REDIS_URL: redis.url, AUTH_PROXY_REDIS_PASSWORD_FILE: file }]) {
        const proxy = await startProxy(baseEnv({ API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: limitedCallers(), ...env }));
        await proxy.waitForHealth();
        await proxy.waitForLog((line) => line.msg === "limits store connected" && line.auth === "password");
        const response = await fetch(`${proxy.url}${CHAT}`, { method: "POST", headers: { "api-key": "pooled-key-0001" }, body: SMALL_CHAT });
        expect(response.status).toBe(200);
        await response.text();
        expect((await proxy.waitForLog((line) => line.caller === "pooled")).limits).toBe("redis");
        await proxy.stop();
        expect(proxy.stdout + proxy.stderr).not.toContain(password);
      }
    } finally {
      usage.stop();
      await redis.kill();
    }
  });
});

describe("Limits: configuration", () => {
  test("--check asks the limits store PING as the proxy would sign in: its round trip in the summary, or exit 1 naming the store", async () => {
    const redis = await new RedisServer().start();
    await redis.command("CONFIG", ["SET", "requirepass", "check-password-for-tests"]);
    try {
      const up = spawnProxy(baseEnv({ AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: `redis://:check-password-for-tests@127.0.0.1:${redis.port}` }), ["--check"]);
      expect(await up.exited).toBe(0);
      const summary = JSON.parse(up.stdout);
      expect(summary.limits_store).toMatchObject({ store: `redis://:***@127.0.0.1:${redis.port}` });
      expect(summary.limits_store.round_trip_ms).toBeGreaterThan(0);
      expect(up.stdout + up.stderr).not.toContain("check-password-for-tests");
    } finally {
      await redis.kill();
    }
    const down = spawnProxy(baseEnv({ AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: `redis://127.0.0.1:${redis.port}` }), ["--check"]);
    expect(await down.exited).toBe(1);
    expect(down.stderr).toContain(`--check failed: limits store redis://127.0.0.1:${redis.port}`);
  });

  test("faults in limits, the store's URL and its failure mode are refused at start with their place", async () => {
    const bad = certs.write("bad-limits.yaml", "callers:\n  - name: a\n    keys: [k-1]\n    limits: { tokens_per_minute: 0, requests_per_hour: 5 }\n");
    const cases: [Record<string, string>, string[]][] = [
      [{ AUTH_PROXY_CALLERS: bad }, ["callers[0].limits.tokens_per_minute must be a whole number above 0, not 0", "callers[0].limits.requests_per_hour is not a limit"]],
      [{ AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_LIMITS_ON_STORE_FAILURE: "maybe" }, ["AUTH_PROXY_LIMITS_ON_STORE_FAILURE must be open or closed"]],
      [{ AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: "http://cache:6379" }, ["AUTH_PROXY_REDIS_URL must start with redis:// or rediss://"]],
      [{ AUTH_PROXY_REDIS_URL: "redis://127.0.0.1:1" }, ["AUTH_PROXY_REDIS_URL is set without AUTH_PROXY_CALLERS"]],
      [{ AUTH_PROXY_CALLERS: limitedCallers(), AUTH_PROXY_REDIS_URL: "redis://127.0.0.1:1", AUTH_PROXY_REDIS_PASSWORD_FILE: "/nonexistent/redis-password" }, ["AUTH_PROXY_REDIS_PASSWORD_FILE /nonexistent/redis-password: no such file"]],
    ];
    for (const [env, messages] of cases) {
      const proc = spawnProxy(baseEnv(env));
      expect(await proc.exited, messages[0]).toBe(1);
      for (const message of messages) expect(proc.stderr).toContain(message);
    }
  });
});
