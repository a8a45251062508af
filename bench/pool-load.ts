/**
 * Part of `make bench`: a two-backend pool under load. The primary answers
 * 429 for one second (with retry-after-ms until the next second), then 200
 * for one second, and so on; the secondary always answers. 64 clients send
 * POSTs with random bodies for 20 s. Checks: every client request gets a
 * 200 (or the contract's 429 when both rest, which here they never do), no
 * request body reaches a backend under another request's headers (each
 * request carries its body's sha256 in a header the backends check), every
 * answer is the one to its own request, and the held request bodies return
 * to zero. Writes its section of bench/RESULTS.md.
 *
 * Usage: bun bench/pool-load.ts   (POOL_LOAD_SECONDS=20, POOL_LOAD_CLIENTS=64)
 */
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { benchEntra } from "./entra.ts";
import { writeResultsSection } from "./results.ts";
import { freePort, ROOT, waitForStatus } from "../test/harness.ts";
import { parseExposition, valueOf } from "../test/prometheus.ts";

const SECONDS = Number(process.env.POOL_LOAD_SECONDS ?? 20);
const CLIENTS = Number(process.env.POOL_LOAD_CLIENTS ?? 64);
const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");

/** Bodies whose hash did not match the header sent with them: a body under another request's headers. */
let mismatched = 0;
const answered = { primary200: 0, primary429: 0, secondary: 0 };

function backend(name: "primary" | "secondary") {
  return Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 0,
    async fetch(req) {
      const body = new Uint8Array(await req.arrayBuffer());
      const hash = sha256(body);
      if (hash !== req.headers.get("x-body-sha256")) mismatched += 1;
      const now = Date.now();
      if (name === "primary" && Math.floor(now / 1000) % 2 === 0) {
        answered.primary429 += 1;
        return Response.json({ error: { code: "429", message: "throttled" } }, { status: 429, headers: { "retry-after-ms": String(1000 - (now % 1000)) } });
      }
      if (name === "primary") answered.primary200 += 1;
      else answered.secondary += 1;
      return Response.json({ backend: name, hash });
    },
  });
}

const work = mkdtempSync(join(tmpdir(), "auth-proxy-pool-load-"));
const primary = backend("primary");
const secondary = backend("secondary");
let proxy: ReturnType<typeof Bun.spawn> | undefined;
try {
  const { entra, env: identityEnv } = benchEntra(work);
  const routes = join(work, "pool.yaml");
  writeFileSync(routes, `routes:\n  - prefix: /\n    backends:\n      - { url: "http://127.0.0.1:${primary.port}", name: primary }\n      - { url: "http://127.0.0.1:${secondary.port}", name: secondary, priority: 2 }\n`);
  const port = freePort();
  proxy = Bun.spawn(["taskset", "-c", "1", join(ROOT, "dist/auth-proxy")], {
    env: { PATH: process.env.PATH, ...identityEnv, AUTH_PROXY_ROUTES: routes, PORT: String(port), LOG_LEVEL: "warn" },
    stdout: "ignore",
    stderr: "inherit",
  });
  const url = `http://127.0.0.1:${port}`;
  await waitForStatus(`${url}/health`);

  const statuses = new Map<number, number>();
  let wrongAnswers = 0;
  const endsAt = Date.now() + SECONDS * 1000;
  async function client(): Promise<void> {
    while (Date.now() < endsAt) {
      const body = randomBytes(200 + Math.floor(Math.random() * 8000));
      const hash = sha256(body);
      const response = await fetch(`${url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, {
        method: "POST",
        body,
        headers: { "content-type": "application/json", "x-body-sha256": hash },
      });
      statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
      const answer = (await response.json()) as { hash?: string; error?: { code?: string } };
      if (response.status === 200 && answer.hash !== hash) wrongAnswers += 1;
      if (response.status === 429 && answer.error?.code !== "backends_throttled") wrongAnswers += 1;
    }
  }
  await Promise.all(Array.from({ length: CLIENTS }, client));
  const samples = parseExposition(await (await fetch(`${url}/metrics`)).text());
  const held = valueOf(samples, "auth_proxy_held_request_body_bytes");
  const failovers = valueOf(samples, "auth_proxy_failovers_total", { reason: "throttled" }) ?? 0;
  const total = [...statuses.values()].reduce((sum, count) => sum + count, 0);
  const unexpected = [...statuses.entries()].filter(([status]) => status !== 200 && status !== 429);
  const ok = unexpected.length === 0 && mismatched === 0 && wrongAnswers === 0 && held === 0 && total > 0;
  const report = [
    `Run ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC · ${CLIENTS} clients for ${SECONDS} s · primary answers 429 every other second, secondary always 200 · the compiled binary`,
    "",
    "| Check | Measured | |",
    "|---|---|---|",
    `| Every client request gets 200 or the contract's 429 | ${total.toLocaleString("en-US")} requests: ${[...statuses.entries()].map(([status, count]) => `${count.toLocaleString("en-US")} × ${status}`).join(", ")} | ${unexpected.length === 0 ? "met" : "**not met**"} |`,
    `| No body reaches a backend under another request's headers (sha256 checked by both backends) | ${mismatched} mismatched of ${(answered.primary200 + answered.primary429 + answered.secondary).toLocaleString("en-US")} received | ${mismatched === 0 ? "met" : "**not met**"} |`,
    `| Every answer is its own request's | ${wrongAnswers} wrong | ${wrongAnswers === 0 ? "met" : "**not met**"} |`,
    `| Held request bodies return to zero | ${held} bytes after the load | ${held === 0 ? "met" : "**not met**"} |`,
    `| Failovers | ${failovers.toLocaleString("en-US")} throttled; primary answered ${answered.primary200.toLocaleString("en-US")} × 200 and ${answered.primary429.toLocaleString("en-US")} × 429, secondary ${answered.secondary.toLocaleString("en-US")} | |`,
  ].join("\n");
  console.log(report);
  writeResultsSection("pool-load", "Backend pool under load (bench/pool-load.ts)", report);

  entra.stop();
  if (!ok) process.exitCode = 1;
} finally {
  proxy?.kill("SIGKILL");
  primary.stop(true);
  secondary.stop(true);
  rmSync(work, { recursive: true, force: true });
}
