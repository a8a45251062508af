/**
 * Model token usage (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/usage.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { brotliCompressSync, constants as zlibConstants, deflateSync, gzipSync } from "node:zlib";
import { AzureOpenAI } from "openai";
import { newUsageScan, scanUsageBytes, type Usage, usageInBody } from "../src/usage.ts";
import { type CannedAnswer } from "../test/fakes.ts";
import { memoryKiB, startProxy, type ProxyProcess } from "../test/harness.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import * as usage from "../test/usage.ts";
import { TestSocket } from "../test/websocket.ts";
import { baseEnv, describeSecrets, lastReceived, proxyBodies, realtime, upstream, useSuite, waitFor } from "../test/suite.ts";
useSuite();

describe("Model token usage", () => {
  let proxy: ProxyProcess;
  beforeAll(async () => {
    proxy = await startProxy(baseEnv());
    await proxy.waitForHealth();
  });
  afterAll(() => proxy.stop());

  type Tokens = { input: number; output: number; cached_input: number; reasoning: number };
  /** The four series of one deployment and model, as /metrics has them now (0 where absent). */
  async function tokensOf(deployment: string, model: string, url = proxy.url): Promise<Tokens> {
    const { text, samples } = await scrape(url);
    proxyBodies.push(text);
    const of = (type: string) => valueOf(samples, "auth_proxy_model_tokens_total", { deployment, model, type }) ?? 0;
    return { input: of("input"), output: of("output"), cached_input: of("cached_input"), reasoning: of("reasoning") };
  }
  const minus = (after: Tokens, before: Tokens): Tokens => ({ input: after.input - before.input, output: after.output - before.output, cached_input: after.cached_input - before.cached_input, reasoning: after.reasoning - before.reasoning });
  const sha256 = (bytes: Uint8Array | string) => createHash("sha256").update(bytes).digest("hex");
  let answerNumber = 0;
  /** Registers a canned answer and returns its path under a deployment. */
  function canned(answer: CannedAnswer, deployment = "usage-tests"): { path: string; name: string } {
    const name = `answer-${(answerNumber += 1)}`;
    upstream.answers.set(name, answer);
    return { path: `/openai/deployments/${deployment}/test/answer/${name}`, name };
  }
  /** The access line of the last request to `path`, once written. */
  const accessLine = (path: string) => proxy.waitForLog((line) => line.msg === "request" && line.path === path);

  test("JSON answers of chat completions, completions, embeddings and the Responses API move the four series by exactly their usage; the access line carries the counts", async () => {
    const kinds: [string, string, string, Tokens][] = [
      ["chat", usage.chatCompletion(), "gpt-4o-2024-08-06", usage.CHAT_TOKENS],
      ["completions", usage.completion(), "gpt-35-turbo-instruct", usage.COMPLETION_TOKENS],
      ["embeddings", usage.embeddings(), "text-embedding-3-small", usage.EMBEDDINGS_TOKENS],
      ["responses", usage.response(), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS],
      // Larger than the proxy takes whole (64 KiB): relayed, scanned as it passes.
      ["embeddings-relayed", usage.embeddings(8), "text-embedding-3-small", usage.EMBEDDINGS_TOKENS],
    ];
    for (const [deployment, body, model, expected] of kinds) {
      const { path } = canned({ headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) }, parts: [body] }, deployment);
      const before = await tokensOf(deployment, model);
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: '{"input":"x"}' });
      expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(body));
      expect(minus(await tokensOf(deployment, model), before)).toEqual(expected);
      const line = await accessLine(path);
      expect(line).toMatchObject({ deployment, model, input_tokens: expected.input });
      if (deployment !== "completions" && !deployment.startsWith("embeddings")) expect(line).toMatchObject({ output_tokens: expected.output, cached_input_tokens: expected.cached_input, reasoning_tokens: expected.reasoning });
    }
    const { text } = await scrape(proxy.url);
    expect((await promtool(["check", "metrics"], text)).output).toBe("");
    expect(text).toContain("# TYPE auth_proxy_model_tokens_total counter\n");
  });

  test("a streamed chat is counted once from its final chunk when the client asked include_usage (the openai SDK), its request byte-exact; without it nothing is counted", async () => {
    const client = new AzureOpenAI({ endpoint: proxy.url, apiKey: "placeholder-key", apiVersion: "2024-10-21", deployment: "gpt-4o-stream" });
    const before = await tokensOf("gpt-4o-stream", "gpt-4o");
    const linesBefore = proxy.lines.filter((line) => line.msg === "request" && String(line.path).includes("gpt-4o-stream")).length;
    const stream = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true, stream_options: { include_usage: true } });
    let reported: unknown;
    for await (const chunk of stream) reported = chunk.usage ?? reported;
    expect(reported).toMatchObject({ prompt_tokens: 9, completion_tokens: 7 });
    const received = lastReceived();
    // The proxy never edits a request to get usage: the body the SDK sent is the body the upstream got.
    const sent = JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true, stream_options: { include_usage: true } });
    expect(received.bodySha256).toBe(sha256(sent));
    expect(minus(await tokensOf("gpt-4o-stream", "gpt-4o"), before)).toEqual({ input: 9, output: 7, cached_input: 0, reasoning: 0 });

    const plain = await client.chat.completions.create({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true });
    for await (const chunk of plain) expect(chunk.usage ?? null).toBeNull();
    expect(lastReceived().bodySha256).toBe(sha256(JSON.stringify({ model: "gpt-4o", messages: [{ role: "user", content: "Hi" }], stream: true })));
    expect(minus(await tokensOf("gpt-4o-stream", "gpt-4o"), before)).toEqual({ input: 9, output: 7, cached_input: 0, reasoning: 0 });
    // Access lines are written when the body ends, in the turn's write: the second may come after the client has read its stream.
    const streamLines = () => proxy.lines.filter((line) => line.msg === "request" && String(line.path).includes("gpt-4o-stream"));
    await waitFor(() => streamLines().length >= linesBefore + 2, 5000);
    const lines = streamLines();
    expect(lines.at(-1)!.input_tokens).toBeUndefined();
    expect(lines.at(-2)).toMatchObject({ model: "gpt-4o", input_tokens: 9, output_tokens: 7 });
  });

  test("the Responses API stream is counted from response.completed and Azure's chat stream from its last chunk; each event reaches the client before the upstream sends the next", async () => {
    for (const [events, model, expected] of [[usage.responseEvents(), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS], [usage.chatStreamEvents(), "gpt-4o-2024-08-06", usage.CHAT_TOKENS]] as const) {
      const { path, name } = canned({ headers: { "content-type": "text/event-stream" }, parts: [...events], gated: true }, "streams");
      const before = await tokensOf("streams", model);
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
      const reader = response.body!.getReader();
      let seen = "";
      for (let index = 0; index < events.length; index += 1) {
        while (seen.length < events.slice(0, index + 1).join("").length) {
          const { value, done } = await reader.read();
          if (done) break;
          seen += new TextDecoder().decode(value);
        }
        expect(seen).toBe(events.slice(0, index + 1).join(""));
        // The client has this event while the upstream still holds the next.
        if (index === events.length - 1) break;
        expect(upstream.lastPartWrittenAt.has(name)).toBe(false);
        upstream.releaseEvent();
      }
      expect((await reader.read()).done).toBe(true);
      expect(minus(await tokensOf("streams", model), before)).toEqual(expected);
    }
  });

  test("gzip, deflate and br answers pass byte-exact with Content-Encoding kept, and their usage is read from a decoded copy (held, relayed and streamed)", async () => {
    const body = usage.chatCompletion();
    const large = usage.embeddings(40);
    const events = usage.responseEvents().join("");
    const encoders: Record<string, (text: string) => Buffer> = { gzip: (text) => gzipSync(text), deflate: (text) => deflateSync(text), br: (text) => brotliCompressSync(text) };
    for (const [encoding, encode] of Object.entries(encoders)) {
      for (const [text, contentType, model, expected] of [[body, "application/json", "gpt-4o-2024-08-06", usage.CHAT_TOKENS], [large, "application/json", "text-embedding-3-small", usage.EMBEDDINGS_TOKENS], [events, "text/event-stream", "o4-mini-2025-04-16", usage.RESPONSES_TOKENS]] as const) {
        const encoded = encode(text);
        // The streamed answers come in many writes, unframed by length: the decoder sees the body as it passes.
        const parts = contentType === "text/event-stream" || text === large ? Array.from({ length: Math.ceil(encoded.length / 300) }, (_, index) => encoded.subarray(index * 300, (index + 1) * 300)) : [encoded];
        const headers: Record<string, string | number> = { "content-type": contentType, "content-encoding": encoding };
        if (parts.length === 1) headers["content-length"] = encoded.length;
        const deployment = `encoded-${encoding}`;
        const { path } = canned({ headers, parts, gapMs: parts.length > 1 ? 1 : 0 }, deployment);
        const before = await tokensOf(deployment, model);
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit);
        expect(response.headers.get("content-encoding")).toBe(encoding);
        expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(encoded));
        // A compressed body's decoder may finish a moment after the client has the last byte.
        let counted = minus(await tokensOf(deployment, model), before);
        for (let tries = 0; tries < 50 && counted.input === 0; tries += 1) {
          await Bun.sleep(20);
          counted = minus(await tokensOf(deployment, model), before);
        }
        expect(counted).toEqual(expected);
      }
    }
  });

  test("a usage object cut across many TCP writes is counted once, wherever the cuts fall", async () => {
    const body = usage.chatCompletion();
    const events = usage.chatStreamEvents().join("");
    for (const [text, contentType] of [[body, "application/json"], [events, "text/event-stream"]] as const) {
      for (const size of [1, 7, 64]) {
        const { path } = canned({ headers: { "content-type": contentType }, parts: usage.piecesOf(text, size), gapMs: size === 1 ? 0 : 2 }, "cut-usage");
        const before = await tokensOf("cut-usage", "gpt-4o-2024-08-06");
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
        expect(await response.text()).toBe(text);
        expect(minus(await tokensOf("cut-usage", "gpt-4o-2024-08-06"), before)).toEqual(usage.CHAT_TOKENS);
      }
    }
  }, 30_000);

  test("malformed, truncated or absurd usage is not counted and never an error; the proxy keeps serving", async () => {
    const bodies = [
      '{"model":"bad-usage","usage":{"prompt_tokens":-5,"completion_tokens":"7"}}',
      '{"model":"bad-usage","usage":{"prompt_tokens":1e300,"completion_tokens":null}}',
      '{"model":"bad-usage","usage":null}',
      '{"model":"bad-usage","usage":"lots"}',
      '{"model":"bad-usage","usage":{"prompt_tokens":5,"completion_tokens":2',
      '{"model":"bad-usage","usage":{"prompt_tokens":[1],"completion_tokens":{"n":2}}}',
      '{"model":"bad-usage","usage"',
      `{"model":"bad-usage","usage":{${" ".repeat(10_000)}`,
      "not json at all, \"usage\": {{{{",
    ];
    for (const body of bodies) {
      for (const framed of [true, false]) {
        const { path } = canned({ headers: framed ? { "content-type": "application/json", "content-length": body.length } : { "content-type": "application/json" }, parts: [body] }, "malformed");
        const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
        expect(response.status).toBe(200);
        expect(await response.text()).toBe(body);
      }
    }
    // A gzip body that is not gzip, and one cut short.
    const gz = gzipSync(usage.chatCompletion());
    for (const bytes of [Buffer.from("definitely not gzip"), gz.subarray(0, gz.length - 20)]) {
      const { path } = canned({ headers: { "content-type": "application/json", "content-encoding": "gzip" }, parts: [bytes] }, "malformed");
      const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit);
      expect(sha256(new Uint8Array(await response.arrayBuffer()))).toBe(sha256(bytes));
    }
    const { samples } = await scrape(proxy.url);
    expect(samples.filter((sample) => sample.name === "auth_proxy_model_tokens_total" && sample.labels.deployment === "malformed")).toEqual([]);
    // Still serving, and still counting.
    const { path } = canned({ headers: { "content-type": "application/json" }, parts: [usage.completion()] }, "malformed");
    await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text();
    expect(await tokensOf("malformed", "gpt-35-turbo-instruct")).toEqual(usage.COMPLETION_TOKENS);
    expect(proxy.lines.filter((line) => line.level === "error")).toEqual([]);
  });

  test("a 30 MB answer is scanned as it passes: its usage at the end is counted, the proxy's RSS moves by under 15 MB", async () => {
    const body = usage.embeddings(1600, 400_000);
    expect(body.length).toBeGreaterThan(30_000_000);
    const { path } = canned({ headers: { "content-type": "application/json", "content-length": body.length }, parts: usage.piecesOf(body, 256 * 1024) }, "large");
    const rss = () => memoryKiB(proxy.proc.pid, "VmRSS");
    await fetch(`${proxy.url}/health`);
    const before = rss();
    let peak = before;
    const sampler = setInterval(() => (peak = Math.max(peak, rss())), 5);
    const response = await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" });
    const hash = createHash("sha256");
    for await (const chunk of response.body!) {
      hash.update(chunk);
      peak = Math.max(peak, rss());
    }
    clearInterval(sampler);
    expect(hash.digest("hex")).toBe(sha256(body));
    expect(await tokensOf("large", "text-embedding-3-small")).toEqual({ input: 400_000, output: 0, cached_input: 0, reasoning: 0 });
    console.log(`30 MB answer: proxy RSS ${(before / 1024).toFixed(1)} MB before, peak ${(peak / 1024).toFixed(1)} MB`);
    expect(peak - before).toBeLessThan(15 * 1024);
  }, 60_000);

  test("Realtime response.done events are counted under the query's deployment and session.created's model; the session line sums them", async () => {
    const wsProxy = await startProxy(baseEnv({ API_BASE_URL: realtime.url }));
    await wsProxy.waitForHealth();
    const client = new TestSocket(`ws://127.0.0.1:${wsProxy.port}/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime`);
    await client.opened;
    await client.waitForFrames(1);
    // The fake echoes every text frame: these come back from the upstream as server events.
    client.send(usage.realtimeResponseDone(100, 20, 30));
    client.send(JSON.stringify({ type: "response.audio.delta", event_id: "e", delta: "A".repeat(50_000) }));
    client.send(usage.realtimeResponseDone(250, 60, 0));
    client.send('{"type":"response.done","response":{"usage":{"input_tokens":"many"}}}');
    await client.waitForFrames(5);
    const model = "gpt-4o-realtime-preview-2024-12-17";
    expect(await tokensOf("gpt-4o-realtime", model, wsProxy.url)).toEqual({ input: 350, output: 80, cached_input: 30, reasoning: 0 });
    client.socket.close(1000, "done");
    const line = await wsProxy.waitForLog((entry) => entry.msg === "websocket session");
    expect(line).toMatchObject({ model, input_tokens: 350, output_tokens: 80, cached_input_tokens: 30 });
    await wsProxy.stop();
  });

  test("200 distinct model names give at most 51 label values (50 and `other`), every token counted", async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    for (let index = 0; index < 200; index += 1) {
      const body = JSON.stringify({ model: `model-${index}`, usage: { prompt_tokens: 1, completion_tokens: 2 } });
      const { path } = canned({ headers: { "content-type": "application/json" }, parts: [body] }, "many-models");
      await (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}" })).text();
    }
    const { samples, text } = await scrape(fresh.url);
    proxyBodies.push(text);
    const input = samples.filter((sample) => sample.name === "auth_proxy_model_tokens_total" && sample.labels.type === "input");
    expect(new Set(input.map((sample) => sample.labels.model)).size).toBe(51);
    expect(valueOf(samples, "auth_proxy_model_tokens_total", { model: "other", type: "input" })).toBe(150);
    expect(valueOf(samples, "auth_proxy_model_tokens_total", { type: "output" })).toBe(400);
    await fresh.stop();
  });

  test("only the answer's own top-level usage counts: usage-shaped metadata, message text, tool arguments and nested objects, before or after it, neither hide nor forge it", async () => {
    const shapes: [string, string][] = [
      ["metadata-text-after", usage.responseEchoing({ usage: "n/a" })],
      ["metadata-object-after", usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" })],
      ["metadata-object-first", usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" }, true)],
    ];
    for (const [deployment, body] of shapes) {
      for (const size of [body.length, 7]) {
        // Whole (held with a Content-Length) and cut into 7-byte writes (relayed, chunked).
        const headers: Record<string, string | number> = size === body.length ? { "content-type": "application/json", "content-length": body.length } : { "content-type": "application/json" };
        const before = await tokensOf(deployment, "o4-mini-2025-04-16");
        const { path } = canned({ headers, parts: usage.piecesOf(body, size) }, deployment);
        expect(await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text()).toBe(body);
        expect(minus(await tokensOf(deployment, "o4-mini-2025-04-16"), before), `${deployment} in pieces of ${size}`).toEqual(usage.RESPONSES_TOKENS);
        expect(await accessLine(path)).toMatchObject({ model: "o4-mini-2025-04-16", input_tokens: 36, output_tokens: 87 });
      }
      expect(await tokensOf(deployment, "fake")).toEqual({ input: 0, output: 0, cached_input: 0, reasoning: 0 });
    }
    // Streams: a Responses event's `response.usage` counts, its metadata's does not; a chat chunk's top-level usage counts, one nested in a later chunk's delta does not.
    const created = `event: response.created\ndata: ${JSON.stringify({ type: "response.created", sequence_number: 0, response: { model: "o4-mini-2025-04-16", usage: null, metadata: { usage: usage.USAGE_SHAPED } } })}\n\n`;
    const nested = `data: ${JSON.stringify({ choices: [{ delta: { tool_calls: [{ function: { arguments: "{}" } }], usage: usage.USAGE_SHAPED }, index: 0 }], model: "gpt-4o-2024-08-06", usage: null })}\n\n`;
    const streams: [string, string, string, Tokens][] = [
      ["stream-responses", created + usage.responseEvents().join(""), "o4-mini-2025-04-16", usage.RESPONSES_TOKENS],
      ["stream-chat", usage.chatStreamEvents().slice(0, -1).join("") + nested + "data: [DONE]\n\n", "gpt-4o-2024-08-06", usage.CHAT_TOKENS],
    ];
    for (const [deployment, events, model, expected] of streams) {
      const { path } = canned({ headers: { "content-type": "text/event-stream" }, parts: usage.piecesOf(events, 64) }, deployment);
      expect(await (await fetch(`${proxy.url}${path}`, { method: "POST", body: "{}" })).text()).toBe(events);
      await accessLine(path);
      expect(await tokensOf(deployment, model), deployment).toEqual(expected);
    }
  });

  /** The proxy's peak RSS over `read` (sampled every 5 ms and at every chunk) and the slowest /live answer meanwhile. */
  async function peakAndLive(target: ProxyProcess, read: (onChunk: () => void) => Promise<void>): Promise<{ peakKiB: number; slowestLiveMs: number }> {
    const rss = () => memoryKiB(target.proc.pid, "VmRSS");
    let peakKiB = rss();
    const sampler = setInterval(() => (peakKiB = Math.max(peakKiB, rss())), 5);
    let slowestLiveMs = 0;
    let reading = true;
    const poller = (async () => {
      while (reading) {
        const startedAt = performance.now();
        await (await fetch(`${target.url}/live`)).text();
        slowestLiveMs = Math.max(slowestLiveMs, performance.now() - startedAt);
        await Bun.sleep(20);
      }
    })();
    await read(() => (peakKiB = Math.max(peakKiB, rss())));
    reading = false;
    await poller;
    clearInterval(sampler);
    return { peakKiB, slowestLiveMs };
  }

  test('a stream of `"usage":` (or `"model":`) and then 24 MB of blanks costs the RSS of a plain 24 MB stream (within 10 MB) and /live stays under 100 ms', async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    const blanks = Buffer.alloc(1024 * 1024, " ");
    const stream = async (prefix: string) => {
      const { path } = canned({ headers: { "content-type": "text/event-stream" }, parts: [prefix, ...Array.from({ length: 24 }, () => blanks), "}\n\n"] }, "blanks");
      const before = memoryKiB(fresh.proc.pid, "VmRSS");
      const { peakKiB, slowestLiveMs } = await peakAndLive(fresh, async (onChunk) => {
        let bytes = 0;
        for await (const chunk of (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}" })).body!) {
          bytes += chunk.byteLength;
          onChunk();
        }
        expect(bytes).toBe(prefix.length + 24 * blanks.length + 3);
      });
      return { grewKiB: peakKiB - before, slowestLiveMs };
    };
    const plain = await stream("data: {");
    const usageKey = await stream('data: {"usage":');
    const modelKey = await stream('data: {"model":');
    console.log(`24 MB stream: RSS +${(plain.grewKiB / 1024).toFixed(1)} MB plain, +${(usageKey.grewKiB / 1024).toFixed(1)} MB after "usage":, +${(modelKey.grewKiB / 1024).toFixed(1)} MB after "model":; /live at most ${Math.max(plain.slowestLiveMs, usageKey.slowestLiveMs, modelKey.slowestLiveMs).toFixed(0)} ms`);
    for (const hostile of [usageKey, modelKey]) {
      expect(hostile.grewKiB - plain.grewKiB).toBeLessThan(10 * 1024);
      expect(hostile.slowestLiveMs).toBeLessThan(100);
    }
    await fresh.stop();
  }, 60_000);

  test("eight 500-byte br answers that expand to 300 MiB of blanks: the client gets the bytes as sent, RSS stays within 64 MB of idle, /live under 200 ms", async () => {
    const fresh = await startProxy(baseEnv());
    await fresh.waitForHealth();
    const bomb = brotliCompressSync(Buffer.alloc(300 * 1024 * 1024, " "), { params: { [zlibConstants.BROTLI_PARAM_QUALITY]: 5 } });
    expect(bomb.length).toBeLessThan(1000);
    const { path } = canned({ headers: { "content-type": "application/json", "content-encoding": "br", "content-length": bomb.length }, parts: [bomb] }, "bomb");
    await fetch(`${fresh.url}/health`);
    const idle = memoryKiB(fresh.proc.pid, "VmRSS");
    const { peakKiB, slowestLiveMs } = await peakAndLive(fresh, async () => {
      const bodies = await Promise.all(Array.from({ length: 8 }, async () => new Uint8Array(await (await fetch(`${fresh.url}${path}`, { method: "POST", body: "{}", decompress: false } as RequestInit)).arrayBuffer())));
      for (const body of bodies) expect(sha256(body)).toBe(sha256(bomb));
      // The exchanges end (and their lines are written) once the decoders are done.
      for (let index = 0; index < 8; index += 1) await fresh.waitForLog((line) => line.msg === "request" && line.path === path && fresh.lines.filter((other) => other.path === path).length > index, 30_000);
    });
    console.log(`8 br bombs: RSS ${(idle / 1024).toFixed(1)} MB idle, peak ${(peakKiB / 1024).toFixed(1)} MB; /live at most ${slowestLiveMs.toFixed(0)} ms`);
    expect(peakKiB - idle).toBeLessThan(64 * 1024);
    expect(slowestLiveMs).toBeLessThan(200);
    await fresh.stop();
  }, 90_000);
});

