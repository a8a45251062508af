/**
 * Logs (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/log.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { closeSync, constants as fsConstants, openSync, readSync } from "node:fs";
import { join } from "node:path";
import packageJson from "../package.json" with { type: "json" };
import { asciiBytes, encodeBytes, encodeInteger, encodeJsonString, encodeMillis } from "../src/log.ts";
import { allOutput, type LogLine, ROUTES_MODE, startProxy, type ProxyProcess } from "../test/harness.ts";
import { scrape, valueOf } from "../test/prometheus.ts";
import { appCertificate, baseEnv, certs, CLIENT_ID, describeSecrets, entra, OPENAI_SCOPE, thumbprintOf, upstream, useSuite, waitFor } from "../test/suite.ts";

useSuite();

describe("Logs", () => {
  let proxy: ProxyProcess;
  let sentAt = 0;
  let receivedAt = 0;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
    sentAt = Date.now();
    await (await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&secret=query`, { method: "POST", body: "{}" })).text();
    receivedAt = Date.now();
    await proxy.waitForLog((line) => line.msg === "request"); // log lines are written once per event-loop turn
  });
  afterAll(() => proxy.stop());

  test("an access line carries the wall-clock time its response ended, though it is encoded at the turn's end", () => {
    const time = Date.parse(String(proxy.lines.find((line) => line.msg === "request")!.time));
    // A millisecond either way: both clocks are read to the millisecond.
    expect(time).toBeGreaterThanOrEqual(sentAt - 1);
    expect(time).toBeLessThanOrEqual(receivedAt + 1);
  });

  test("every line is one JSON object with time, level and msg", () => {
    const lines = proxy.stdout.trim().split("\n");
    expect(lines.length).toBeGreaterThanOrEqual(3);
    for (const line of lines) {
      const entry = JSON.parse(line);
      expect(Number.isNaN(Date.parse(entry.time))).toBe(false);
      expect(["debug", "info", "warn", "error"]).toContain(entry.level);
      expect(typeof entry.msg).toBe("string");
    }
  });

  test("the startup line names version, listen address, upstream, client, tenant and certificate thumbprint", () => {
    const started = proxy.lines.find((line) => line.msg === "auth-proxy started")!;
    expect(started).toMatchObject({
      // A compiled binary adds the commit it was built from: 0.1.0+81ed68d24f37.
      version: expect.stringMatching(new RegExp(`^${packageJson.version.replaceAll(".", "\\.")}(\\+[0-9a-f]+(-dirty)?)?$`)),
      listen: `127.0.0.1:${proxy.port}`,
      // AUTH_PROXY_TEST_ROUTES=1 runs the suite with API_BASE_URL as a routes file: the line lists that route instead.
      ...(ROUTES_MODE ? { routes: [{ prefix: "/", scope: OPENAI_SCOPE, backends: [upstream.url] }] } : { upstream: upstream.url }),
      client_id: CLIENT_ID,
      tenant_id: entra.tenantId,
      certificate_thumbprint: thumbprintOf(appCertificate.certificatePem),
    });
  });

  test("a token refresh logs its expiry", () => {
    const acquired = proxy.lines.find((line) => line.msg === "token acquired")!;
    expect(Date.parse(String(acquired.expires_on))).toBeGreaterThan(Date.now());
  });

  test("each request has an access line with method, path without query, status and duration", () => {
    const access = proxy.lines.find((line) => line.msg === "request")!;
    expect(access).toMatchObject({ level: "info", method: "POST", path: "/openai/deployments/gpt-4o/chat/completions", status: 200 });
    expect(typeof access.duration_ms).toBe("number");
    expect(proxy.stdout).not.toContain("secret=query");
  });

  /** A fifo for the proxy's stdout: the test holds the reading end and decides when, or whether, to read. */
  function fifoStdout(): { readerFd: number; writerFd: number } {
    const path = join(certs.dir, `stdout-${randomBytes(4).toString("hex")}.fifo`);
    expect(Bun.spawnSync(["mkfifo", path]).exitCode).toBe(0);
    const readerFd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    return { readerFd, writerFd: openSync(path, fsConstants.O_WRONLY) };
  }

  /** What the fifo holds now. */
  function readFifo(fd: number): string {
    const buffer = Buffer.alloc(64 * 1024);
    let text = "";
    for (;;) {
      let read = 0;
      try {
        read = readSync(fd, buffer, 0, buffer.length, null);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "EAGAIN") break;
        throw error;
      }
      if (read === 0) break;
      text += buffer.toString("utf8", 0, read);
    }
    allOutput.push(text);
    return text;
  }

  /** `total` forwarded requests, 50 at a time, each of which must be answered within 5 s. */
  async function forwardedRequests(proxy: ProxyProcess, total: number): Promise<void> {
    for (let sent = 0; sent < total; sent += 50) {
      const statuses = await Promise.all(
        Array.from({ length: 50 }, async () => {
          const response = await fetch(`${proxy.url}/openai/models`, { signal: AbortSignal.timeout(5000) });
          await response.arrayBuffer();
          return response.status;
        }),
      );
      expect(new Set(statuses)).toEqual(new Set([200]));
    }
  }

  test("a stdout nobody reads never stops serving: lines past the buffer are dropped, counted, and said once the reader is back", async () => {
    const fifo = fifoStdout();
    const reader = await startProxy(baseEnv(), [], undefined, fifo.writerFd);
    closeSync(fifo.writerFd);
    await reader.waitForHealth();
    // 3,000 access lines: the pipe's 64 KiB hold about 190 of them, the proxy's buffer about 700 more.
    await forwardedRequests(reader, 3000);
    expect((await fetch(`${reader.url}/live`, { signal: AbortSignal.timeout(1000) })).status).toBe(200);
    const dropped = valueOf((await scrape(reader.url)).samples, "auth_proxy_log_lines_dropped_total")!;
    expect(dropped).toBeGreaterThan(1000);
    let text = "";
    const deadline = Date.now() + 10_000;
    while (!text.includes('"msg":"log lines dropped') && Date.now() < deadline) {
      text += readFifo(fifo.readerFd);
      await Bun.sleep(20);
    }
    await Bun.sleep(200);
    text += readFifo(fifo.readerFd);
    // Every line that arrives is whole: none was cut where the pipe filled.
    const lines = text.slice(0, text.lastIndexOf("\n")).split("\n").map((line) => JSON.parse(line) as LogLine);
    const warnings = lines.filter((line) => line.msg === "log lines dropped: stdout was not read fast enough");
    expect(warnings.length).toBeGreaterThanOrEqual(1);
    expect(warnings[0]!.level).toBe("warn");
    const reported = warnings.reduce((sum, line) => sum + (line.dropped as number), 0);
    expect(reported).toBe(dropped);
    // Each request has its line or is counted as dropped: no line is lost unsaid.
    expect(lines.filter((line) => line.msg === "request").length + reported).toBe(3000);
    await reader.stop();
    closeSync(fifo.readerFd);
  }, 60_000);

  test("a closed stdout (EPIPE) never stops serving: every line from then on is dropped and counted", async () => {
    const fifo = fifoStdout();
    const orphan = await startProxy(baseEnv(), [], undefined, fifo.writerFd);
    closeSync(fifo.writerFd);
    await orphan.waitForHealth();
    closeSync(fifo.readerFd);
    await forwardedRequests(orphan, 200);
    expect((await fetch(`${orphan.url}/live`)).status).toBe(200);
    // The last lines are encoded (and dropped) at the turn's write.
    const dropped = async () => valueOf((await scrape(orphan.url)).samples, "auth_proxy_log_lines_dropped_total")! >= 200;
    await waitFor(dropped, 2000);
    expect(orphan.exitCode).toBeNull();
    await orphan.stop();
  });

  test("LOG_LEVEL=warn drops the access lines", async () => {
    const quiet = await startProxy(baseEnv({ LOG_LEVEL: "warn" }));
    await quiet.waitForHealth();
    await (await fetch(`${quiet.url}/openai/models`)).text();
    expect(quiet.lines.filter((line) => line.level === "info")).toEqual([]);
    await quiet.stop();
  });
});

