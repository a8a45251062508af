/**
 * `make soak`'s limits runs, at the issue's length (src/limits-replicas.test.ts
 * runs them scaled to seconds): three proxy processes (the compiled binary),
 * one real redis-server, 30 clients of one caller spread across them for
 * 120 s offering 3 x its tokens_per_minute, an upstream answering known
 * usage (180 tokens a request, 215 reserved). Then the same without Redis,
 * and Redis SIGKILLed at 20 s and restarted at 30 s of a 60 s run, fail
 * open and fail closed. Prints a Markdown table for bench/RESULTS.md.
 *
 * Usage: bun bench/limits-soak.ts [binary]   (default dist/auth-proxy)
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { benchEntra } from "./entra.ts";
import { type ProxyProcess, ROOT, startProxy } from "../test/harness.ts";
import { ANSWER_USAGE, mostInAnyMinute, type Offered, offerLoad, outageUnderLoad, RedisServer, UsageUpstream } from "../test/limits.ts";

const binary = process.argv[2] ?? join(ROOT, "dist/auth-proxy");
const USED = ANSWER_USAGE.prompt + ANSWER_USAGE.completion;
const LIMIT = 60_000;
const work = mkdtempSync(join(tmpdir(), "auth-proxy-limits-soak-"));
const { entra, env: identityEnv } = benchEntra(work);
const usage = new UsageUpstream().start();
const callers = join(work, "callers.yaml");
writeFileSync(callers, `callers:\n  - name: batch\n    keys: [batch-key-0001]\n    limits: { tokens_per_minute: ${LIMIT}, tokens_per_day: 1000000000 }\n`);
const rows: string[] = [];

async function replicas(env: Record<string, string | undefined>): Promise<ProxyProcess[]> {
  const started = await Promise.all([0, 1, 2].map(() => startProxy({ ...identityEnv, API_BASE_URL: usage.url, AUTH_PROXY_CALLERS: callers, LOG_LEVEL: "info", ...env }, [], [binary])));
  await Promise.all(started.map((proxy) => proxy.waitForHealth()));
  return started;
}

/** 3 x the limit a minute: 1,000 requests of 180 tokens, from 30 clients, one every 1.8 s each. */
async function offered(proxies: ProxyProcess[], seconds: number): Promise<{ offered: Offered[]; arrivals: number[] }> {
  const from = usage.received.length;
  const load = await offerLoad(proxies.map((proxy) => proxy.url), "batch-key-0001", 30, 1800, seconds * 1000);
  return { offered: load, arrivals: usage.received.slice(from).map((request) => request.at) };
}

try {
  for (const shared of [true, false]) {
    const redis = shared ? await new RedisServer().start() : undefined;
    const proxies = await replicas({ AUTH_PROXY_REDIS_URL: redis?.url });
    const { offered: load, arrivals } = await offered(proxies, 120);
    const most = mostInAnyMinute(arrivals, USED);
    const perMinute = (arrivals.length * USED) / 2;
    rows.push(`| 3 replicas, ${shared ? "Redis" : "no Redis (each alone)"}, 120 s | ${load.length} offered (${((load.length * USED) / 2 / LIMIT).toFixed(2)} x the limit a minute) | ${arrivals.length} admitted | most in any 60 s: ${most} tokens = ${(most / LIMIT).toFixed(3)} x | ${(perMinute / LIMIT).toFixed(3)} x the limit a minute overall | p99 ${p99(load)} ms |`);
    await Promise.all(proxies.map((proxy) => proxy.stop()));
    await redis?.kill();
  }
  for (const mode of ["open", "closed"] as const) {
    const redis = await new RedisServer().start();
    const proxies = await replicas({ AUTH_PROXY_REDIS_URL: redis.url, AUTH_PROXY_LIMITS_ON_STORE_FAILURE: mode });
    // 3 x the limit a minute for 60 s (one request every 1.8 s a client); Redis down from 20 s to 30 s.
    const { offered: load, during, lines, countedInRedis, restartedAt } = await outageUnderLoad(proxies, redis, 1800, 60, 20_000, 10_000);
    const firstRedis = Math.min(...[0, 1, 2].map((replica) => Math.min(...proxies[replica]!.stdout.split("\n").filter((line) => line.includes('"limits":"redis"')).map((line) => Date.parse((JSON.parse(line) as { time: string }).time)).filter((time) => time > restartedAt))));
    const lastLocal = Math.max(...lines.filter((line) => line.limits === "memory").map((line) => Date.parse(line.time)));
    const totals = await redis.totals("batch");
    const statuses = [...new Set(during.map((request) => request.status))].join("/");
    rows.push(
      `| Redis SIGKILL at 20 s, back at 30 s, fail ${mode} | ${load.length} offered | while away: ${during.length} requests, status ${statuses} | longest wait ${Math.max(...load.map((request) => request.tookMs))} ms | Redis again ${((Math.max(firstRedis, lastLocal) - restartedAt) / 1000).toFixed(1)} s after its return (${lastLocal === -Infinity ? "no local count" : `last local count ${((lastLocal - restartedAt) / 1000).toFixed(1)} s after`}) | Redis day total ${totals.day} = ${countedInRedis} x ${USED}: ${totals.day === countedInRedis * USED ? "exact" : "WRONG"} |`,
    );
    const mixedUp = proxies.filter((proxy) => proxy.stdout.includes("answered another command's call")).length;
    if (mixedUp > 0) rows.push(`| fail ${mode}: ${mixedUp} replicas saw a reply that was not their call's |`);
    await Promise.all(proxies.map((proxy) => proxy.stop()));
    await redis.kill();
  }
  console.log(rows.join("\n"));
} finally {
  usage.stop();
  entra.stop();
  rmSync(work, { recursive: true, force: true });
}
process.exit(0);

function p99(load: Offered[]): number {
  const sorted = load.map((request) => request.tookMs).sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length * 0.99)] ?? 0;
}
