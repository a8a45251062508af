/**
 * `make bench-ab BASE=<git ref>`: the working tree's build against the build
 * of an earlier commit, on the same machine at the same time, so a change's
 * cost is measured against its own baseline rather than against figures
 * from another day: POST chat completion at c=64 (requests/s), and SSE time
 * to first byte at c=1, in alternating rounds (the order flips every round),
 * each judged by the median of its per-round ratios. Same CPUs as
 * `make bench` (load on CPU 0, servers on CPU 1).
 *
 * Usage: bun bench/ab.ts <baseline-binary> <candidate-binary> [more candidates...]
 *        (AB_ROUNDS=20, AB_SECONDS=3, AB_SSE=0 to measure throughput only)
 * An arm `binary::routes.yaml` runs that binary with a routes file instead of
 * API_BASE_URL, `@UPSTREAM@` in it replaced by the bench upstream's URL: the
 * same build with one upstream against ten routes, or a pool. An arm
 * `binary+callers=callers.yaml` runs it with that callers file (`@TENANT@`
 * the bench Entra ID's tenant): bench/post.lua's api-key is a key caller's,
 * and with entra callers every arm's requests carry an Entra caller token.
 * A `+redis` at an arm's end gives it AUTH_PROXY_REDIS_URL, a redis-server
 * the bench starts on loopback (no persistence; on CPU 1 with the proxy,
 * or AB_REDIS_CPU=0 with the load generator). AB_C1=1 adds each arm's
 * median latency at c=1 (wrk's p50, one connection).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { benchEntra } from "./entra.ts";
import { freePort, median, ROOT, waitForStatus } from "../test/harness.ts";

const binaries = process.argv.slice(2);
if (binaries.length < 2) throw new Error("usage: bun bench/ab.ts <baseline-binary> <candidate-binary> [more candidates...]");
const MEASURE_SSE = process.env.AB_SSE !== "0";
const MEASURE_C1 = process.env.AB_C1 === "1";
const ROUNDS = Number(process.env.AB_ROUNDS ?? 20);
const SECONDS = Number(process.env.AB_SECONDS ?? 3);
const CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const children: Subprocess[] = [];
/** The Entra caller of bench/callers-entra.yaml, and the audience its token is for. */
const BENCH_CALLER_APP = "5f1c0000-0000-4000-8000-00000000be11";
const BENCH_AUDIENCE = "api://auth-proxy-bench";
let callerHeader: string | undefined;

function serve(command: string[], env: Record<string, string | undefined> = {}): number {
  const child = Bun.spawn(["taskset", "-c", "1", ...command], { env: { PATH: process.env.PATH, ...env }, stdout: "ignore", stderr: "inherit" });
  children.push(child);
  return child.pid;
}

/** A process's user + system CPU time, in clock ticks (/proc/<pid>/stat fields 14 and 15). */
function cpuTicks(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return Number(fields[11]) + Number(fields[12]);
}
const TICK_US = 1e6 / Number(execFileSync("getconf", ["CLK_TCK"]).toString().trim());

/**
 * wrk at c=64: requests/s, and the proxy's CPU time per request (µs), which
 * a shared machine's noise moves far less than throughput.
 */
function postLoad(port: number, pid: number): { rps: number; cpuUs: number } {
  const before = cpuTicks(pid);
  const header = callerHeader === undefined ? [] : ["-H", callerHeader];
  const output = execFileSync("taskset", ["-c", "0", "wrk", "-t1", "-c64", `-d${SECONDS}s`, ...header, "-s", join(ROOT, "bench/post.lua"), `http://127.0.0.1:${port}${CHAT_PATH}`]).toString();
  if (/Non-2xx|Socket errors/.test(output)) throw new Error(`wrk saw errors:\n${output}`);
  const requests = Number(/(\d+) requests in/.exec(output)![1]);
  return { rps: Number(/Requests\/sec:\s+([\d.]+)/.exec(output)![1]), cpuUs: ((cpuTicks(pid) - before) * TICK_US) / requests };
}

/** wrk's p50 at one connection, in ms: what a request waits with nothing else in flight. */
function c1Latency(port: number): number {
  const header = callerHeader === undefined ? [] : ["-H", callerHeader];
  const output = execFileSync("taskset", ["-c", "0", "wrk", "-t1", "-c1", "-d2s", "--latency", ...header, "-s", join(ROOT, "bench/post.lua"), `http://127.0.0.1:${port}${CHAT_PATH}`]).toString();
  const [, value, unit] = /50%\s+([\d.]+)(us|ms|s)/.exec(output)!;
  return Number(value) * (unit === "us" ? 0.001 : unit === "ms" ? 1 : 1000);
}

function sseTtfb(port: number): number {
  const output = execFileSync("taskset", ["-c", "0", process.execPath, join(ROOT, "bench/sse-client.ts"), `http://127.0.0.1:${port}/sse`, "1", "5"]).toString();
  return median((JSON.parse(output) as { ttfb: number[] }).ttfb);
}

