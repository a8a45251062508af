/**
 * Part of `make bench`: failover under the faults it exists for, on the
 * compiled binary with its defaults (connect_timeout 10 s).
 *
 * A. A pool whose first backend's address drops SYNs (a listener with a
 *    full accept queue, standing in for a black-holed region): requests
 *    sent at 0, 5, 30 and 60 s must each be answered by the second backend
 *    within the connect timeout + its answer (the kernel's SYN retries made
 *    it 134 s before).
 * B. An upstream that takes a GET, hangs 5 s and resets, after 40 POSTs
 *    left 40 idle pooled connections: each GET must reach it once (Bun's
 *    fetch resent it through the pool: 44 requests for 4 GETs) and the
 *    client get its 502 after the hang + 1 s; with a second backend, that
 *    backend's answer.
 *
 * Usage: bun bench/hostile-backends.ts   (takes about 75 s). Writes its section of bench/RESULTS.md.
 */
import http from "node:http";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { benchEntra } from "./entra.ts";
import { writeResultsSection } from "./results.ts";
import { freePort, ROOT, waitForStatus } from "../test/harness.ts";
import { startBlackHole } from "../test/http.ts";

const HANG_MS = 5000;
const work = mkdtempSync(join(tmpdir(), "auth-proxy-hostile-"));
const received = { hang: 0, warm: 0 };
const hanging = http.createServer((req, res) => {
  if (req.url!.startsWith("/hang")) {
    received.hang += 1;
    setTimeout(() => res.socket?.destroy(), HANG_MS);
    return;
  }
  received.warm += 1;
  req.resume().on("end", () => setTimeout(() => res.end('{"warm":true}'), 100));
});
await new Promise<void>((resolve) => hanging.listen(0, "127.0.0.1", resolve));
const hangingUrl = `http://127.0.0.1:${(hanging.address() as { port: number }).port}`;
const secondary = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => Response.json({ backend: "secondary" }, { headers: { "x-backend": "secondary" } }) });
const dark = await startBlackHole();
const proxies: ReturnType<typeof Bun.spawn>[] = [];

async function startBinary(routes: string, identityEnv: Record<string, string>): Promise<string> {
  const file = join(work, `routes-${proxies.length}.yaml`);
  writeFileSync(file, routes);
  const port = freePort();
  proxies.push(Bun.spawn([join(ROOT, "dist/auth-proxy")], { env: { PATH: process.env.PATH, ...identityEnv, AUTH_PROXY_ROUTES: file, PORT: String(port), LOG_LEVEL: "warn" }, stdout: "ignore", stderr: "ignore" }));
  const url = `http://127.0.0.1:${port}`;
  await waitForStatus(`${url}/health`);
  return url;
}

async function timed(url: string, init: RequestInit = {}): Promise<{ status: number; backend: string | null; seconds: number }> {
  const startedAt = performance.now();
  const response = await fetch(url, init);
  await response.text();
  return { status: response.status, backend: response.headers.get("x-backend"), seconds: (performance.now() - startedAt) / 1000 };
}

try {
  const { entra, env: identityEnv } = benchEntra(work);
  const secondaryUrl = `http://127.0.0.1:${secondary.port}`;

  const syn = await startBinary(`routes:\n  - prefix: /\n    backends:\n      - { url: "http://127.0.0.1:${dark.port}", name: dark }\n      - { url: "${secondaryUrl}", name: secondary, priority: 2 }\n`, identityEnv);
  const synStart = performance.now();
  const synResults = await Promise.all([0, 5, 30, 60].map(async (at) => {
    await Bun.sleep(at * 1000 - (performance.now() - synStart));
    return { at, ...(await timed(`${syn}/openai/deployments/gpt-4o/chat/completions`, { method: "POST", body: "{}" })) };
  }));
  const synMet = synResults.every(({ status, backend, seconds }) => status === 200 && backend === "secondary" && seconds < 10.5);

  const resets = await startBinary(`routes:\n  - prefix: /alone\n    backends:\n      - { url: "${hangingUrl}", name: hanging }\n  - prefix: /\n    backends:\n      - { url: "${hangingUrl}", name: hanging }\n      - { url: "${secondaryUrl}", name: secondary, priority: 2 }\n`, identityEnv);
  await Promise.all(Array.from({ length: 40 }, () => timed(`${resets}/alone/warm`, { method: "POST", body: "{}" })));
  const aloneResults = await Promise.all(Array.from({ length: 4 }, () => timed(`${resets}/alone/hang`)));
  const aloneSent = received.hang;
  const pooled = await timed(`${resets}/hang`);
  const pooledSent = received.hang - aloneSent;
  const resetMet = aloneSent === 4 && aloneResults.every(({ status, seconds }) => status === 502 && seconds < HANG_MS / 1000 + 1) && pooledSent === 1 && pooled.status === 200 && pooled.backend === "secondary";

  const report = [
    `Run ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC · the compiled binary, defaults (connect_timeout 10 s)`,
    "",
    "| Check | Measured | Target | |",
    "|---|---|---|---|",
    `| A backend dropping SYNs: requests sent at ${synResults.map(({ at }) => `${at}`).join(", ")} s answered by the next backend | ${synResults.map(({ status, backend, seconds }) => `${seconds.toFixed(2)} s (${status} ${backend})`).join(", ")} | each within 10 s + the next backend's answer (was 134 s each) | ${synMet ? "met" : "**not met**"} |`,
    `| 4 GETs to an upstream that hangs ${HANG_MS / 1000} s and resets, 40 idle pooled connections | ${aloneSent} upstream requests; 502 after ${aloneResults.map(({ seconds }) => seconds.toFixed(2)).join(", ")} s | 4 (one each; was 44); the hang + 1 s | ${aloneSent === 4 && aloneResults.every(({ status, seconds }) => status === 502 && seconds < HANG_MS / 1000 + 1) ? "met" : "**not met**"} |`,
    `| The same GET to a pool of it and a healthy backend | ${pooledSent} request to the resetting one; ${pooled.status} from ${pooled.backend} after ${pooled.seconds.toFixed(2)} s | 1; the next backend's answer | ${pooledSent === 1 && pooled.status === 200 && pooled.backend === "secondary" ? "met" : "**not met**"} |`,
  ].join("\n");
  console.log(report);
  writeResultsSection("hostile-backends", "Failover under hostile backends (bench/hostile-backends.ts)", report);

  entra.stop();
  if (!synMet || !resetMet) process.exitCode = 1;
} finally {
  for (const proxy of proxies) proxy.kill("SIGKILL");
  hanging.closeAllConnections();
  hanging.close();
  secondary.stop(true);
  dark.close();
  rmSync(work, { recursive: true, force: true });
}
