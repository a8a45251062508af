/**
 * `make bench`: auth-proxy side by side with the upstream hit directly,
 * nginx (the reverse-proxy floor) and a bare Bun.serve + fetch passthrough
 * (the Bun floor), all against the same fast fake upstream, in one run.
 * Load generators run on CPU 0, servers on CPU 1 (taskset); targets are
 * interleaved in every round so drift on a shared machine hits them alike;
 * every figure is the median over the rounds. Prints a markdown table and
 * writes it into bench/RESULTS.md between the results markers.
 *
 * Usage: bun bench/run.ts   (BENCH_ROUNDS=3, BENCH_SECONDS=4, BENCH_COST_TRIPLETS=30)
 */
import { execFileSync, spawnSync } from "node:child_process";
import { cpus } from "node:os";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { benchEntra } from "./entra.ts";
import { BASELINE_REF, buildAt, identityIdleMemory } from "./identities.ts";
import { freePort, median, memoryKiB, ROOT, waitForStatus as waitFor } from "../test/harness.ts";
import packageJson from "../package.json" with { type: "json" };

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const SERVER_CPU = "1";
const CLIENT_CPU = "0";
const BUN = process.execPath;
const PROXY_BINARY = join(ROOT, "dist/auth-proxy");
/** package.json's build flags (after `bun build proxy.ts`) and the Makefile's target, for a binary the bench compiles from proxy.ts itself. */
const BUILD_FLAGS = [...packageJson.scripts.build.split(" ").slice(3), `--target=${process.env.X64_TARGET ?? "bun-linux-x64"}`];
const BARE_BINARY = join(ROOT, "dist/bench-bare-serve");
const CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

const round2 = (value: number) => Math.round(value * 100) / 100;
const children: Subprocess[] = [];

function serve(command: string[], env: Record<string, string | undefined> = {}): Subprocess {
  const child = Bun.spawn(["taskset", "-c", SERVER_CPU, ...command], {
    env: { PATH: process.env.PATH, ...env },
    stdout: "ignore",
    stderr: "inherit",
  });
  children.push(child);
  return child;
}



/** wrk on the client CPU; returns p50 latency (ms), requests/s and bytes/s. */
function wrk(url: string, connections: number, script?: string): { p50: number; rps: number; bytesPerSecond: number; requests: number } {
  const args = ["-c", CLIENT_CPU, "wrk", "-t1", `-c${connections}`, `-d${SECONDS}s`, "--latency", ...(script ? ["-s", script] : []), url];
  const output = execFileSync("taskset", args).toString();
  if (/Non-2xx|Socket errors/.test(output)) throw new Error(`wrk saw errors against ${url}:\n${output}`);
  const toMs = (value: string, unit: string) => Number(value) * ({ us: 0.001, ms: 1, s: 1000 } as Record<string, number>)[unit]!;
  const p50 = /50%\s+([\d.]+)(us|ms|s)/.exec(output)!;
  const transfer = /Transfer\/sec:\s+([\d.]+)(B|KB|MB|GB)/.exec(output)!;
  const scale = ({ B: 1, KB: 1024, MB: 1024 ** 2, GB: 1024 ** 3 } as Record<string, number>)[transfer[2]!]!;
  return {
    p50: toMs(p50[1]!, p50[2]!),
    rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(output)![1]),
    bytesPerSecond: Number(transfer[1]) * scale,
    requests: Number(/(\d+) requests in/.exec(output)![1]),
  };
}

/** WebSocket echo round trips from the client CPU: median round trip (ms) and frames relayed per second. */
function websocketLoad(url: string, sessions: number): { p50: number; framesPerSecond: number } {
  const output = execFileSync("taskset", ["-c", CLIENT_CPU, BUN, join(ROOT, "bench/ws-client.ts"), url, String(sessions), String(SECONDS)]).toString();
  return JSON.parse(output) as { p50: number; framesPerSecond: number };
}

function sse(url: string, concurrency: number, rounds: number): { ttfb: number; total: number } {
  const output = execFileSync("taskset", ["-c", CLIENT_CPU, BUN, join(ROOT, "bench/sse-client.ts"), url, String(concurrency), String(rounds)]).toString();
  const { ttfb, total } = JSON.parse(output) as { ttfb: number[]; total: number[] };
  return { ttfb: median(ttfb), total: median(total) };
}

/** Exec to the first 200 from `path` (/live: serving; /health: token held), in ms. */
async function execToLive(command: string[], env: Record<string, string | undefined>, path = "/live"): Promise<number> {
  const port = freePort();
  const startedAt = performance.now();
  const child = Bun.spawn(["taskset", "-c", SERVER_CPU, ...command], { env: { PATH: process.env.PATH, ...env, HOST: "127.0.0.1", PORT: String(port) }, stdout: "ignore", stderr: "ignore" });
  for (;;) {
    const response = await fetch(`http://127.0.0.1:${port}${path}`).catch(() => undefined);
    if (response?.status === 200) break;
    if (performance.now() - startedAt > 10_000) throw new Error(`${command.join(" ")} never answered ${path}`);
    await Bun.sleep(1);
  }
  const elapsed = performance.now() - startedAt;
  child.kill("SIGKILL");
  await child.exited;
  return elapsed;
}

