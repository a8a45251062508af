/**
 * The benchmark's upstream: a fast fake Azure OpenAI. POST answers a ~1 KB
 * chat completion; /sse streams 50 events 5 ms apart; /slow-sse 20 events
 * 500 ms apart (for the 1,000-stream memory run); /1mb a 1 MB body; a
 * WebSocket upgrade on any path echoes every frame.
 * Usage: bun bench/upstream.ts <port>
 */
const port = Number(process.argv[2] ?? 9000);

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

function eventStream(events: number, intervalMs: number): Response {
  const body = new ReadableStream({
    type: "direct",
    async pull(controller) {
      for (let index = 0; index < events; index++) {
        if (index > 0) await Bun.sleep(intervalMs);
        controller.write(encoder.encode(`data: {"index":${index},"choices":[{"delta":{"content":"token"}}]}\n\n`));
        await controller.flush();
      }
      controller.close();
    },
  });
  return new Response(body, { headers: sseHeaders });
}

Bun.serve({
  hostname: "127.0.0.1",
  port,
  idleTimeout: 0,
  async fetch(req, server) {
    if (req.headers.get("upgrade") === "websocket" && server.upgrade(req, { data: undefined })) return undefined;
    const url = req.url;
    if (req.method === "POST") {
      await req.arrayBuffer();
      return new Response(completion, { headers: completionHeaders });
    }
    if (url.endsWith("/slow-sse")) return eventStream(20, 500);
    if (url.endsWith("/sse")) return eventStream(50, 5);
    if (url.endsWith("/1mb")) return new Response(oneMegabyte);
    return new Response("ok");
  },
  websocket: {
    idleTimeout: 0,
    message(ws, message) {
      ws.send(message);
    },
  },
});
