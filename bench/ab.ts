/**
 * `make bench-ab BASE=<git ref>`: the working tree's build against the build
 * of an earlier commit, on the same machine at the same time, so a change's
 * cost is measured against its own baseline rather than against figures
 * from another day: POST chat completion at c=64 (requests/s), and SSE time
 * to first byte at c=1, in alternating rounds (the order flips every round),
 * each judged by the median of its per-round ratios. Same CPUs as
 * `make bench` (load on CPU 0, servers on CPU 1).
 *
 * Usage: bun bench/ab.ts <baseline-binary> <candidate-binary>   (AB_ROUNDS=20, AB_SECONDS=3)
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { CertificateFactory } from "../test/certificates.ts";
import { FakeEntraId } from "../test/fakes.ts";
import { freePort, median, ROOT, waitForStatus } from "../test/harness.ts";

const [baselineBinary, candidateBinary] = process.argv.slice(2);
if (!baselineBinary || !candidateBinary) throw new Error("usage: bun bench/ab.ts <baseline-binary> <candidate-binary>");
const ROUNDS = Number(process.env.AB_ROUNDS ?? 20);
const SECONDS = Number(process.env.AB_SECONDS ?? 3);
const CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const children: Subprocess[] = [];

function serve(command: string[], env: Record<string, string | undefined> = {}): void {
  children.push(Bun.spawn(["taskset", "-c", "1", ...command], { env: { PATH: process.env.PATH, ...env }, stdout: "ignore", stderr: "inherit" }));
}

function postRps(port: number): number {
  const output = execFileSync("taskset", ["-c", "0", "wrk", "-t1", "-c64", `-d${SECONDS}s`, "-s", join(ROOT, "bench/post.lua"), `http://127.0.0.1:${port}${CHAT_PATH}`]).toString();
  if (/Non-2xx|Socket errors/.test(output)) throw new Error(`wrk saw errors:\n${output}`);
  return Number(/Requests\/sec:\s+([\d.]+)/.exec(output)![1]);
}

function sseTtfb(port: number): number {
  const output = execFileSync("taskset", ["-c", "0", process.execPath, join(ROOT, "bench/sse-client.ts"), `http://127.0.0.1:${port}/sse`, "1", "5"]).toString();
  return median((JSON.parse(output) as { ttfb: number[] }).ttfb);
}

const work = mkdtempSync(join(tmpdir(), "auth-proxy-ab-"));
try {
  const certs = new CertificateFactory(join(work, "certs"));
  execFileSync("mkdir", ["-p", certs.dir]);
  const tls = certs.serverTls();
  const app = certs.client("bench-app");
  const entra = new FakeEntraId(tls).start();
  entra.register({ clientId: CLIENT_ID, certificates: [app.certificatePem] });
  const upstreamPort = freePort();
  serve([process.execPath, join(ROOT, "bench/upstream.ts"), String(upstreamPort)]);
  await waitForStatus(`http://127.0.0.1:${upstreamPort}/`);
  const env = {
    AZURE_CLIENT_ID: CLIENT_ID,
    AZURE_TENANT_ID: entra.tenantId,
    AZURE_CERTIFICATE_PATH: app.pemPath,
    API_BASE_URL: `http://127.0.0.1:${upstreamPort}`,
    AZURE_AUTHORITY_HOST: entra.authorityHost,
    NODE_EXTRA_CA_CERTS: tls.caPath,
    HOST: "127.0.0.1",
    BUN_CONFIG_MAX_HTTP_REQUESTS: "65535",
    LOG_LEVEL: "info",
  };
  const ports = { baseline: freePort(), candidate: freePort() };
  serve([baselineBinary], { ...env, PORT: String(ports.baseline) });
  serve([candidateBinary], { ...env, PORT: String(ports.candidate) });
  for (const port of Object.values(ports)) await waitForStatus(`http://127.0.0.1:${port}/health`);

  const rps = { baseline: [] as number[], candidate: [] as number[] };
  const ttfb = { baseline: [] as number[], candidate: [] as number[] };
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 === 0 ? (["baseline", "candidate"] as const) : (["candidate", "baseline"] as const);
    for (const arm of order) {
      rps[arm].push(postRps(ports[arm]));
      ttfb[arm].push(sseTtfb(ports[arm]));
    }
  }
  const ratios = (values: { baseline: number[]; candidate: number[] }) => values.candidate.map((value, round) => value / values.baseline[round]!);
  const quartiles = (values: number[]) => {
    const sorted = [...values].sort((a, b) => a - b);
    return `${sorted[Math.floor(sorted.length / 4)]!.toFixed(3)}-${sorted[Math.floor((3 * sorted.length) / 4)]!.toFixed(3)}`;
  };
  const rpsRatios = ratios(rps);
  const ttfbRatios = ratios(ttfb);
  console.log(`| ${ROUNDS} alternating rounds | baseline | candidate | candidate ÷ baseline (median, quartiles) |`);
  console.log("|---|---:|---:|---|");
  console.log(`| POST c=64, requests/s | ${Math.round(median(rps.baseline))} | ${Math.round(median(rps.candidate))} | ${median(rpsRatios).toFixed(3)} (${quartiles(rpsRatios)}) |`);
  console.log(`| SSE c=1, time to first byte (ms) | ${median(ttfb.baseline).toFixed(2)} | ${median(ttfb.candidate).toFixed(2)} | ${median(ttfbRatios).toFixed(3)} (${quartiles(ttfbRatios)}) |`);
  entra.stop();
} finally {
  for (const child of children) child.kill("SIGKILL");
  rmSync(work, { recursive: true, force: true });
}
process.exit(0);
