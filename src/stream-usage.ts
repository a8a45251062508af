/**
 * Streams counted exactly for callers with token limits: the one change
 * the proxy makes to a request body. A chat or completions stream that
 * did not ask for usage is sent `stream_options.include_usage`, and what
 * the option adds to the answer (a `"usage":null` in every chunk, one
 * usage-only chunk before `[DONE]`, as the OpenAI reference says) is taken
 * out again, so the client receives the bytes it would have received.
 *
 * Imports: usage.
 */
import { type Usage, usageInBody } from "./usage.ts";

/**
 * Azure OpenAI took `stream_options` from api-version 2024-09-01-preview
 * (GA 2024-10-21); earlier versions answer 400 "Unrecognized request
 * argument supplied: stream_options" (openai/openai-python#1469,
 * Azure/azure-rest-api-specs#29157). The v1 API (`/openai/v1/`, api-version
 * absent, `preview` or `latest`) and OpenAI-shaped upstreams take it.
 */
const FIRST_API_VERSION_WITH_STREAM_OPTIONS = "2024-09-01";

/** Whether an upstream at this target accepts `stream_options`; an Azure deployment path without api-version is not guessed at. */
export function takesStreamOptions(target: string): boolean {
  const version = /[?&]api-version=([^&#]*)/.exec(target)?.[1];
  if (version === undefined) return !target.startsWith("/openai/deployments/");
  if (version === "preview" || version === "latest" || version === "v1") return true;
  return /^\d{4}-\d{2}-\d{2}/.test(version) && version.slice(0, 10) >= FIRST_API_VERSION_WITH_STREAM_OPTIONS;
}

/** The paths whose streams end with a usage chunk when asked (chat completions and legacy completions). */
export function streamsUsageOnRequest(path: string): boolean {
  const end = path.indexOf("?");
  const bare = end === -1 ? path : path.slice(0, end);
  return bare.endsWith("/chat/completions") || bare.endsWith("/completions");
}

const encoder = new TextEncoder();

/**
 * The body with `"stream_options":{"include_usage":true}` written in as
 * its first member, every other byte as the client sent it (a
 * re-serialised body could change numbers, escapes and spacing). A body
 * whose own `stream_options` lacks it is written again whole: rare, and
 * the option must be set.
 */
export function withIncludeUsage(text: string, document: Record<string, unknown>): Uint8Array {
  if (document.stream_options === undefined) {
    const open = text.indexOf("{");
    return encoder.encode(`${text.slice(0, open + 1)}"stream_options":{"include_usage":true}${Object.keys(document).length === 0 ? "" : ","}${text.slice(open + 1)}`);
  }
  const options = typeof document.stream_options === "object" && document.stream_options !== null ? document.stream_options : {};
  return encoder.encode(JSON.stringify({ ...document, stream_options: { ...options, include_usage: true } }));
}

/** What an answer to an injected stream carried that the client did not ask for: the usage, kept for counting. */
export interface UsageStrip {
  /** Bytes of an event not yet whole (SSE events end with a blank line). */
  carry: Uint8Array | undefined;
  usage: Usage | undefined;
}

const decoder = new TextDecoder("utf-8", { fatal: true });

/**
 * The answer's stream with the option's traces removed, event by event: the
 * usage-only chunk (`"choices":[]` and a `usage` object) dropped, its usage
 * kept; a top-level `"usage":null` cut from other chunks. Every other byte
 * passes as it came, split where it came or at event ends.
 */
export function strippedUsageStream(body: ReadableStream<Uint8Array>, strip: UsageStrip): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        for (;;) {
          const chunk = await reader.read();
          if (chunk.done) {
            if (strip.carry !== undefined) controller.enqueue(strip.carry);
            strip.carry = undefined;
            return controller.close();
          }
          const out = stripChunk(strip, chunk.value);
          if (out.byteLength > 0) return controller.enqueue(out);
        }
      },
      cancel: (reason) => reader.cancel(reason),
    },
    { highWaterMark: 0 },
  );
}

/** The whole events in `carry + chunk`, stripped; an unfinished event waits in the carry. */
export function stripChunk(strip: UsageStrip, chunk: Uint8Array): Uint8Array {
  const bytes = strip.carry === undefined ? chunk : concat(strip.carry, chunk);
  const end = lastEventEnd(bytes);
  strip.carry = end === bytes.byteLength ? undefined : bytes.slice(end);
  if (end === 0) return new Uint8Array(0);
  const parts: Uint8Array[] = [];
  let start = 0;
  for (let at = nextEventEnd(bytes, 0, end); at !== -1; at = nextEventEnd(bytes, start, end)) {
    parts.push(strippedEvent(strip, bytes.subarray(start, at)));
    start = at;
  }
  return parts.length === 1 ? parts[0]! : concat(...parts);
}

/** One event, separator included: dropped, cut, or as it came. */
function strippedEvent(strip: UsageStrip, event: Uint8Array): Uint8Array {
  let text: string;
  try {
    text = decoder.decode(event);
  } catch {
    return event;
  }
  const data = /^data: ?(\{.*\})\r?\n\r?\n$/s.exec(text);
  if (data === null) return event;
  let document: { choices?: unknown; usage?: unknown };
  try {
    document = JSON.parse(data[1]!);
  } catch {
    return event;
  }
  if (Array.isArray(document.choices) && document.choices.length === 0 && typeof document.usage === "object" && document.usage !== null) {
    strip.usage = usageInBody(encoder.encode(data[1]!)) ?? strip.usage;
    return new Uint8Array(0);
  }
  if (document.usage !== null || !("usage" in document)) return event;
  // The option's own member, written by the upstream as a top-level key (usually last): cut with its comma.
  const cut = text.replace(/,\s*"usage"\s*:\s*null(?=\s*\}\s*\r?\n)|"usage"\s*:\s*null\s*,\s*/, "");
  return cut === text ? event : encoder.encode(cut);
}

/** Whether an event ends at `at`: a line feed after an empty line (LF LF, or LF CR LF). */
function endsEvent(bytes: Uint8Array, at: number): boolean {
  return bytes[at] === 0x0a && (bytes[at - 1] === 0x0a || (bytes[at - 1] === 0x0d && bytes[at - 2] === 0x0a));
}

/** Where the last whole event ends (after its blank line), 0 when none has. */
function lastEventEnd(bytes: Uint8Array): number {
  for (let at = bytes.byteLength - 1; at > 0; at -= 1) if (endsEvent(bytes, at)) return at + 1;
  return 0;
}

function nextEventEnd(bytes: Uint8Array, from: number, end: number): number {
  for (let at = from + 1; at < end; at += 1) if (endsEvent(bytes, at)) return at + 1;
  return -1;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.byteLength, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.byteLength;
  }
  return out;
}
