/**
 * What the limits tests share: a real redis-server (Debian's package) on a
 * free port without persistence, stopped by PID; and an upstream that
 * answers with known usage, deterministic to the byte so a stream can be
 * compared with and without `stream_options.include_usage`.
 */
import { RedisClient, type Subprocess } from "bun";
import { freePort } from "./harness.ts";

export class RedisServer {
  port = 0;
  private proc: Subprocess | undefined;
  client: RedisClient | undefined;

  /** Started (again, on the same port when it was started before), answering PING. */
  async start(): Promise<this> {
    if (this.port === 0) this.port = freePort();
    this.proc = Bun.spawn(["redis-server", "--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"], { stdout: "ignore", stderr: "inherit" });
    for (let attempt = 0; attempt < 100; attempt += 1) {
      try {
        this.client?.close();
        this.client = new RedisClient(this.url, { enableOfflineQueue: false, autoReconnect: false });
        await this.client.connect();
        if ((await this.client.send("PING", [])) === "PONG") return this;
      } catch {
        await Bun.sleep(50);
      }
    }
    throw new Error("redis-server did not start");
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** No anonymous access any more: the helper signs in as an admin user of its own, as an operator would. */
  async lockDown(): Promise<void> {
    await this.command("ACL", ["SETUSER", "admin", "on", ">admin-password-for-tests", "~*", "&*", "+@all"]);
    this.client!.close();
    this.client = new RedisClient(`redis://admin:admin-password-for-tests@127.0.0.1:${this.port}`, { enableOfflineQueue: false, autoReconnect: false });
    await this.client.connect();
    await this.command("ACL", ["SETUSER", "default", "off"]);
  }

  /** SIGKILL: what a crashed or evicted Redis pod does; nothing is saved. */
  async kill(): Promise<void> {
    this.client?.close();
    this.client = undefined;
    this.proc?.kill(9);
    await this.proc?.exited;
  }

  async command(name: string, args: string[] = []): Promise<unknown> {
    return this.client!.send(name, args);
  }

  /** A caller's token counts for today and this month (UTC), as the store keeps them. */
  async totals(caller: string): Promise<{ day: number; month: number }> {
    const iso = new Date().toISOString();
    const day = await this.command("GET", [`auth-proxy:{${caller}}:day:${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}`]);
    const month = await this.command("GET", [`auth-proxy:{${caller}}:month:${iso.slice(0, 4)}${iso.slice(5, 7)}`]);
    return { day: Number(day ?? 0), month: Number(month ?? 0) };
  }
}

/** One request as the usage upstream received it. */
export interface UsageRequest {
  path: string;
  body: string;
  at: number;
}

/** Prompt and completion tokens each answer reports, unless the request's `x-test-usage: <prompt>,<completion>` says otherwise. */
export const ANSWER_USAGE = { prompt: 100, completion: 80 };

const STREAM_WORDS = ["Hello", " from", " a", " stream", "."];

/** The chunks of a chat stream, byte for byte, as an OpenAI-shaped upstream writes them with or without include_usage. */
export function chatStream(includeUsage: boolean, usage = ANSWER_USAGE): string {
  const base = { id: "chatcmpl-fixed", object: "chat.completion.chunk", created: 1_790_000_000, model: "gpt-4o-2024-08-06", system_fingerprint: "fp_fixed" };
  const extra = includeUsage ? { usage: null } : {};
  const chunks = [
    { choices: [], created: 0, id: "", model: "", object: "", prompt_filter_results: [{ prompt_index: 0, content_filter_results: {} }] },
    ...STREAM_WORDS.map((word, index) => ({ ...base, choices: [{ index: 0, delta: index === 0 ? { role: "assistant", content: word } : { content: word }, finish_reason: null }], ...extra })),
    { ...base, choices: [{ index: 0, delta: {}, finish_reason: "stop" }], ...extra },
  ];
  let text = chunks.map((chunk) => `data: ${JSON.stringify(chunk)}\n\n`).join("");
  if (includeUsage) text += `data: ${JSON.stringify({ ...base, choices: [], usage: { prompt_tokens: usage.prompt, completion_tokens: usage.completion, total_tokens: usage.prompt + usage.completion } })}\n\n`;
  return `${text}data: [DONE]\n\n`;
}

/**
 * An upstream answering chat completions (JSON or SSE, one event per write),
 * Responses streams, a 503 with no usage (`/fail/`), and a stream that
 * waits after its first event (`/hold/`), with known usage throughout.
 */
export class UsageUpstream {
  readonly received: UsageRequest[] = [];
  private server: ReturnType<typeof Bun.serve> | undefined;

