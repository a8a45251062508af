/**
 * `make soak`: auth-proxy (the compiled binary) held under load, hostile
 * input and time, against the bench upstream and a fake Entra ID, all on
 * loopback. Every part is bounded in count and time and checks that nothing
 * failed or was lost; memory is read from /proc. Prints a markdown report
 * and writes it into bench/RESULTS.md between the soak markers.
 *
 * Usage: bun bench/soak.ts   (SOAK_LOAD_MINUTES=10, SOAK_STREAMS=10000,
 * SOAK_PARTS=ABCDE to run some parts only, SOAK_PROXY_BIN to soak another binary)
 */
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { CertificateFactory } from "../test/certificates.ts";
import { FakeEntraId } from "../test/fakes.ts";
import { freePort, memoryKiB, ROOT, waitForStatus as waitFor } from "../test/harness.ts";
import { chunkedBodyReader } from "../test/http.ts";

const LOAD_MINUTES = Number(process.env.SOAK_LOAD_MINUTES ?? 10);
const PROXY_BINARY = process.env.SOAK_PROXY_BIN ?? join(ROOT, "dist/auth-proxy");
const PARTS = process.env.SOAK_PARTS ?? "ABCDE";
const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/** Each proxied stream holds two sockets in the proxy (client and upstream): the fd limit caps the count. */
const FD_LIMIT = Number(execFileSync("bash", ["-c", "ulimit -n"]).toString().trim());
const STREAMS = Math.min(Number(process.env.SOAK_STREAMS ?? 10_000), Math.floor((FD_LIMIT - 200) / 200) * 100);
const report: string[] = [];
const failures: string[] = [];
const children: Subprocess[] = [];

function note(line: string): void {
  console.error(line);
  report.push(line);
}

function check(ok: boolean, what: string): void {
  if (!ok) failures.push(what);
}

const mb = (kib: number) => `${(kib / 1024).toFixed(1)} MB`;

// ---------------------------------------------------------------- setup

const certs = new CertificateFactory();
const tls = certs.serverTls();
const app = certs.client("soak-app");
const entra = new FakeEntraId(tls).start();
entra.register({ clientId: CLIENT_ID, certificates: [app.certificatePem] });

const upstreamPort = freePort();
children.push(Bun.spawn([process.execPath, join(ROOT, "bench/upstream.ts"), String(upstreamPort)], { stdout: "ignore", stderr: "inherit" }));
const upstreamUrl = `http://127.0.0.1:${upstreamPort}`;
await waitFor(`${upstreamUrl}/`);


async function upstreamStats(reset = false): Promise<{ started: number; completed: number; abandoned: number }> {
  return (await fetch(`${upstreamUrl}/stats${reset ? "?reset" : ""}`)).json() as Promise<{ started: number; completed: number; abandoned: number }>;
}

/** A fresh proxy, so each part's memory figures have one cause. */
async function startProxy(): Promise<{ port: number; pid: number; child: Subprocess }> {
  const port = freePort();
  const child = Bun.spawn([PROXY_BINARY], {
    env: {
      PATH: process.env.PATH,
      AZURE_CLIENT_ID: CLIENT_ID,
      AZURE_TENANT_ID: entra.tenantId,
      AZURE_CERTIFICATE_PATH: app.pemPath,
      API_BASE_URL: upstreamUrl,
      AZURE_AUTHORITY_HOST: entra.authorityHost,
      NODE_EXTRA_CA_CERTS: tls.caPath,
      HOST: "127.0.0.1",
      PORT: String(port),
      BUN_CONFIG_MAX_HTTP_REQUESTS: "65535",
    },
    stdout: "ignore",
    stderr: "inherit",
  });
  children.push(child);
  await waitFor(`http://127.0.0.1:${port}/health`);
  await Bun.sleep(500);
  return { port, pid: child.pid, child };
}

// ---------------------------------------------------------------- raw HTTP clients

interface StreamResult {
  ok: boolean;
  events: number;
  firstEventMs: number;
}

/**
 * One SSE stream over its own connection: complete when every event and the
 * final `[DONE]` arrived in order and the chunked body ended properly.
 * With `dropAfterFirstEvent` the client disconnects once the first event is in.
 */
