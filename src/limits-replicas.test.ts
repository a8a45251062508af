/**
 * Limits across replicas (shared/CONTRACT.md "Limits"): three proxy
 * processes, one real redis-server, one caller's clients spread across
 * them; and Redis killed (SIGKILL) and restarted under that load. The
 * minute-long runs the issue names are `make soak`'s (bench/soak-limits.ts);
 * these are the same runs scaled to seconds.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { type ProxyProcess, startProxy } from "../test/harness.ts";
import { ANSWER_USAGE, mostInAnyMinute, offerLoad, outageUnderLoad, RedisServer, UsageUpstream } from "../test/limits.ts";
import { baseEnv, certs, useSuite } from "../test/suite.ts";
useSuite();

const USED = ANSWER_USAGE.prompt + ANSWER_USAGE.completion;

function callersFile(tokensPerMinute: number): string {
  return certs.write(`replica-callers-${tokensPerMinute}.yaml`, `callers:\n  - name: batch\n    keys: [batch-key-0001]\n    limits: { tokens_per_minute: ${tokensPerMinute}, tokens_per_day: 100000000 }\n`);
}

async function replicas(count: number, env: Record<string, string | undefined>): Promise<ProxyProcess[]> {
  const started = await Promise.all(Array.from({ length: count }, () => startProxy(baseEnv(env))));
  await Promise.all(started.map((proxy) => proxy.waitForHealth()));
  return started;
}

describe("Limits across replicas", () => {
  const usage = new UsageUpstream();
  beforeAll(() => void usage.start());
  afterAll(() => usage.stop());

  test("three replicas sharing Redis hold one tokens_per_minute: 30 clients offering 3 x the limit get it (0.9-1.05 x), not 3 x; alone each replica admits its own", async () => {
    const limit = 18_000;
    const redis = await new RedisServer().start();
    const shared = await replicas(3, { API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: callersFile(limit), AUTH_PROXY_REDIS_URL: redis.url });
    const from = usage.received.length;
    // 30 clients, one request a second each for 10 s: 300 x 180 tokens, 3 x the limit within one minute.
    const offered = await offerLoad(shared.map((proxy) => proxy.url), "batch-key-0001", 30, 1000, 10_000);
    const admitted = usage.received.slice(from).map((request) => request.at);
    expect(offered.filter((request) => request.status === 200).length).toBe(admitted.length);
    expect(offered.every((request) => request.status === 200 || request.code === "caller_rate_limited")).toBe(true);
    expect(mostInAnyMinute(admitted, USED)).toBeLessThanOrEqual(1.05 * limit);
    expect(admitted.length * USED).toBeGreaterThanOrEqual(0.9 * limit);
    // Every replica admitted some and refused some: one limit, wherever a request lands.
    for (let replica = 0; replica < 3; replica += 1) expect(new Set(offered.filter((request) => request.replica === replica).map((request) => request.status))).toEqual(new Set([200, 429]));
    await Promise.all(shared.map((proxy) => proxy.stop()));
    await redis.kill();

    const alone = await replicas(3, { API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: callersFile(limit) });
    const aloneFrom = usage.received.length;
    await offerLoad(alone.map((proxy) => proxy.url), "batch-key-0001", 30, 1000, 10_000);
    const aloneAdmitted = usage.received.length - aloneFrom;
    // What the README says of replicas without Redis: each holds the limit alone, so three admit about three times it.
    expect(aloneAdmitted * USED).toBeGreaterThan(2.5 * limit);
    expect(aloneAdmitted * USED).toBeLessThanOrEqual(3 * 1.05 * limit);
    await Promise.all(alone.map((proxy) => proxy.stop()));
  }, 60_000);

  for (const mode of ["open", "closed"] as const) {
    test(`Redis killed and restarted under load, fail ${mode}: ${mode === "open" ? "serving goes on from local counts" : "limited callers get 503 limits_unavailable"}, no request waits 1 s on the store, the shared counts resume within 5 s and are exact after`, async () => {
      const redis = await new RedisServer().start();
      const proxies = await replicas(3, { API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: callersFile(100_000_000), AUTH_PROXY_REDIS_URL: redis.url, AUTH_PROXY_LIMITS_ON_STORE_FAILURE: mode });
      const { offered, during, lines, countedInRedis, killedAt, restartedAt } = await outageUnderLoad(proxies, redis, 100, 12, 3000, 3000);
      expect(Math.max(...offered.map((request) => request.tookMs))).toBeLessThan(1000);
      expect(during.length).toBeGreaterThan(100);
      if (mode === "open") expect(offered.every((request) => request.status === 200)).toBe(true);
      else {
        expect(during.filter((request) => request.status !== 503 || request.code !== "limits_unavailable").map((request) => `${request.status} ${request.code} +${request.startedAt - killedAt} ms`)).toEqual([]);
        expect(offered.filter((request) => request.startedAt < killedAt - 100).every((request) => request.status === 200)).toBe(true);
      }
      // Within 5 s of its return every replica counts in Redis again.
      const after = lines.filter((line) => Date.parse(line.time) > restartedAt + 5000);
      expect(after.length).toBeGreaterThan(100);
      expect(after.every((line) => line.limits === "redis")).toBe(true);
      // The totals in the restarted Redis are the usage of the requests it admitted: nothing from before it died, nothing counted twice.
      expect(await redis.totals("batch")).toEqual({ day: countedInRedis * USED, month: 0 });
      for (const proxy of proxies) expect(proxy.stdout).toContain('"msg":"limits store unreachable"');
      // Every admission's reply was its own (the script echoes each call's nonce; oven-sh/bun#27861 mixed them up after reconnects).
      for (const proxy of proxies) expect(proxy.stdout).not.toContain("answered another command's call");
      await Promise.all(proxies.map((proxy) => proxy.stop()));
      await redis.kill();
    }, 60_000);
  }
});
