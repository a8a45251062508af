/**
 * The benchmark's and the soak's upstream: a fast fake Azure OpenAI.
 * POST answers a ~1 KB chat completion (429 under /always-429/); /sse streams 50 events 5 ms apart;
 * /slow-sse 20 events 500 ms apart; /1mb a 1 MB body; /big?mb=N N MiB sent as
 * fast as the reader takes them; /hold?events=N&interval=MS
 * N events then `data: [DONE]`; /silent?ms= answers after a silence;
 * /silent-stream?ms= one event, a silence, one more; /stats counts streams
 * started, completed and abandoned by the client (`?reset` zeroes them) and
 * the TCP (or TLS) connections accepted; a WebSocket upgrade on any path
 * echoes every frame.
 * Usage: bun bench/upstream.ts <port> [<tls-cert.pem> <tls-key.pem>]
 */
import { readFileSync } from "node:fs";

const port = Number(process.argv[2] ?? 9000);
const [certPath, keyPath] = process.argv.slice(3);
const tls = certPath && keyPath ? { cert: readFileSync(certPath, "utf8"), key: readFileSync(keyPath, "utf8") } : undefined;

const completion = JSON.stringify({
  id: "chatcmpl-bench",
  object: "chat.completion",
  created: 1_790_000_000,
  model: "gpt-4o",
  choices: [{ index: 0, finish_reason: "stop", message: { role: "assistant", content: "x".repeat(760) } }],
  usage: { prompt_tokens: 9, completion_tokens: 190, total_tokens: 199 },
});
const completionHeaders = { "content-type": "application/json" };
const sseHeaders = { "content-type": "text/event-stream", "cache-control": "no-cache" };
const oneMegabyte = new Uint8Array(1 << 20).fill(97);
const encoder = new TextEncoder();
const stats = { started: 0, completed: 0, abandoned: 0 };
/** Each connection's client port, seen once: a new port is a new TCP (and TLS) connection. */
const connectionPorts = new Set<number>();

/** `events` SSE events `intervalMs` apart; with `done`, a final `data: [DONE]`. Counts how the stream ended. */
function eventStream(req: Request, events: number, intervalMs: number, done = false): Response {
  stats.started += 1;
  let ended = false;
  const end = (how: "completed" | "abandoned") => {
    if (!ended) stats[how] += 1;
    ended = true;
  };
  const body = new ReadableStream({
    type: "direct",
    async pull(controller) {
      try {
        for (let index = 0; index < events; index++) {
          if (index > 0) await Bun.sleep(intervalMs);
          if (req.signal.aborted || ended) throw new Error("client gone");
          controller.write(encoder.encode(`data: {"index":${index},"choices":[{"delta":{"content":"token"}}]}\n\n`));
          await controller.flush();
        }
        if (done) controller.write(encoder.encode("data: [DONE]\n\n"));
        controller.close();
        end("completed");
      } catch {
        end("abandoned");
      }
    },
    cancel() {
      end("abandoned");
    },
  });
  return new Response(body, { headers: sseHeaders });
}

function query(url: string, name: string, fallback: number): number {
  const match = new RegExp(`[?&]${name}=(\\d+)`).exec(url);
  return match ? Number(match[1]) : fallback;
}

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  tls,
  idleTimeout: 0,
  async fetch(req, server) {
    const client = server.requestIP(req);
    if (client) connectionPorts.add(client.port);
    if (req.headers.get("upgrade") === "websocket" && server.upgrade(req, { data: undefined })) return undefined;
    const url = req.url;
    if (req.method === "POST") {
      await req.arrayBuffer();
      // A throttled deployment that names no rest: a pool's first backend in the failover bench.
      if (url.includes("/always-429/")) return new Response('{"error":{"code":"429","message":"throttled"}}', { status: 429, headers: { ...completionHeaders, "retry-after-ms": "0" } });
      return new Response(completion, { headers: completionHeaders });
    }
    const path = url.slice(url.indexOf("/", url.indexOf("//") + 2)).split("?")[0]!;
    switch (path) {
      case "/slow-sse":
        return eventStream(req, 20, 500);
      case "/sse":
        return eventStream(req, 50, 5);
      case "/hold":
        return eventStream(req, query(url, "events", 10), query(url, "interval", 1000), true);
      case "/1mb":
        return new Response(oneMegabyte);
      case "/big": {
        const total = query(url, "mb", 1) << 20;
        let sent = 0;
        const body = new ReadableStream<Uint8Array>({
          pull(controller) {
            if (sent >= total) return controller.close();
            controller.enqueue(oneMegabyte.subarray(0, 64 * 1024));
            sent += 64 * 1024;
          },
        }, { highWaterMark: 0 });
        return new Response(body, { headers: { "content-type": "application/octet-stream", "content-length": String(total) } });
      }
      case "/silent":
        await Bun.sleep(query(url, "ms", 1000));
        return Response.json({ late: true });
      case "/silent-stream": {
        const silence = query(url, "ms", 1000);
        const body = new ReadableStream({
          type: "direct",
          async pull(controller) {
            controller.write('data: {"before":"silence"}\n\n');
            await controller.flush();
            await Bun.sleep(silence);
            controller.write('data: {"after":"silence"}\n\n');
            controller.close();
          },
        });
        return new Response(body, { headers: sseHeaders });
      }
      case "/stats": {
        const snapshot = { ...stats, connections: connectionPorts.size };
        if (url.includes("reset")) {
          Object.assign(stats, { started: 0, completed: 0, abandoned: 0 });
          connectionPorts.clear();
        }
        return Response.json(snapshot);
      }
      default:
        return new Response("ok");
    }
  },
  websocket: {
    idleTimeout: 0,
    message(ws, message) {
      ws.send(message);
    },
  },
});
void server;