function sseStream(port: number, target: string, expectedEvents: number, dropAfterFirstEvent = false): Promise<StreamResult> {
  return new Promise((resolve) => {
    const startedAt = performance.now();
    let firstEventMs = 0;
    const parts: Buffer[] = [];
    const response = chunkedBodyReader((bytes) => parts.push(bytes));
    const socket = net.connect(port, "127.0.0.1", () => socket.write(`GET ${target} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n`));
    socket.on("data", (chunk: Buffer) => {
      response.push(chunk);
      if (firstEventMs === 0 && chunk.includes("data: ")) {
        firstEventMs = performance.now() - startedAt;
        if (dropAfterFirstEvent) socket.destroy();
      }
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      // A body cut short (no final zero-length chunk) counts as none.
      const body = response.ended ? Buffer.concat(parts).toString("utf8") : undefined;
      const status = response.head.slice(0, 12);
      const events = body === undefined ? 0 : (body.match(/data: \{"index":/g) ?? []).length;
      const inOrder = body !== undefined && Array.from({ length: events }, (_, index) => body.indexOf(`{"index":${index},`)).every((at, index, all) => at !== -1 && (index === 0 || at > all[index - 1]!));
      resolve({ ok: status === "HTTP/1.1 200" && events === expectedEvents && inOrder && body!.endsWith("data: [DONE]\n\n"), events, firstEventMs });
    });
  });
}

/** Sends `request` as is on a fresh connection; resolves with the status code the proxy answered (0: none). */
function rawStatus(port: number, request: string): Promise<number> {
  return new Promise((resolve) => {
    let head = "";
    const socket = net.connect(port, "127.0.0.1", () => socket.write(request));
    socket.setTimeout(10_000, () => socket.destroy());
    socket.on("data", (chunk: Buffer) => {
      head += chunk.toString("latin1");
      if (head.includes("\r\n")) socket.destroy();
    });
    socket.on("error", () => {});
    socket.on("close", () => resolve(Number(head.split(" ")[1] ?? 0) || 0));
  });
}

/** Runs `tasks` with at most `width` at once, starting them `rampMs` apart in groups of `width`. */
async function inWaves<T>(count: number, width: number, task: (index: number) => Promise<T>, rampMs = 0): Promise<T[]> {
  const results: Promise<T>[] = [];
  for (let index = 0; index < count; index += width) {
    for (let offset = index; offset < Math.min(count, index + width); offset++) results.push(task(offset));
    if (rampMs) await Bun.sleep(rampMs);
  }
  return Promise.all(results);
}

// ---------------------------------------------------------------- A: 1,000 streams held for 60 s

if (PARTS.includes("A")) {
  const proxy = await startProxy();
  await upstreamStats(true);
  const startedAt = performance.now();
  const results = await inWaves(1000, 100, () => sseStream(proxy.port, "/hold?events=60&interval=1000", 60), 50);
  const failed = results.filter((result) => !result.ok).length;
  const stats = await upstreamStats();
  note(`- **1,000 concurrent SSE streams held 60 s** (60 events 1 s apart, then [DONE]): ${1000 - failed}/1000 complete, in order and untruncated, in ${((performance.now() - startedAt) / 1000).toFixed(1)} s; upstream saw ${stats.completed} completed, ${stats.abandoned} abandoned; proxy peak RSS ${mb(memoryKiB(proxy.pid, "VmHWM"))}.`);
  check(failed === 0 && stats.completed === 1000, "1,000 held streams");
  proxy.child.kill();
}

// ---------------------------------------------------------------- B: 10,000 concurrent streams

if (PARTS.includes("B")) {
  const proxy = await startProxy();
  const coldIdle = memoryKiB(proxy.pid, "VmRSS");
  // Idle as a proxy in service idles: after its first requests and streams (code compiled, upstream pool open), not only after start.
  await inWaves(200, 200, () => sseStream(proxy.port, "/hold?events=2&interval=100", 2));
  await Promise.all(Array.from({ length: 200 }, () => fetch(`http://127.0.0.1:${proxy.port}/openai/deployments/soak/chat/completions`, { method: "POST", body: "{}" }).then((response) => response.text())));
  await Bun.sleep(5000);
  const idle = memoryKiB(proxy.pid, "VmRSS");
  const idleAnon = memoryKiB(proxy.pid, "RssAnon");
  const idleFile = memoryKiB(proxy.pid, "RssFile");
  await upstreamStats(true);
  let peakAnon = 0;
  let peakFile = 0;
  const sampler = setInterval(() => {
    peakAnon = Math.max(peakAnon, memoryKiB(proxy.pid, "RssAnon"));
    peakFile = Math.max(peakFile, memoryKiB(proxy.pid, "RssFile"));
  }, 100);
  const startedAt = performance.now();
  // Opened 500 every 100 ms so the listen backlog is never the bottleneck; each stream outlives the ramp.
  const results = await inWaves(STREAMS, 500, () => sseStream(proxy.port, "/hold?events=10&interval=1500", 10), 100);
  const elapsed = (performance.now() - startedAt) / 1000;
  const failed = results.filter((result) => !result.ok).length;
  const peak = memoryKiB(proxy.pid, "VmHWM");
  clearInterval(sampler);
  await Bun.sleep(10_000);
  const after10s = memoryKiB(proxy.pid, "VmRSS");
  await Bun.sleep(20_000);
  const after = memoryKiB(proxy.pid, "VmRSS");
  const split = `anonymous memory ${mb(idleAnon)} idle, ${mb(peakAnon)} at peak, ${mb(memoryKiB(proxy.pid, "RssAnon"))} after; the binary's mapped pages ${mb(idleFile)}, ${mb(peakFile)}, ${mb(memoryKiB(proxy.pid, "RssFile"))}`;
  const stats = await upstreamStats();
  const limitNote = STREAMS < 10_000 ? ` (not 10,000: this machine's hard limit of ${FD_LIMIT} open files a process, which cannot be raised here, caps one proxy at ${STREAMS} streams of two sockets each)` : "";
  note(`- **${STREAMS.toLocaleString("en-US")} concurrent SSE streams**${limitNote}: ${STREAMS - failed}/${STREAMS} complete in ${elapsed.toFixed(1)} s (upstream: ${stats.completed} completed); proxy RSS idle ${mb(idle)} (${mb(coldIdle)} before its first request), peak ${mb(peak)}, 10 s after ${mb(after10s)}, 30 s after ${mb(after)} (${((after / idle - 1) * 100).toFixed(0)} % over idle; ${split}). Target: peak ≤ 300 MB, after within 20 % of idle.`);
  check(failed === 0, `${STREAMS} concurrent streams`);
  check(peak <= 300 * 1024, "peak RSS with 10,000 streams ≤ 300 MB");
  check(after <= idle * 1.2, "RSS after 10,000 streams within 20 % of idle");
  proxy.child.kill();
}

// ---------------------------------------------------------------- C: 10,000 clients that disconnect mid-stream

if (PARTS.includes("C")) {
  const proxy = await startProxy();
  // One warm-up wave, so the figures compare a proxy that has already served streams with itself.
  await inWaves(1000, 1000, () => sseStream(proxy.port, "/hold?events=100&interval=200", 100, true));
  await Bun.sleep(3000);
  await upstreamStats(true);
  const before = memoryKiB(proxy.pid, "VmRSS");
  for (let wave = 0; wave < 10; wave++) {
    await inWaves(1000, 1000, () => sseStream(proxy.port, "/hold?events=100&interval=200", 100, true));
  }
  // The upstream's streams notice the abort at their next event (200 ms apart).
  let stats = await upstreamStats();
  for (let waited = 0; stats.abandoned < stats.started && waited < 20; waited++) {
    await Bun.sleep(500);
    stats = await upstreamStats();
  }
  await Bun.sleep(5000);
  const after = memoryKiB(proxy.pid, "VmRSS");
  note(`- **10,000 clients that disconnect after the first event**, 10 waves of 1,000: the upstream saw ${stats.started} requests, ${stats.abandoned} aborted, ${stats.completed} run to the end; proxy RSS ${mb(before)} before, ${mb(after)} 5 s after (${((after - before) / 1024).toFixed(1)} MB). Target: every upstream request aborted, RSS within 15 MB.`);
  check(stats.started === 10_000 && stats.abandoned === 10_000, "every disconnected client's upstream request aborted");
  check(after - before <= 15 * 1024, "RSS after disconnect waves within 15 MB");
  proxy.child.kill();
}

// ---------------------------------------------------------------- D: 2,000 malformed requests

if (PARTS.includes("D")) {
  const proxy = await startProxy();
  const malformed: [string, string][] = [
    ["Content-Length with Transfer-Encoding", "POST /openai/x HTTP/1.1\r\nHost: soak\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    ["bare LF line ends", "GET /openai/x HTTP/1.1\nHost: soak\n\n"],
    ["obs-fold header", "GET /openai/x HTTP/1.1\r\nHost: soak\r\nX-Folded: a\r\n  b\r\n\r\n"],
    ["NUL in a header", "GET /openai/x HTTP/1.1\r\nHost: soak\r\nX-Nul: a\0b\r\n\r\n"],
    ["100 KB header", `GET /openai/x HTTP/1.1\r\nHost: soak\r\nX-Big: ${"a".repeat(100_000)}\r\n\r\n`],
    ["invalid method", "G(T /openai/x HTTP/1.1\r\nHost: soak\r\n\r\n"],
    ["CONNECT to another host", "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"],
    ["TRACE", "TRACE /openai/x HTTP/1.1\r\nHost: soak\r\n\r\n"],
  ];
  const before = memoryKiB(proxy.pid, "VmRSS");
  const statsBefore = await upstreamStats();
  const statuses = new Map<string, Map<number, number>>();
  await inWaves(2000, 50, async (index) => {
    const [kind, request] = malformed[index % malformed.length]!;
    const status = await rawStatus(proxy.port, request);
    const counts = statuses.get(kind) ?? new Map<number, number>();
    counts.set(status, (counts.get(status) ?? 0) + 1);
    statuses.set(kind, counts);
  });
  await Bun.sleep(2000);
  const after = memoryKiB(proxy.pid, "VmRSS");
  const live = (await fetch(`http://127.0.0.1:${proxy.port}/live`)).status;
  const forwarded = (await fetch(`http://127.0.0.1:${proxy.port}/openai/deployments/x/chat/completions`, { method: "POST", body: "{}" })).status;
  const reachedUpstream = (await fetch(`${upstreamUrl}/stats`).then((response) => response.json()) as { connections: number }).connections;
  const summary = [...statuses].map(([kind, counts]) => `${kind}: ${[...counts].map(([status, count]) => `${count}× ${status || "closed"}`).join(", ")}`).join("; ");
  note(`- **2,000 malformed requests** (${summary}): afterwards /live ${live}, a forwarded POST ${forwarded}; proxy RSS ${mb(before)} → ${mb(after)} (${((after - before) / 1024).toFixed(1)} MB). Target: still serving, RSS growth under 10 MB, none answered 2xx.`);
  const anySuccess = [...statuses.values()].some((counts) => [...counts.keys()].some((status) => status >= 200 && status < 300));
  check(!anySuccess && live === 200 && forwarded === 200, "malformed requests refused, proxy still serving");
  check(after - before < 10 * 1024, "RSS growth after malformed requests under 10 MB");
  void statsBefore;
  void reachedUpstream;
  proxy.child.kill();
}

// ---------------------------------------------------------------- E: minutes of load with 20 s tokens, and long silences

if (PARTS.includes("E")) {
  entra.tokenLifetimeSeconds = 20;
  const proxy = await startProxy();
  const base = `http://127.0.0.1:${proxy.port}`;
  const until = Date.now() + LOAD_MINUTES * 60_000;
  const counts = { requests: 0, streams: 0, failed: 0 };
  const failuresSeen = new Map<string, number>();
  const fail = (why: string) => {
    counts.failed += 1;
    failuresSeen.set(why, (failuresSeen.get(why) ?? 0) + 1);
  };
  // The slow cases of the contract, run through the same proxy during the load.
  const silentFirstByte = fetchRaw(proxy.port, "/silent?ms=130000");
  const silentMidStream = fetchRaw(proxy.port, "/silent-stream?ms=310000");
  const tenMinuteStream = LOAD_MINUTES >= 10 ? sseStream(proxy.port, "/hold?events=121&interval=5000", 121) : Promise.resolve({ ok: true, events: 0, firstEventMs: 0 });
  const workers = Array.from({ length: 8 }, async (_, worker) => {
    for (let iteration = 0; Date.now() < until; iteration++) {
      try {
        if ((iteration + worker) % 10 === 0) {
          const result = await sseStream(proxy.port, "/hold?events=5&interval=50", 5);
          counts.streams += 1;
          if (!result.ok) fail("stream incomplete");
        } else {
          const response = await fetch(`${base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: '{"messages":[]}' });
          const body = await response.text();
          counts.requests += 1;
          if (response.status !== 200 || !body.includes("chatcmpl-bench")) fail(`HTTP ${response.status}`);
        }
      } catch (error) {
        fail(String(error));
      }
      await Bun.sleep(25);
    }
  });
  const rssByMinute: number[] = [];
  const sampler = (async () => {
    for (let minute = 1; Date.now() < until; minute++) {
      await Bun.sleep(Math.min(60_000, Math.max(0, until - Date.now())));
      rssByMinute.push(memoryKiB(proxy.pid, "VmRSS"));
      console.error(`load minute ${minute}: RSS ${mb(rssByMinute.at(-1)!)}, ${counts.requests} requests, ${counts.streams} streams, ${counts.failed} failed`);
    }
  })();
  await Promise.all([...workers, sampler]);
  const [firstByte, midStream, tenMinutes] = await Promise.all([silentFirstByte, silentMidStream, tenMinuteStream]);
  const tokenRequests = entra.scopes.length;
  const trend = rssByMinute.length >= 3 ? rssByMinute.at(-1)! - rssByMinute[1]! : 0;
  note(`- **${LOAD_MINUTES} minutes of load with 20 s token lifetimes** (8 clients, ${Math.round((counts.requests + counts.streams) / (LOAD_MINUTES * 60))} requests/s, one in ten an SSE stream): ${counts.requests.toLocaleString("en-US")} requests and ${counts.streams.toLocaleString("en-US")} streams, ${counts.failed} failed${counts.failed ? ` (${[...failuresSeen].map(([why, count]) => `${count}× ${why}`).join(", ")})` : ""}; ${tokenRequests} token requests in the whole soak. RSS each minute: ${rssByMinute.map((kib) => (kib / 1024).toFixed(1)).join(", ")} MB (minute 2 to the last: ${trend >= 0 ? "+" : ""}${(trend / 1024).toFixed(1)} MB).`);
  note(`- **Long silences through the same proxy meanwhile**: a response whose first byte came after 130 s: ${firstByte.ok ? "complete" : "FAILED"}; a stream silent 310 s mid-way: ${midStream.ok ? "complete" : "FAILED"}; a 10-minute stream (121 events 5 s apart): ${LOAD_MINUTES >= 10 ? (tenMinutes.ok ? "complete" : `FAILED (${tenMinutes.events} events)`) : "not run (SOAK_LOAD_MINUTES < 10)"}.`);
  check(counts.failed === 0, "no failed request under load with token refreshes");
  check(firstByte.ok && midStream.ok && tenMinutes.ok, "long silences and the 10-minute stream complete");
  check(trend < 5 * 1024, "no RSS growth trend under load (under 5 MB from minute 2 to the last)");
  proxy.child.kill();
}

/** A GET over its own connection, read to the end: ok when the body is what /silent or /silent-stream sends whole. */
function fetchRaw(port: number, target: string): Promise<{ ok: boolean }> {
  return new Promise((resolve) => {
    let text = "";
    const socket = net.connect(port, "127.0.0.1", () => socket.write(`GET ${target} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n`));
    socket.on("data", (chunk: Buffer) => (text += chunk.toString("latin1")));
    socket.on("error", () => {});
    socket.on("close", () => resolve({ ok: text.startsWith("HTTP/1.1 200") && (text.includes('{"late":true}') || text.includes('{"after":"silence"}')) }));
  });
}

// ---------------------------------------------------------------- report

for (const child of children) child.kill();
entra.stop();
rmSync(certs.dir, { recursive: true, force: true });

const commit = spawnSync("git", ["describe", "--always", "--dirty", "--abbrev=12"], { cwd: ROOT }).stdout.toString().trim();
const text = [
  `Soak ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC · commit ${commit} · Bun ${Bun.version} · the compiled binary, LOG_LEVEL=info · open-file limit ${FD_LIMIT}`,
  "",
  ...report,
  "",
  failures.length === 0 ? "Every check passed." : `**Failed:** ${failures.join("; ")}.`,
].join("\n");
console.log(text);
const resultsPath = join(ROOT, "bench/RESULTS.md");
const previous = readFileSync(resultsPath, "utf8");
const marker = ["<!-- soak:start -->", "<!-- soak:end -->"] as const;
writeFileSync(
  resultsPath,
  previous.includes(marker[0])
    ? `${previous.split(marker[0])[0]}${marker[0]}\n${text}\n${marker[1]}${previous.split(marker[1])[1] ?? ""}`
    : `${previous.trimEnd()}\n\n## Soak (\`make soak\`)\n\n${marker[0]}\n${text}\n${marker[1]}\n`,
);
process.exit(failures.length === 0 ? 0 : 1);
