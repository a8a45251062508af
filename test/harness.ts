/**
 * Runs auth-proxy the way production does, as its own process, and keeps
 * everything it prints so tests can assert on log lines and prove that no
 * secret ever appears in them.
 */
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";

export const ROOT = join(import.meta.dir, "..");
/** `bun proxy.ts` by default; AUTH_PROXY_BIN=dist/auth-proxy runs the same checks on the compiled binary. */
export const PROXY_COMMAND = process.env.AUTH_PROXY_BIN ? [process.env.AUTH_PROXY_BIN] : [process.execPath, join(ROOT, "proxy.ts")];

/** Every byte any proxy printed in this run, for the secret checks. */
export const allOutput: string[] = [];

export interface LogLine {
  time: string;
  level: string;
  msg: string;
  [field: string]: unknown;
}

export class ProxyProcess {
  readonly lines: LogLine[] = [];
  stdout = "";
  stderr = "";
  port = 0;
  exitCode: number | null = null;
  readonly exited: Promise<number>;
  private readonly listeners = new Set<() => void>();

  constructor(readonly proc: Subprocess<"ignore", "pipe" | number, "pipe">) {
    // stdout given as a file descriptor (a fifo a test reads itself) is not collected here.
    if (typeof proc.stdout !== "number") void this.pump(proc.stdout, (text) => {
      this.stdout += text;
      for (const line of text.split("\n")) {
        if (!line.trim()) continue;
        try {
          this.lines.push(JSON.parse(line) as LogLine);
        } catch {
          this.lines.push({ time: "", level: "unparsed", msg: line });
        }
      }
    });
    void this.pump(proc.stderr, (text) => (this.stderr += text));
    this.exited = proc.exited.then((code) => (this.exitCode = code));
  }

  private async pump(stream: ReadableStream<Uint8Array>, sink: (text: string) => void): Promise<void> {
    const decoder = new TextDecoder();
    let pending = "";
    for await (const chunk of stream) {
      const text = decoder.decode(chunk, { stream: true });
      allOutput.push(text);
      // Hand over whole lines only, so JSON lines are parsed intact.
      pending += text;
      const cut = pending.lastIndexOf("\n");
      if (cut === -1) continue;
      sink(pending.slice(0, cut + 1));
      pending = pending.slice(cut + 1);
      for (const listener of this.listeners) listener();
    }
    if (pending) sink(pending);
    for (const listener of this.listeners) listener();
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Resolves with the first log line matching, waiting up to `timeoutMs`. */
  waitForLog(predicate: (line: LogLine) => boolean, timeoutMs = 15000): Promise<LogLine> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const found = this.lines.find(predicate);
        if (found) {
          cleanup();
          resolve(found);
        } else if (this.exitCode !== null) {
          cleanup();
          reject(new Error(`proxy exited (${this.exitCode}) before the expected log line\n${this.stdout}${this.stderr}`));
        }
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`timed out waiting for a log line\n${this.stdout}${this.stderr}`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.listeners.delete(check);
      };
      this.listeners.add(check);
      void this.exited.then(check);
      check();
    });
  }

  /** Polls /health until it answers `status`. */
  async waitForHealth(status = 200, timeoutMs = 15000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const response = await fetch(`${this.url}/health`).catch(() => undefined);
      if (response?.status === status) return;
      await Bun.sleep(50);
    }
    throw new Error(`/health did not answer ${status} within ${timeoutMs} ms\n${this.stdout}${this.stderr}`);
  }

  async stop(): Promise<void> {
    if (this.exitCode === null) {
      this.proc.kill("SIGKILL");
      await this.exited;
    }
  }
}

const running = new Set<ProxyProcess>();

/**
 * AUTH_PROXY_TEST_ROUTES=1 runs every test with its API_BASE_URL given as a
 * routes file of one route `/` with that one backend (AZURE_SCOPE still the
 * scope): the contract says the two behave alike, and the whole suite is
 * the proof. A malformed API_BASE_URL, or one a test passes as a flag, is
 * left as it is: its own error is what such a test is about.
 */
export const ROUTES_MODE = process.env.AUTH_PROXY_TEST_ROUTES === "1";
const routesDir = ROUTES_MODE ? mkdtempSync(join(tmpdir(), "auth-proxy-routes-")) : "";
let routesFiles = 0;

function asRoutesFile(env: Record<string, string | undefined>, args: string[]): Record<string, string | undefined> {
  const base = env.API_BASE_URL;
  if (!ROUTES_MODE || base === undefined || env.AUTH_PROXY_ROUTES !== undefined || args.some((flag) => /^--(api-base-url|routes)/.test(flag))) return env;
  const url = URL.parse(base);
  if (url === null || !/^https?:$/.test(url.protocol) || url.search || url.hash || url.username) return env;
  const file = join(routesDir, `routes-${(routesFiles += 1)}.json`);
  writeFileSync(file, JSON.stringify({ routes: [{ prefix: "/", backends: [{ url: base }] }] }));
  return { ...env, API_BASE_URL: undefined, AUTH_PROXY_ROUTES: file };
}

/** Starts a proxy with `env` and arguments, without waiting for anything; `stdout` may be a file descriptor the test reads itself. */
export function spawnProxy(env: Record<string, string | undefined>, args: string[] = [], command = PROXY_COMMAND, stdout: "pipe" | number = "pipe"): ProxyProcess {
  const proc = Bun.spawn([...command, ...args], {
    cwd: ROOT,
    env: { PATH: process.env.PATH, HOME: process.env.HOME, ...asRoutesFile(env, args) },
    stdin: "ignore",
    stdout,
    stderr: "pipe",
  });
  const proxy = new ProxyProcess(proc);
  running.add(proxy);
  void proxy.exited.then(() => running.delete(proxy));
  return proxy;
}

/** A port free on loopback now: the kernel's pick, released for the proxy to take. */
export function freePort(): number {
  const probe = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response() });
  const port = probe.port!;
  probe.stop(true);
  return port;
}

/** Starts a proxy on a free loopback port and waits until /live answers. */
export async function startProxy(env: Record<string, string | undefined>, args: string[] = [], command = PROXY_COMMAND, stdout: "pipe" | number = "pipe"): Promise<ProxyProcess> {
  const port = freePort();
  const proxy = spawnProxy({ HOST: "127.0.0.1", PORT: String(port), ...env }, args, command, stdout);
  proxy.port = port;
  const deadline = Date.now() + 10_000;
  for (;;) {
    const live = await fetch(`${proxy.url}/live`).catch(() => undefined);
    if (live?.status === 200) return proxy;
    if (proxy.exitCode !== null || Date.now() > deadline) {
      throw new Error(`proxy did not come up (exit ${proxy.exitCode})\n${proxy.stdout}${proxy.stderr}`);
    }
    await Bun.sleep(10);
  }
}

export async function stopAllProxies(): Promise<void> {
  await Promise.all([...running].map((proxy) => proxy.stop()));
}

/** Polls `url` until it answers `status`, for 15 s at most: for servers the benchmark and soak start. */
export async function waitForStatus(url: string, status = 200): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    const response = await fetch(url).catch(() => undefined);
    if (response?.status === status) return;
    await Bun.sleep(20);
  }
  throw new Error(`${url} did not answer ${status}`);
}

/** The median: the figure the benchmarks quote, as the machines are shared and noisy. */
export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

/** A process's resident (VmRSS) or peak resident (VmHWM) memory, in KiB. */
export function memoryKiB(pid: number, field: "VmRSS" | "VmHWM" | "RssAnon" | "RssFile"): number {
  return Number(new RegExp(`${field}:\\s+(\\d+)`).exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
}
