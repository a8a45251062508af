/**
 * Observability (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/metrics.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { randomBytes, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import packageJson from "../package.json" with { type: "json" };
import { deploymentLabel, newMetrics } from "../src/metrics.ts";
import { freePort, memoryKiB, ROOT, startProxy, type ProxyProcess } from "../test/harness.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import { appCertificate, baseEnv, certs, describeSecrets, entra, METRIC_FAMILIES, proxyBodies, rejection, upstream, useSuite } from "../test/suite.ts";

useSuite();

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
    expect(valueOf(samples, "auth_proxy_upstream_ratelimit_remaining", { deployment: "gpt-4o", kind: "requests" })).toBe(99);
    expect(valueOf(samples, "auth_proxy_upstream_ratelimit_remaining", { deployment: "gpt-4o", kind: "tokens" })).toBe(12345);
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
    const expressions: string[] = dashboard.panels.flatMap((panel: any) => (panel.targets ?? []).map((target: any) => target.expr));
    expect(dashboard.panels.length).toBeGreaterThanOrEqual(8);
    const queried = new Set(expressions.flatMap((expr) => expr.match(/\b(auth_proxy|process)_[a-z_]+/g) ?? []));
    expect(queried.size).toBeGreaterThanOrEqual(12);
    // A pool's families exist only with a pool: a second proxy with two backends (API_BASE_URL as a list) has them.
    const pool = await startProxy(baseEnv({ API_BASE_URL: `${upstream.url},${upstream.url}/second` }));
    await pool.waitForHealth();
    await (await fetch(`${pool.url}/openai/models`)).text();
    // The limits' families exist with a limited caller, its rejections once one is refused.
    const limited = await startProxy(baseEnv({ AUTH_PROXY_CALLERS: certs.write("metrics-callers.yaml", "callers:\n  - name: one\n    keys: [one-key-0001]\n    limits: { requests_per_minute: 1 }\n") }));
    await limited.waitForHealth();
    for (let request = 0; request < 2; request += 1) await (await fetch(`${limited.url}/openai/models`, { headers: { "api-key": "one-key-0001" } })).text();
    const scraped = new Set([...(await metricsOf()).samples, ...(await metricsOf(pool.url)).samples, ...(await metricsOf(limited.url)).samples].map((sample) => sample.name));
    for (const name of queried) expect(scraped.has(name), name).toBe(true);
    await pool.stop();
    await limited.stop();
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
    // Twice, its higher reading the baseline: the collector's timing alone moves RSS by megabytes between readings.
    await load(10_000, () => "warm");
    const warm = rss();
    await load(10_000, () => "warm");
    const before = Math.max(warm, rss());
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

describe("Pure pieces", () => {
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
});

describeSecrets();