  start(): this {
    this.server = Bun.serve({ hostname: "127.0.0.1", port: 0, idleTimeout: 0, fetch: (req) => this.answer(req) });
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${this.server!.port}`;
  }

  stop(): void {
    this.server?.stop(true);
  }

  private async answer(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const body = await req.text();
    this.received.push({ path: url.pathname + url.search, body, at: Date.now() });
    const [prompt, completion] = (req.headers.get("x-test-usage") ?? `${ANSWER_USAGE.prompt},${ANSWER_USAGE.completion}`).split(",").map(Number) as [number, number];
    if (url.pathname.includes("/fail/")) return Response.json({ error: { code: "503", message: "busy" } }, { status: 503 });
    const request = body === "" ? {} : (JSON.parse(body) as { stream?: boolean; stream_options?: { include_usage?: boolean } });
    if (url.pathname.endsWith("/responses") && request.stream) {
      const usage = { input_tokens: prompt, output_tokens: completion, total_tokens: prompt + completion };
      return sse([`event: response.created\ndata: {"type":"response.created"}\n\n`, `event: response.completed\ndata: ${JSON.stringify({ type: "response.completed", response: { id: "resp_1", model: "gpt-4o", usage } })}\n\n`]);
    }
    if (url.pathname.includes("/hold/")) {
      return sse([chatStream(false).split("\n\n")[0] + "\n\n"], 60_000);
    }
    if (request.stream) {
      const text = chatStream(request.stream_options?.include_usage === true, { prompt, completion });
      return sse(text.split(/(?<=\n\n)/));
    }
    // Azure's own quota headers, which pass to the client beside the proxy's.
    const quota = { "x-ratelimit-remaining-tokens": "4242", "x-ratelimit-remaining-requests": "42" };
    return Response.json({ id: "chatcmpl-1", object: "chat.completion", model: "gpt-4o", choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }], usage: { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion } }, { headers: quota });
  }
}

/** Events written one at a time (a stream's real framing), then held open `holdMs` before the end. */
function sse(events: string[], holdMs = 0): Response {
  const encoder = new TextEncoder();
  return new Response(
    new ReadableStream({
      async pull(controller) {
        for (const event of events) {
          controller.enqueue(encoder.encode(event));
          await Bun.sleep(2);
        }
        if (holdMs > 0) await Bun.sleep(holdMs);
        controller.close();
      },
    }),
    { headers: { "content-type": "text/event-stream", "cache-control": "no-cache" } },
  );
}

/** A chat request whose reservation (bytes / 4 + max_tokens: 215) covers the usage the upstream reports (180). */
export const LOAD_BODY = JSON.stringify({ messages: [{ role: "user", content: "l".repeat(400) }], max_tokens: 100 });

/** One request of a load: when it started, how it ended, how long it took, which replica took it. */
export interface Offered {
  startedAt: number;
  status: number;
  code: string | undefined;
  tookMs: number;
  replica: number;
}

/**
 * `clients` clients of one caller, spread over the replicas, each sending a
 * request every `everyMs` for `durationMs` (an answer slower than that
 * delays its client's next), as a steady load offers it.
 */
export async function offerLoad(urls: string[], key: string, clients: number, everyMs: number, durationMs: number, target = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"): Promise<Offered[]> {
  const offered: Offered[] = [];
  const end = Date.now() + durationMs;
  await Promise.all(
    Array.from({ length: clients }, async (_, client) => {
      const replica = client % urls.length;
      await Bun.sleep((everyMs * client) / clients);
      for (let next = Date.now(); next < end; next += everyMs) {
        const startedAt = Date.now();
        let status = 0;
        let code: string | undefined;
        try {
          const response = await fetch(`${urls[replica]}${target}`, { method: "POST", headers: { "api-key": key, "content-type": "application/json" }, body: LOAD_BODY });
          status = response.status;
          const text = await response.text();
          if (status !== 200) code = (JSON.parse(text) as { error?: { code?: string } }).error?.code;
        } catch {
          status = -1;
        }
        offered.push({ startedAt, status, code, tookMs: Date.now() - startedAt, replica });
        await Bun.sleep(Math.max(0, next + everyMs - Date.now()));
      }
    }),
  );
  return offered;
}

/** The most tokens admitted in any 60 s, from the upstream's arrival times (each request's usage known). */
export function mostInAnyMinute(arrivals: number[], tokensEach: number): number {
  const sorted = [...arrivals].sort((a, b) => a - b);
  let most = 0;
  let from = 0;
  for (let to = 0; to < sorted.length; to += 1) {
    while (sorted[to]! - sorted[from]! >= 60_000) from += 1;
    most = Math.max(most, (to - from + 1) * tokensEach);
  }
  return most;
}

/** A caller's access lines, as the tests and the soak read them. */
export interface CallerLine {
  time: string;
  limits: string;
  status: number;
}

/** What a Redis outage under load came to: the requests made while Redis was surely down, the caller's access lines, and how many Redis counted after its return. */
export interface Outage {
  offered: Offered[];
  during: Offered[];
  lines: CallerLine[];
  countedInRedis: number;
  killedAt: number;
  restartedAt: number;
}

/**
 * `batch`'s clients on `proxies` for `seconds`; Redis SIGKILLed after
 * `killAfterMs` and started again `downMs` later. A request counts as made
 * while Redis was away when it started 100 ms after the kill and ended
 * before Redis was spawned again (serving from it may start before
 * start() has seen it answer).
 */
export async function outageUnderLoad(proxies: { url: string; stdout: string }[], redis: RedisServer, everyMs: number, seconds: number, killAfterMs: number, downMs: number): Promise<Outage> {
  const load = offerLoad(proxies.map((proxy) => proxy.url), "batch-key-0001", 30, everyMs, seconds * 1000);
  await Bun.sleep(killAfterMs);
  const killedAt = Date.now();
  await redis.kill();
  await Bun.sleep(downMs);
  const restartingAt = Date.now();
  await redis.start();
  const restartedAt = Date.now();
  const offered = await load;
  await Bun.sleep(300);
  const lines = proxies.flatMap((proxy) => proxy.stdout.split("\n").filter((line) => line.includes('"caller":"batch"')).map((line) => JSON.parse(line) as CallerLine));
  return {
    offered,
    during: offered.filter((request) => request.startedAt > killedAt + 100 && request.startedAt + request.tookMs < restartingAt),
    lines,
    // Nothing from before Redis died: its settlements are dropped by generation.
    countedInRedis: lines.filter((line) => Date.parse(line.time) > restartingAt && line.limits === "redis" && line.status === 200).length,
    killedAt,
    restartedAt,
  };
}
