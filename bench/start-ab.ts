/**
 * Two builds' start and idle footprint side by side, alternating: the time
 * from exec to the first 200 from /live, and the resident memory once a
 * token is held and /health answered (median of rounds), plus each
 * binary's size. For changes that must not move them (the module split).
 *
 * Usage: bun bench/start-ab.ts <baseline-binary> <candidate-binary>   (START_AB_ROUNDS=20)
 */
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { benchEntra } from "./entra.ts";
import { freePort, median, memoryKiB } from "../test/harness.ts";

const [baseline, candidate] = process.argv.slice(2);
if (baseline === undefined || candidate === undefined) throw new Error("usage: bun bench/start-ab.ts <baseline-binary> <candidate-binary>");
const ROUNDS = Number(process.env.START_AB_ROUNDS ?? 20);
const work = mkdtempSync(join(tmpdir(), "auth-proxy-start-ab-"));
const { entra, env } = benchEntra(work);
const upstream = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("ok") });

async function startOnce(binary: string): Promise<{ liveMs: number; idleKiB: number }> {
  const port = freePort();
  const startedAt = performance.now();
  const proxy = Bun.spawn([binary], { env: { PATH: process.env.PATH, ...env, API_BASE_URL: `http://127.0.0.1:${upstream.port}`, PORT: String(port) }, stdout: "ignore", stderr: "ignore" });
  let liveMs = 0;
  for (;;) {
    const live = await fetch(`http://127.0.0.1:${port}/live`).catch(() => undefined);
    if (live?.status === 200) {
      liveMs = performance.now() - startedAt;
      break;
    }
    await Bun.sleep(1);
  }
  while ((await fetch(`http://127.0.0.1:${port}/health`)).status !== 200) await Bun.sleep(20);
  await Bun.sleep(500);
  const idleKiB = memoryKiB(proxy.pid, "VmRSS");
  proxy.kill("SIGKILL");
  await proxy.exited;
  return { liveMs, idleKiB };
}

const results = { [baseline]: [] as { liveMs: number; idleKiB: number }[], [candidate]: [] as { liveMs: number; idleKiB: number }[] };
for (let round = 0; round < ROUNDS; round += 1) {
  for (const binary of round % 2 === 0 ? [baseline, candidate] : [candidate, baseline]) results[binary]!.push(await startOnce(binary));
}
const row = (binary: string) => {
  const live = median(results[binary]!.map((result) => result.liveMs));
  const idle = median(results[binary]!.map((result) => result.idleKiB)) / 1024;
  return { live, idle, size: statSync(binary).size / 1024 / 1024 };
};
const base = row(baseline);
const cand = row(candidate);
console.log(`| ${ROUNDS} alternating rounds | exec -> /live (ms, median) | idle RSS (MB, median) | binary (MB) |`);
console.log("|---|---:|---:|---:|");
console.log(`| ${baseline} | ${base.live.toFixed(1)} | ${base.idle.toFixed(1)} | ${base.size.toFixed(2)} |`);
console.log(`| ${candidate} | ${cand.live.toFixed(1)} (${(cand.live / base.live).toFixed(3)} x) | ${cand.idle.toFixed(1)} (${(cand.idle - base.idle >= 0 ? "+" : "") + (cand.idle - base.idle).toFixed(1)} MB) | ${cand.size.toFixed(2)} (${(cand.size / base.size).toFixed(4)} x) |`);
entra.stop();
upstream.stop(true);
rmSync(work, { recursive: true, force: true });
process.exit(0);