const work = mkdtempSync(join(tmpdir(), "auth-proxy-ab-"));
try {
  const { entra, env: identityEnv } = benchEntra(work);
  // Every arm gets the same request: with an Entra caller's token when one arm has entra callers (the others replace it).
  if (binaries.some((spec) => spec.includes("+callers=") && readFileSync(spec.replace(/\+redis$/, "").split("+callers=")[1]!, "utf8").includes("entra:"))) {
    callerHeader = `Authorization: Bearer ${entra.mintCallerToken({ appId: BENCH_CALLER_APP, audience: BENCH_AUDIENCE, lifetimeSeconds: 86_400 })}`;
  }
  const upstreamPort = freePort();
  serve([process.execPath, join(ROOT, "bench/upstream.ts"), String(upstreamPort)]);
  await waitForStatus(`http://127.0.0.1:${upstreamPort}/`);
  const env = { ...identityEnv, API_BASE_URL: `http://127.0.0.1:${upstreamPort}`, LOG_LEVEL: "info" };
  const ports = binaries.map(() => freePort());
  let redisUrl: string | undefined;
  if (binaries.some((spec) => spec.endsWith("+redis"))) {
    const redisPort = freePort();
    // AB_REDIS_CPU=0 puts Redis beside the load generator instead of beside the proxy and upstream (CPU 1).
    const redisCpu = process.env.AB_REDIS_CPU ?? "1";
    children.push(Bun.spawn(["taskset", "-c", redisCpu, "redis-server", "--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdout: "ignore", stderr: "inherit" }));
    redisUrl = `redis://127.0.0.1:${redisPort}`;
    await Bun.sleep(300);
  }
  const pids = binaries.map((fullSpec, index) => {
    const spec = fullSpec.replace(/\+redis$/, "");
    const redis = fullSpec.endsWith("+redis") ? { AUTH_PROXY_REDIS_URL: redisUrl } : {};
    // `binary+callers=file.yaml`: a callers file, @TENANT@ in it the bench Entra ID's tenant.
    const [arm, callersTemplate] = spec.split("+callers=") as [string, string | undefined];
    const [binary, routesTemplate] = arm.split("::") as [string, string | undefined];
    const callers = callersTemplate === undefined ? {} : { AUTH_PROXY_CALLERS: join(work, `callers-${index}.yaml`), AUTH_PROXY_AUDIENCE: BENCH_AUDIENCE };
    if (callersTemplate !== undefined) writeFileSync(callers.AUTH_PROXY_CALLERS!, readFileSync(callersTemplate, "utf8").replaceAll("@TENANT@", entra.tenantId));
    if (routesTemplate === undefined) return serve([binary], { ...env, ...callers, ...redis, PORT: String(ports[index]) });
    const routes = join(work, `routes-${index}.yaml`);
    writeFileSync(routes, readFileSync(routesTemplate, "utf8").replaceAll("@UPSTREAM@", env.API_BASE_URL));
    return serve([binary], { ...env, ...callers, API_BASE_URL: undefined, AUTH_PROXY_ROUTES: routes, PORT: String(ports[index]) });
  });
  for (const port of ports) await waitForStatus(`http://127.0.0.1:${port}/health`);

  const rps = binaries.map(() => [] as number[]);
  const cpu = binaries.map(() => [] as number[]);
  const ttfb = binaries.map(() => [] as number[]);
  const c1 = binaries.map(() => [] as number[]);
  for (let round = 0; round < ROUNDS; round++) {
    // Rotated, so no arm always runs first or last.
    for (let step = 0; step < binaries.length; step++) {
      const arm = (round + step) % binaries.length;
      const load = postLoad(ports[arm]!, pids[arm]!);
      rps[arm]!.push(load.rps);
      cpu[arm]!.push(load.cpuUs);
      if (MEASURE_SSE) ttfb[arm]!.push(sseTtfb(ports[arm]!));
      if (MEASURE_C1) c1[arm]!.push(c1Latency(ports[arm]!));
    }
  }
  const quartiles = (values: number[]) => {
    const sorted = [...values].sort((a, b) => a - b);
    return `${sorted[Math.floor(sorted.length / 4)]!.toFixed(3)}-${sorted[Math.floor((3 * sorted.length) / 4)]!.toFixed(3)}`;
  };
  const ratios = (values: number[][], arm: number) => values[arm]!.map((value, round) => value / values[0]![round]!);
  const ratio = (values: number[][], arm: number) => (arm === 0 ? "baseline" : `${median(ratios(values, arm)).toFixed(3)} (${quartiles(ratios(values, arm))})`);
  console.log(`| ${ROUNDS} rotated rounds | POST c=64 requests/s | ÷ baseline (median, quartiles) | CPU µs a request | ÷ baseline |${MEASURE_SSE ? " SSE c=1 first byte (ms) | ÷ baseline |" : ""}${MEASURE_C1 ? " POST c=1 p50 (ms) | − baseline (ms) |" : ""}`);
  console.log(`|---|---:|---|---:|---|${MEASURE_SSE ? "---:|---|" : ""}${MEASURE_C1 ? "---:|---:|" : ""}`);
  binaries.forEach((binary, arm) => {
    const sse = MEASURE_SSE ? ` ${median(ttfb[arm]!).toFixed(2)} | ${ratio(ttfb, arm)} |` : "";
    const added = median(c1[arm]!.map((value, round) => value - c1[0]![round]!));
    const latency = MEASURE_C1 ? ` ${median(c1[arm]!).toFixed(3)} | ${arm === 0 ? "baseline" : `${added >= 0 ? "+" : ""}${added.toFixed(3)}`} |` : "";
    console.log(`| ${binary} | ${Math.round(median(rps[arm]!))} | ${ratio(rps, arm)} | ${median(cpu[arm]!).toFixed(1)} | ${ratio(cpu, arm)} |${sse}${latency}`);
  });
  entra.stop();
} finally {
  for (const child of children) child.kill("SIGKILL");
  rmSync(work, { recursive: true, force: true });
}
process.exit(0);