describe("Pure pieces", () => {
  test("a whole answer's usage read from its end is the forward scan's, and so is every chunked scan of it, wherever the cuts fall", () => {
    const shapes = [
      usage.chatCompletion(),
      usage.completion(),
      usage.embeddings(),
      usage.response(),
      usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" }),
      usage.responseEchoing({ usage: usage.USAGE_SHAPED, model: "fake" }, true),
      usage.responseEchoing({ usage: "n/a" }),
      usage.realtimeResponseDone(10, 2, 4),
      '{"usage":null,"model":"m"}',
      '{"model":"m","usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}',
      '{"a":"}\\\\","usage":{"prompt_tokens":3},"b":["\\"usage\\":{}",{"usage":{"prompt_tokens":9}}]}',
      '[{"usage":{"prompt_tokens":1}}]',
      '{"usage":{"prompt_tokens":1}} trailing',
      "{}",
    ];
    for (const text of shapes) {
      const bytes = new TextEncoder().encode(text);
      const forward = newUsageScan();
      scanUsageBytes(forward, bytes);
      const expected = forward.usage === undefined ? undefined : { model: forward.model, tokens: forward.usage };
      expect(usageInBody(bytes), text).toEqual(expected);
      for (let cut = 1; cut < bytes.length; cut += Math.max(1, Math.floor(bytes.length / 97))) {
        const chunked = newUsageScan();
        scanUsageBytes(chunked, bytes.subarray(0, cut));
        scanUsageBytes(chunked, bytes.subarray(cut));
        expect(chunked.usage, `${text} cut at ${cut}`).toEqual(forward.usage);
      }
    }
  });

  test("usageInBody reads usage in place: pretty-printed, escaped, nested and hostile shapes, the last usage and the nearest model", () => {
    const read = (text: string) => usageInBody(new TextEncoder().encode(text));
    const cases: [string, Usage | undefined][] = [
      ['{\n  "model" : "gpt-4o",\n  "usage" : {\n    "prompt_tokens" : 3 ,\n    "completion_tokens" : 4\n  }\n}', { model: "gpt-4o", tokens: [3, 4, -1, -1] }],
      ['{"model":"a","usage":{"note":"has \\"quotes\\" and {braces}","extra":[1,{"x":[2]}],"prompt_tokens":7,"completion_tokens":0,"prompt_tokens_details":{"audio_tokens":1,"cached_tokens":5}}}', { model: "a", tokens: [7, 0, 5, -1] }],
      // A usage inside content is a string, escaped; the last real key wins.
      ['{"model":"m","choices":[{"text":"\\"usage\\":{\\"prompt_tokens\\":99}"}],"usage":{"input_tokens":1,"output_tokens":2,"output_tokens_details":{"reasoning_tokens":2}}}', { model: "m", tokens: [1, 2, -1, 2] }],
      // Azure's order: the model nearest before the usage, not a model key named in an earlier object's value.
      ['{"choices":[],"created":1,"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":1,"completion_tokens":1}}', { model: "gpt-4o-2024-08-06", tokens: [1, 1, -1, -1] }],
      ['{"usage":{"prompt_tokens":1.5,"completion_tokens":2e3}}', undefined],
      ['{"usage":{"prompt_tokens":-1,"completion_tokens":2}}', { model: "", tokens: [-1, 2, -1, -1] }],
      ['{"usage":{"prompt_tokens":1,"completion_tokens":2,}}', undefined],
      ['{"usage":{"prompt_tokens":1 "completion_tokens":2}}', undefined],
      ['{"usage":{"prompt_tokens":100000001}}', undefined],
      ['{"model":"x y","usage":{"prompt_tokens":1}}', { model: "", tokens: [1, -1, -1, -1] }],
      ['{"model":"gpt-4o","usage":{"completion_tokens":3,"completion_tokens_details":{"reasoning_tokens":4}}}', { model: "gpt-4o", tokens: [-1, 3, -1, -1] }],
    ];
    for (const [text, expected] of cases) expect(read(text), text).toEqual(expected);
    // Realtime's shape (`input_token_details`), read by the same reader.
    expect(read('{"type":"response.done","response":{"usage":{"input_tokens":10,"output_tokens":2,"input_token_details":{"cached_tokens":4}}}}')).toEqual({ model: "", tokens: [10, 2, 4, -1] });
    expect(read('{"type":"response.done","response":{"usage":{"input_tokens":"10","output_tokens":null}}}')).toBeUndefined();
  });
});

describeSecrets();