describe("Pure pieces", () => {
  test("access-line encoding: numbers as JSON writes them, milliseconds rounded to hundredths, strings escaped as JSON must", () => {
    const encoded = (encode: (buffer: Buffer, at: number) => number) => {
      const buffer = Buffer.alloc(1024, "#");
      const end = encode(buffer, 3);
      expect(buffer.subarray(0, 3).toString()).toBe("###");
      expect(String.fromCharCode(buffer[end]!)).toBe("#");
      return buffer.toString("utf8", 3, end);
    };
    for (const value of [0, 7, 10, 99, 200, 499, 1_000_001, 2 ** 40 + 3]) expect(encoded((b, at) => encodeInteger(b, at, value))).toBe(String(value));
    for (const ms of [0, 0.004, 0.005, 0.1, 0.123, 1.05, 1.5, 2, 12.3456, 99.999, 1234.5678, 600_000.126]) {
      const text = encoded((b, at) => encodeMillis(b, at, ms));
      expect(JSON.parse(text)).toBe(Math.round(ms * 100) / 100);
      expect(text).toBe(String(Math.round(ms * 100) / 100));
    }
    expect(encoded((b, at) => encodeMillis(b, at, -0.2))).toBe("0");
    for (const text of ["/openai/deployments/gpt-4o/chat/completions", "", '/a"b', "/a\\b", "/tab\there", "/nul\u0000", "/ü/✓", "/\ud800", "~\u007f"]) {
      expect(JSON.parse(encoded((b, at) => encodeJsonString(b, at, text, text.length)))).toBe(text);
    }
    expect(encoded((b, at) => encodeJsonString(b, at, "/path?query", 5))).toBe('"/path"');
    expect(encoded((b, at) => encodeJsonString(b, at, '/a"b?q', 4))).toBe('"/a\\"b"');
    expect(encoded((b, at) => encodeBytes(b, at, asciiBytes(',"name":')))).toBe(',"name":');
  });
});

describeSecrets();