// ---------------------------------------------------------------- setup

const work = mkdtempSync(join(tmpdir(), "auth-proxy-bench-"));
const { certs, tls, entra, env: identityEnv } = benchEntra(work);

const upstreamPort = freePort();
serve([BUN, join(ROOT, "bench/upstream.ts"), String(upstreamPort)]);
const upstream = `http://127.0.0.1:${upstreamPort}`;
// The same upstream over TLS with the test CA, as Azure OpenAI always is.
const tlsUpstreamPort = freePort();
serve([BUN, join(ROOT, "bench/upstream.ts"), String(tlsUpstreamPort), certs.path("server.pem"), certs.path("server.key")]);
const tlsUpstream = `https://127.0.0.1:${tlsUpstreamPort}`;
await waitFor(`${upstream}/`);

const proxyEnv = { ...identityEnv, API_BASE_URL: upstream };
const proxyPort = freePort();
const proxy = serve([PROXY_BINARY], { ...proxyEnv, PORT: String(proxyPort), LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? "info" });
await waitFor(`http://127.0.0.1:${proxyPort}/health`);

// What metrics and end-of-stream access lines cost: the shipped build at info,
// the same build with access lines off (LOG_LEVEL=warn), and the same code
// compiled with the same flags and the per-request counting defined away
// (proxy.ts, COUNTED) at warn. Three processes of their own, so all three arms
// have the same history (the main proxy above also serves streams, large
// bodies and WebSockets, whose heap and JIT profile the others would lack).
const countedProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, PORT: String(countedProxyPort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${countedProxyPort}/health`);
const quietProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, PORT: String(quietProxyPort), LOG_LEVEL: "warn" });
await waitFor(`http://127.0.0.1:${quietProxyPort}/health`);
const UNCOUNTED_BINARY = join(ROOT, "dist/bench-uncounted");
execFileSync(BUN, ["build", join(ROOT, "proxy.ts"), ...BUILD_FLAGS, "--define", "AUTH_PROXY_BENCH_UNCOUNTED=true", "--outfile", UNCOUNTED_BINARY], { stdio: "ignore" });
const uncountedProxyPort = freePort();
serve([UNCOUNTED_BINARY], { ...proxyEnv, PORT: String(uncountedProxyPort), LOG_LEVEL: "warn" });
await waitFor(`http://127.0.0.1:${uncountedProxyPort}/health`);
// The shipped build at info with only the model token counting defined away (proxy.ts, TOKENS_COUNTED):
// the bench's chat completion carries usage, so this is what reading it costs.
const TOKENS_UNCOUNTED_BINARY = join(ROOT, "dist/bench-tokens-uncounted");
execFileSync(BUN, ["build", join(ROOT, "proxy.ts"), ...BUILD_FLAGS, "--define", "AUTH_PROXY_BENCH_TOKENS_UNCOUNTED=true", "--outfile", TOKENS_UNCOUNTED_BINARY], { stdio: "ignore" });
const tokensUncountedProxyPort = freePort();
serve([TOKENS_UNCOUNTED_BINARY], { ...proxyEnv, PORT: String(tokensUncountedProxyPort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${tokensUncountedProxyPort}/health`);

// The standing baseline: the build of 0fe33c5, the last before routes, pools and token counting,
// so every later change reports what the plain path has cost since then, not only its own step.
const PLAIN_PATH_BASELINE = "0fe33c5";
const plainBaselineBinary = buildAt(PLAIN_PATH_BASELINE, "plain-baseline");
if (plainBaselineBinary === undefined) throw new Error(`${PLAIN_PATH_BASELINE} is not in this clone's history (a shallow clone?): make bench compares with it`);
const plainBaselinePort = freePort();
serve([plainBaselineBinary], { ...proxyEnv, PORT: String(plainBaselinePort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${plainBaselinePort}/health`);

// The same shipped build with a routes file of ten routes (a search API, a Foundry project, deployment
// routes...), the bench's chat completion taken by the last, `/`, after nine longer prefixes that miss.
const routesFile = join(work, "routes.yaml");
const routePrefixes = ["/search", "/search/indexes", "/foundry", "/openai/deployments/o3", "/openai/deployments/o4-mini", "/eastus", "/westeurope", "/embeddings", "/speech", "/"];
writeFileSync(routesFile, `routes:\n${routePrefixes.map((prefix) => `  - prefix: ${prefix}\n    backends:\n      - url: ${upstream}\n`).join("")}`);
const routesProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, API_BASE_URL: undefined, AUTH_PROXY_ROUTES: routesFile, PORT: String(routesProxyPort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${routesProxyPort}/health`);

// Backend pools, the shipped build: two backends with a healthy primary (every request held as bytes for
// a failover that never comes), and a primary that answers every request 429 (retry-after-ms: 0, so it is
// asked again each time): the cost of one failover.
const poolFile = join(work, "pool.yaml");
writeFileSync(poolFile, `routes:\n  - prefix: /\n    backends:\n      - { url: "${upstream}", name: primary }\n      - { url: "${upstream}/second", name: secondary, priority: 2 }\n`);
const poolProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, API_BASE_URL: undefined, AUTH_PROXY_ROUTES: poolFile, PORT: String(poolProxyPort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${poolProxyPort}/health`);
const failoverFile = join(work, "failover.yaml");
writeFileSync(failoverFile, `routes:\n  - prefix: /\n    backends:\n      - { url: "${upstream}/always-429", name: throttled }\n      - { url: "${upstream}", name: serving, priority: 2 }\n`);
const failoverProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, API_BASE_URL: undefined, AUTH_PROXY_ROUTES: failoverFile, PORT: String(failoverProxyPort), LOG_LEVEL: "info" });
await waitFor(`http://127.0.0.1:${failoverProxyPort}/health`);

const tlsProxyPort = freePort();
serve([PROXY_BINARY], { ...proxyEnv, API_BASE_URL: tlsUpstream, PORT: String(tlsProxyPort), LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? "info" });
await waitFor(`http://127.0.0.1:${tlsProxyPort}/health`);

const barePort = freePort();
serve([BUN, join(ROOT, "bench/bare-proxy.ts"), String(barePort), upstream], { BUN_CONFIG_MAX_HTTP_REQUESTS: "65535" });
await waitFor(`http://127.0.0.1:${barePort}/`);
const tlsBarePort = freePort();
serve([BUN, join(ROOT, "bench/bare-proxy.ts"), String(tlsBarePort), tlsUpstream], { BUN_CONFIG_MAX_HTTP_REQUESTS: "65535", NODE_EXTRA_CA_CERTS: tls.caPath });
await waitFor(`http://127.0.0.1:${tlsBarePort}/`);

const nginxPort = freePort();
const nginxDir = join(work, "nginx");
execFileSync("mkdir", ["-p", nginxDir]);
const nginxTlsPort = freePort();
const nginxConf = readFileSync(join(ROOT, "bench/nginx.conf.template"), "utf8")
  .replaceAll("@DIR@", nginxDir)
  .replaceAll("@PORT@", String(nginxPort))
  .replaceAll("@UPSTREAM_PORT@", String(upstreamPort))
  .replaceAll("@TLS_UPSTREAM_PORT@", String(tlsUpstreamPort))
  .replaceAll("@TLS_PORT@", String(nginxTlsPort))
  .replaceAll("@CA@", tls.caPath);
writeFileSync(join(nginxDir, "nginx.conf"), nginxConf);
serve(["nginx", "-c", join(nginxDir, "nginx.conf"), "-p", nginxDir]);
await waitFor(`http://127.0.0.1:${nginxPort}/`);

const targets: Record<string, string> = {
  direct: upstream,
  nginx: `http://127.0.0.1:${nginxPort}`,
  "Bun floor": `http://127.0.0.1:${barePort}`,
  "auth-proxy": `http://127.0.0.1:${proxyPort}`,
};
type Sample = { post1: number; rps64: number; sse1Ttfb: number; sse1Total: number; sse64Ttfb: number; sse64Total: number; mbps: number };
const samples: Record<string, Sample[]> = Object.fromEntries(Object.keys(targets).map((name) => [name, []]));
/** The bare passthrough has no WebSocket relay: its column stays empty in these rows. */
const websocketTargets = ["direct", "nginx", "auth-proxy"];
type WebSocketSample = { rtt1: number; rtt64: number; fps64: number };
const websocketSamples: Record<string, WebSocketSample[]> = Object.fromEntries(websocketTargets.map((name) => [name, []]));
const REALTIME_PATH = "/openai/v1/realtime?model=gpt-realtime";
/** The same four in front of the upstream over TLS. */
const tlsTargets: Record<string, string> = {
  direct: tlsUpstream,
  nginx: `http://127.0.0.1:${nginxTlsPort}`,
  "Bun floor": `http://127.0.0.1:${tlsBarePort}`,
  "auth-proxy": `http://127.0.0.1:${tlsProxyPort}`,
};
type TlsSample = { post1: number; rps64: number };
const tlsSamples: Record<string, TlsSample[]> = Object.fromEntries(Object.keys(tlsTargets).map((name) => [name, []]));

// ---------------------------------------------------------------- load

const names = Object.keys(targets);
for (let round = 0; round < ROUNDS; round++) {
  // Rotate the order each round so no target always runs first (or last).
  const order = names.map((_, index) => names[(index + round) % names.length]!);
  for (const name of order) {
    const base = targets[name]!;
    const post1 = wrk(base + CHAT_PATH, 1, join(ROOT, "bench/post.lua"));
    const post64 = wrk(base + CHAT_PATH, 64, join(ROOT, "bench/post.lua"));
    const sse1 = sse(`${base}/sse`, 1, 5);
    const sse64 = sse(`${base}/sse`, 64, 2);
    const mb = wrk(`${base}/1mb`, 8);
    const tlsBase = tlsTargets[name]!;
    tlsSamples[name]!.push({ post1: wrk(tlsBase + CHAT_PATH, 1, join(ROOT, "bench/post.lua")).p50, rps64: wrk(tlsBase + CHAT_PATH, 64, join(ROOT, "bench/post.lua")).rps });
    if (websocketTargets.includes(name)) {
      const wsUrl = base.replace("http:", "ws:") + REALTIME_PATH;
      const one = websocketLoad(wsUrl, 1);
      const many = websocketLoad(wsUrl, 64);
      websocketSamples[name]!.push({ rtt1: one.p50, rtt64: many.p50, fps64: many.framesPerSecond });
    }
    samples[name]!.push({ post1: post1.p50, rps64: post64.rps, sse1Ttfb: sse1.ttfb, sse1Total: sse1.total, sse64Ttfb: sse64.ttfb, sse64Total: sse64.total, mbps: mb.bytesPerSecond / 1024 ** 2 });
    console.error(`round ${round + 1}/${ROUNDS} ${name}: p50 ${post1.p50} ms, ${Math.round(post64.rps)} req/s at c=64`);
  }
}
const peakAfterAllLoads = memoryKiB(proxy.pid, "VmHWM");

// What the counting costs: both on (the shipped build at info), access lines
// off (warn) and both off (uncounted at warn), run in triplets with the order
// rotated, each judged by the median of its per-triplet ratios. A
// round-to-round spread of ±4 % on this machine made a three-round figure
// read anywhere from 0.905 to 0.974 for the same build. Ten routes and a
// two-backend pool (the shipped build at info) join the rotation, judged
// against both on.
const COST_TRIPLETS = Number(process.env.BENCH_COST_TRIPLETS ?? 20);
const postRps = (port: number) => wrk(`http://127.0.0.1:${port}${CHAT_PATH}`, 64, join(ROOT, "bench/post.lua")).rps;
const costArms = { bothOn: countedProxyPort, linesOff: quietProxyPort, bothOff: uncountedProxyPort, tokensOff: tokensUncountedProxyPort, routes: routesProxyPort, pool: poolProxyPort, plainBaseline: plainBaselinePort };
const costRps: Record<keyof typeof costArms, number[]> = { bothOn: [], linesOff: [], bothOff: [], tokensOff: [], routes: [], pool: [], plainBaseline: [] };
for (let triplet = 0; triplet < COST_TRIPLETS; triplet++) {
  const arms = Object.keys(costArms) as (keyof typeof costArms)[];
  for (let step = 0; step < arms.length; step++) {
    const arm = arms[(triplet + step) % arms.length]!;
    costRps[arm].push(postRps(costArms[arm]));
  }
}
const costRatio = (on: keyof typeof costArms, off: keyof typeof costArms) => {
  const ratios = costRps[on].map((rps, triplet) => rps / costRps[off][triplet]!);
  return { median: median(ratios), min: Math.min(...ratios), max: Math.max(...ratios) };
};
// The uncounted build must really not count forwarded requests, or the comparison means nothing
// (it still counts what the proxy answers without forwarding, such as its own 401s and 503s).
const forwardedCount = /^auth_proxy_requests_total\{method="POST",deployment="gpt-4o",code="200"\}/m;
if (forwardedCount.test(await (await fetch(`http://127.0.0.1:${uncountedProxyPort}/metrics`)).text())) throw new Error("the uncounted build counted forwarded requests: --define did not apply");
if (!forwardedCount.test(await (await fetch(`http://127.0.0.1:${quietProxyPort}/metrics`)).text())) throw new Error("the shipped build did not count forwarded requests");
const tokensCount = /^auth_proxy_model_tokens_total\{deployment="gpt-4o",model="gpt-4o",type="input"\} [1-9]/m;
if (tokensCount.test(await (await fetch(`http://127.0.0.1:${tokensUncountedProxyPort}/metrics`)).text())) throw new Error("the tokens-uncounted build counted tokens: --define did not apply");
if (!tokensCount.test(await (await fetch(`http://127.0.0.1:${countedProxyPort}/metrics`)).text())) throw new Error("the shipped build did not count the bench's usage");
const countingCost = costRatio("bothOn", "bothOff");
const accessLineCost = costRatio("bothOn", "linesOff");
const tokensCost = costRatio("bothOn", "tokensOff");
const metricsCost = costRatio("linesOff", "bothOff");
const routesCost = costRatio("routes", "bothOn");
const poolCost = costRatio("pool", "bothOn");
const sinceBaseline = costRatio("bothOn", "plainBaseline");
// One failover at c=1: the pool's p50 less the single upstream's, in alternating rounds.
const failoverAdded: number[] = [];
for (let round = 0; round < ROUNDS * 2; round++) {
  const single = wrk(`http://127.0.0.1:${countedProxyPort}${CHAT_PATH}`, 1, join(ROOT, "bench/post.lua")).p50;
  failoverAdded.push(wrk(`http://127.0.0.1:${failoverProxyPort}${CHAT_PATH}`, 1, join(ROOT, "bench/post.lua")).p50 - single);
}

// Does auth-proxy reuse its TLS connections to the upstream? The upstream counts the connections it accepted.
await fetch(`${tlsUpstream}/stats?reset`, { tls: { ca: readFileSync(tls.caPath, "utf8") } });
const reuse = wrk(`http://127.0.0.1:${tlsProxyPort}${CHAT_PATH}`, 64, join(ROOT, "bench/post.lua"));
const tlsConnections = ((await (await fetch(`${tlsUpstream}/stats`, { tls: { ca: readFileSync(tls.caPath, "utf8") } })).json()) as { connections: number }).connections;

// Memory on a fresh proxy, so each figure has one cause: idle, after the
// POST c=64 run, with 1,000 concurrent slow SSE streams (20 events 500 ms
// apart), and 5 s after those end.
proxy.kill();
const memoryPort = freePort();
const memoryProxy = serve([PROXY_BINARY], { ...proxyEnv, PORT: String(memoryPort), LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? "info" });
await waitFor(`http://127.0.0.1:${memoryPort}/health`);
await Bun.sleep(500);
const idleRss = memoryKiB(memoryProxy.pid, "VmRSS");
wrk(`http://127.0.0.1:${memoryPort}${CHAT_PATH}`, 64, join(ROOT, "bench/post.lua"));
const peakAfterLoad = memoryKiB(memoryProxy.pid, "VmHWM");
const held = JSON.parse(execFileSync("taskset", ["-c", CLIENT_CPU, BUN, join(ROOT, "bench/hold-streams.ts"), String(memoryPort), "1000"]).toString());
const peakWithStreams = memoryKiB(memoryProxy.pid, "VmHWM");
await Bun.sleep(5000);
const rssAfterStreams = memoryKiB(memoryProxy.pid, "VmRSS");
// 300 MB to a client reading at 40 MB/s: the proxy relays it chunk by chunk to see where it ends.
const SLOW_MB = 300;
const slowReader = (port: number, pid: number) => JSON.parse(execFileSync("taskset", ["-c", CLIENT_CPU, BUN, join(ROOT, "bench/slow-reader.ts"), String(port), String(pid), String(SLOW_MB)]).toString()) as { peakKiB: number; firstQuarterPeakKiB: number; secondHalfPeakKiB: number; bytes: number };
const slow = slowReader(memoryPort, memoryProxy.pid!);
memoryProxy.kill();

// The memory floor in the same run: the bare passthrough, compiled like auth-proxy, without MSAL.
const BARE_PROXY_BINARY = join(ROOT, "dist/bench-bare-proxy");
execFileSync(BUN, ["build", join(ROOT, "bench/bare-proxy.ts"), "--compile", "--minify", "--bytecode", "--outfile", BARE_PROXY_BINARY], { stdio: "ignore" });
const floorPort = freePort();
const floorProxy = serve([BARE_PROXY_BINARY, String(floorPort), upstream], { BUN_CONFIG_MAX_HTTP_REQUESTS: "65535" });
await waitFor(`http://127.0.0.1:${floorPort}/`);
await Bun.sleep(500);
const floorIdleRss = memoryKiB(floorProxy.pid, "VmRSS");
wrk(`http://127.0.0.1:${floorPort}${CHAT_PATH}`, 64, join(ROOT, "bench/post.lua"));
const floorPeakAfterLoad = memoryKiB(floorProxy.pid, "VmHWM");
// Bun's native pipe, which sees no body's end: the floor for the slow reader.
const floorSlow = slowReader(floorPort, floorProxy.pid!);

// ---------------------------------------------------------------- startup

execFileSync(BUN, ["build", join(ROOT, "bench/bare-serve.ts"), "--compile", "--minify", "--bytecode", "--outfile", BARE_BINARY], { stdio: "ignore" });
const startup: Record<string, number[]> = {
  "bare compiled Bun.serve": [],
  "auth-proxy binary": [],
  "auth-proxy binary, re-exec for fetch cap": [],
  "bun proxy.ts": [],
  "auth-proxy binary, to /health 200 (token held)": [],
};
const startupEnv = { ...proxyEnv, LOG_LEVEL: "warn" };
for (let run = 0; run < 10; run++) {
  startup["bare compiled Bun.serve"]!.push(await execToLive([BARE_BINARY], {}));
  startup["auth-proxy binary"]!.push(await execToLive([PROXY_BINARY], startupEnv));
  startup["auth-proxy binary, re-exec for fetch cap"]!.push(await execToLive([PROXY_BINARY], { ...startupEnv, BUN_CONFIG_MAX_HTTP_REQUESTS: undefined }));
  startup["bun proxy.ts"]!.push(await execToLive([BUN, join(ROOT, "proxy.ts")], startupEnv));
  startup["auth-proxy binary, to /health 200 (token held)"]!.push(await execToLive([PROXY_BINARY], startupEnv, "/health"));
}

for (const child of children) child.kill();
entra.stop();
rmSync(work, { recursive: true, force: true });

// ---------------------------------------------------------------- report

const m = (name: string, key: keyof Sample) => median(samples[name]!.map((sample) => sample[key]));
const mb = (kib: number) => round2(kib / 1024);
const row = (label: string, key: keyof Sample, digits = 2) =>
  `| ${label} | ${names.map((name) => (digits === 0 ? Math.round(m(name, key)).toLocaleString("en-US") : m(name, key).toFixed(digits))).join(" | ")} |`;
const wsMedian = (name: string, key: keyof WebSocketSample) => median(websocketSamples[name]!.map((sample) => sample[key]));
const wsRow = (label: string, key: keyof WebSocketSample, digits: number) =>
  `| ${label} | ${names.map((name) => (websocketTargets.includes(name) ? (digits === 0 ? Math.round(wsMedian(name, key)).toLocaleString("en-US") : wsMedian(name, key).toFixed(digits)) : "–")).join(" | ")} |`;
const wsAdded = wsMedian("auth-proxy", "rtt1") - wsMedian("direct", "rtt1");
// Idle memory per identity mode, and against the build before the modes beyond the certificate.
const identityIdle = await identityIdleMemory({ upstream, proxyBinary: PROXY_BINARY, rounds: Math.max(ROUNDS, 5), serverCpu: SERVER_CPU, workDir: work });
const baselineIdle = Object.entries(identityIdle).find(([name]) => name.includes(BASELINE_REF))?.[1];
const worstModeIdle = Math.max(...Object.entries(identityIdle).filter(([name]) => !name.includes(BASELINE_REF)).map(([, kib]) => kib));

const tlsMedian = (name: string, key: keyof TlsSample) => median(tlsSamples[name]!.map((sample) => sample[key]));
const tlsRow = (label: string, key: keyof TlsSample, digits: number) =>
  `| ${label} | ${names.map((name) => (digits === 0 ? Math.round(tlsMedian(name, key)).toLocaleString("en-US") : tlsMedian(name, key).toFixed(digits))).join(" | ")} |`;
const added = (key: keyof Sample) => m("auth-proxy", key) - m("direct", key);
const verdict = (ok: boolean) => (ok ? "met" : "**not met**");

const startupMedians = Object.fromEntries(Object.entries(startup).map(([name, values]) => [name, median(values)]));
const startupRatio = startupMedians["auth-proxy binary"]! / startupMedians["bare compiled Bun.serve"]!;
const checks = [
  [`Added p50 latency at c=1 (auth-proxy − direct) ≤ 0.20 ms`, `${added("post1").toFixed(3)} ms (nginx ${(m("nginx", "post1") - m("direct", "post1")).toFixed(3)}, Bun floor ${(m("Bun floor", "post1") - m("direct", "post1")).toFixed(3)})`, added("post1") <= 0.2],
  [`Throughput at c=64 ≥ 0.75 × nginx`, `${(m("auth-proxy", "rps64") / m("nginx", "rps64")).toFixed(2)} × nginx (Bun floor ${(m("Bun floor", "rps64") / m("nginx", "rps64")).toFixed(2)} ×)`, m("auth-proxy", "rps64") / m("nginx", "rps64") >= 0.75],
  [`SSE time to first byte ≤ direct + 1 ms (c=1 / c=64)`, `+${added("sse1Ttfb").toFixed(2)} / +${added("sse64Ttfb").toFixed(2)} ms`, added("sse1Ttfb") <= 1 && added("sse64Ttfb") <= 1],
  [`SSE total time within 2 % of direct at c=64`, `${((m("auth-proxy", "sse64Total") / m("direct", "sse64Total") - 1) * 100).toFixed(2)} %`, m("auth-proxy", "sse64Total") / m("direct", "sse64Total") <= 1.02],
  [
    `Metrics and access lines on ≥ 0.95 × the same code with both off, c=64`,
    `${countingCost.median.toFixed(3)} × (median of ${COST_TRIPLETS} triplets, order rotated; ${countingCost.min.toFixed(3)}-${countingCost.max.toFixed(3)}; ${Math.round(median(costRps.bothOn)).toLocaleString("en-US")} vs ${Math.round(median(costRps.bothOff)).toLocaleString("en-US")} req/s). Apart: access lines ${accessLineCost.median.toFixed(3)} × (info vs warn), metrics ${metricsCost.median.toFixed(3)} × (warn vs uncounted at warn, ${Math.round(median(costRps.linesOff)).toLocaleString("en-US")} req/s)`,
    countingCost.median >= 0.95,
  ],
  [
    `Model token counting on ≥ 0.95 × the same code with it defined away, c=64 (the chat completion carries usage)`,
    `${tokensCost.median.toFixed(3)} × (median of ${COST_TRIPLETS} rounds, order rotated; ${tokensCost.min.toFixed(3)}-${tokensCost.max.toFixed(3)}; ${Math.round(median(costRps.bothOn)).toLocaleString("en-US")} vs ${Math.round(median(costRps.tokensOff)).toLocaleString("en-US")} req/s)`,
    tokensCost.median >= 0.95,
  ],
  [
    `Ten routes at c=64 ≥ 0.97 × one upstream (same build, access lines on)`,
    `${routesCost.median.toFixed(3)} × (median of ${COST_TRIPLETS} rounds, ${routesCost.min.toFixed(3)}-${routesCost.max.toFixed(3)}; ${Math.round(median(costRps.routes)).toLocaleString("en-US")} vs ${Math.round(median(costRps.bothOn)).toLocaleString("en-US")} req/s; the request matched by the tenth route, after nine longer prefixes)`,
    routesCost.median >= 0.97,
  ],
  [
    `The plain path (one upstream, metrics, access lines, token counting) at c=64 ≥ 0.97 × the build of ${PLAIN_PATH_BASELINE}, before routes, pools and token counting: every change's cumulative cost`,
    `${sinceBaseline.median.toFixed(3)} × (median of ${COST_TRIPLETS} rounds, ${sinceBaseline.min.toFixed(3)}-${sinceBaseline.max.toFixed(3)}; ${Math.round(median(costRps.bothOn)).toLocaleString("en-US")} vs ${Math.round(median(costRps.plainBaseline)).toLocaleString("en-US")} req/s)`,
    sinceBaseline.median >= 0.97,
  ],
  [
    `Two-backend pool, healthy primary, at c=64 ≥ 0.9 × one upstream (bodies held for failover)`,
    `${poolCost.median.toFixed(3)} × (median of ${COST_TRIPLETS} rounds, ${poolCost.min.toFixed(3)}-${poolCost.max.toFixed(3)}; ${Math.round(median(costRps.pool)).toLocaleString("en-US")} req/s)`,
    poolCost.median >= 0.9,
  ],
  [
    `One failover (429 then 200) adds ≤ 1 ms at c=1 beyond the first backend's own answer (p50)`,
    `${(median(failoverAdded) - m("direct", "post1")).toFixed(3)} ms (pool − one upstream: ${median(failoverAdded).toFixed(3)} ms, of which the first backend's own answer, direct: ${m("direct", "post1").toFixed(3)} ms; ${ROUNDS * 2} rounds)`,
    median(failoverAdded) - m("direct", "post1") <= 1,
  ],
  [`Upstream over TLS: connections reused (≤ 128 TLS connections for a c=64 run)`, `${(tlsMedian("auth-proxy", "rps64") / tlsMedian("nginx", "rps64")).toFixed(2)} × nginx over TLS (plain HTTP in the same run: ${(m("auth-proxy", "rps64") / m("nginx", "rps64")).toFixed(2)} ×); ${reuse.requests.toLocaleString("en-US")} requests at c=64 used ${tlsConnections} upstream TLS connections`, tlsConnections <= 64 * 2],
  [`WebSocket round trip p50 at 1 session ≤ direct + 0.3 ms`, `+${wsAdded.toFixed(3)} ms (nginx +${(wsMedian("nginx", "rtt1") - wsMedian("direct", "rtt1")).toFixed(3)} ms); 64 sessions: ${(wsMedian("auth-proxy", "fps64") / wsMedian("nginx", "fps64")).toFixed(2)} × nginx's frames/s`, wsAdded <= 0.3],
  [`Idle RSS ≤ 40 MB (compiled, MSAL loaded)`, `${mb(idleRss)} MB (compiled Bun floor, no MSAL: ${mb(floorIdleRss)} MB)`, idleRss <= 40 * 1024],
  [`Peak RSS after the c=64 run ≤ 64 MB`, `${mb(peakAfterLoad)} MB (compiled Bun floor: ${mb(floorPeakAfterLoad)} MB; auth-proxy after every load above, 1 MB bodies included: ${mb(peakAfterAllLoads)} MB)`, peakAfterLoad <= 64 * 1024],
  [`Peak RSS with 1,000 concurrent streams ≤ 150 MB`, `${mb(peakWithStreams)} MB (${held.complete}/${held.opened} streams complete)`, peakWithStreams <= 150 * 1024 && held.complete === held.opened],
  [`RSS 5 s after the streams end within 20 % of idle`, `${mb(rssAfterStreams)} MB (${((rssAfterStreams / idleRss - 1) * 100).toFixed(0)} % over idle)`, rssAfterStreams <= idleRss * 1.2],
  [
    `Idle RSS growth from the identity modes < 2 MB (every mode vs the certificate-only build ${BASELINE_REF}, compiled)`,
    baselineIdle === undefined
      ? `baseline ${BASELINE_REF} not in this checkout: ${Object.entries(identityIdle).map(([name, kib]) => `${name} ${mb(kib)} MB`).join(", ")}`
      : `${worstModeIdle - baselineIdle >= 0 ? "+" : "−"}${mb(Math.abs(worstModeIdle - baselineIdle))} MB at most: ${Object.entries(identityIdle).map(([name, kib]) => `${name} ${mb(kib)}`).join(", ")} MB`,
    baselineIdle !== undefined && worstModeIdle - baselineIdle < 2 * 1024,
  ],
  [
    `RSS flat while ${SLOW_MB} MB go to a client reading at 40 MB/s: second half ≤ first quarter + 2 MB`,
    `+${mb(slow.firstQuarterPeakKiB)} MB in the first quarter, +${mb(slow.secondHalfPeakKiB)} MB in the second half, peak +${mb(slow.peakKiB)} MB (compiled Bun floor, native pipe: peak +${mb(floorSlow.peakKiB)} MB)`,
    slow.secondHalfPeakKiB <= slow.firstQuarterPeakKiB + 2 * 1024 && slow.bytes > SLOW_MB << 20,
  ],
  [`Exec to /live ≤ 1.5 × bare compiled Bun.serve`, `${startupRatio.toFixed(2)} × (${startupMedians["auth-proxy binary"]!.toFixed(1)} vs ${startupMedians["bare compiled Bun.serve"]!.toFixed(1)} ms)`, startupRatio <= 1.5],
] as const;

const commit = spawnSync("git", ["describe", "--always", "--dirty", "--abbrev=12"], { cwd: ROOT }).stdout.toString().trim();
const nginxVersion = spawnSync("nginx", ["-v"]).stderr.toString().trim().replace("nginx version: ", "");
const table = [
  `Run ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC · commit ${commit} · ${cpus().length} × ${cpus()[0]?.model} · Bun ${Bun.version} · ${nginxVersion} · ${ROUNDS} rounds of ${SECONDS} s, medians · load on CPU ${CLIENT_CPU}, servers on CPU ${SERVER_CPU} · auth-proxy = the compiled binary, LOG_LEVEL=${process.env.BENCH_LOG_LEVEL ?? "info"} (access lines written)`,
  "",
  `| | ${names.join(" | ")} |`,
  `|---|${names.map(() => "---:").join("|")}|`,
  row("POST chat completion, c=1: p50 latency (ms)", "post1", 3),
  row("POST chat completion, c=64: requests/s", "rps64", 0),
  row("SSE 50 events × 5 ms, c=1: time to first byte (ms)", "sse1Ttfb"),
  row("SSE c=1: total (ms)", "sse1Total"),
  row("SSE c=64: time to first byte (ms)", "sse64Ttfb"),
  row("SSE c=64: total (ms)", "sse64Total"),
  row("1 MB GET, c=8: MB/s", "mbps", 0),
  tlsRow("Upstream over TLS: POST c=1 p50 latency (ms)", "post1", 3),
  tlsRow("Upstream over TLS: POST c=64 requests/s", "rps64", 0),
  wsRow("WebSocket echo, 1 session: round trip p50 (ms)", "rtt1", 3),
  wsRow("WebSocket echo, 64 sessions: round trip p50 (ms)", "rtt64", 3),
  wsRow("WebSocket echo, 64 sessions: frames/s (both ways)", "fps64", 0),
  "",
  "| Target | Measured | |",
  "|---|---|---|",
  ...checks.map(([target, measured, ok]) => `| ${target} | ${measured} | ${verdict(ok)} |`),
  "",
  "| Exec to /live (median of 10, ms; load-free, server CPU pinned) | |",
  "|---|---:|",
  ...Object.entries(startupMedians).map(([name, value]) => `| ${name} | ${value.toFixed(1)} |`),
].join("\n");

console.log(table);
const resultsPath = join(ROOT, "bench/RESULTS.md");
const previous = readFileSync(resultsPath, "utf8");
const [before, rest] = previous.split("<!-- results:start -->");
const after = rest?.split("<!-- results:end -->")[1] ?? "";
writeFileSync(resultsPath, `${before}<!-- results:start -->\n${table}\n<!-- results:end -->${after}`);
