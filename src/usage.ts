/**
 * Model token usage read from the answers as they pass: a scan of the JSON
 * (or SSE) structure for the answer's own top-level usage and model,
 * carrying a few KiB at most between chunks, compressed bodies decoded
 * incrementally on a copy, counted into the metrics.
 *
 * Imports: metrics.
 */
import zlib from "node:zlib";
import { boundedLabel, COUNTED, MAX_MODEL_LABELS, type Metrics, MODEL_NAME, type SeriesSet, TOKEN_TYPES } from "./metrics.ts";

/**
 * The tokens each answer's `usage` reports, read from the bytes as they
 * pass and never holding one back. Bytes are searched for the `"usage"`
 * and `"model"` keys and only their values are decoded and parsed: a
 * string of each answer, left to the collector, cost 5 % of c=64
 * throughput (measured). A relayed body is scanned chunk by chunk,
 * carrying over only an unfinished `usage` object or `model` value, or a
 * key cut at the chunk's end, so a 30 MB answer costs no more memory than
 * its chunks. `make bench` compiles one build with `--define
 * AUTH_PROXY_BENCH_TOKENS_UNCOUNTED=true` to measure the cost.
 */
declare const AUTH_PROXY_BENCH_TOKENS_UNCOUNTED: boolean;

export const TOKENS_COUNTED = COUNTED && typeof AUTH_PROXY_BENCH_TOKENS_UNCOUNTED === "undefined";

/** One answer's tokens in TOKEN_TYPES' order (input, output, cached_input, reasoning); -1 where the usage did not say. */
export interface Usage {
  model: string;
  tokens: [number, number, number, number];
}

/** Larger than any context window by far: a count above it is not a count. */
const MAX_TOKENS_AN_ANSWER = 100_000_000;

/** A `usage` object is a few hundred bytes; one longer than this is not one, and is not waited for. */
const MAX_USAGE_OBJECT_BYTES = 4096;

/** A model name is at most 128 characters; a value longer than this is not waited for. */
const MAX_MODEL_VALUE_BYTES = 130;

/** The longest key the scan looks for (`response`): a longer key is not carried. */
const MAX_KEY_BYTES = 8;

/** Decoded bytes scanned from one compressed body at most: a decompression bomb costs CPU up to here (yielding between chunks), memory never. */
const MAX_DECODED_BYTES = 256 * 1024 * 1024;

/**
 * Nor more than this many times its compressed bytes (plus a MiB): JSON and
 * SSE answers compress 3-20 times, a bomb a million times (500 bytes of br
 * are 300 MiB of blanks), and decoding one to the end cost 0.6 s of CPU.
 */
const MAX_DECODED_RATIO = 1000;

const DECODED_ALLOWANCE_BYTES = 1024 * 1024;

/** What the value after a key that counts is: nothing to read, the usage, the model, or the `response` object whose own keys count. */
const NO_FIELD = 0;

const USAGE_FIELD = 1;

const MODEL_FIELD = 2;

const RESPONSE_FIELD = 3;

/** What the string being read is: plain (skipped), a key that may count, or the model's value. */
const PLAIN_STRING = 0;

const KEY_STRING = 1;

const MODEL_STRING = 2;

/**
 * The scan of one answer (or of an SSE stream, event after event): the JSON
 * structure as far as the usage needs it, what was found, and at most a few
 * KiB carried into the next chunk (a key, a model value or a usage object
 * cut by the chunk's end), whatever the bytes. Only the answer's own
 * top-level `usage` and `model` count, and in a Responses stream event or a
 * Realtime event, those of its `response` object: a usage-shaped key in
 * `metadata`, a message or tool arguments is nested deeper (or inside a
 * string), and is never read.
 */
export interface UsageScan {
  model: string;
  usage: Usage["tokens"] | undefined;
  /** Server-sent events: between events (depth 0) only `{` matters, as `data:`, `event:` and `[DONE]` are not JSON values. */
  events: boolean;
  /** Nesting depth at the scan's position; 0 between events. */
  depth: number;
  /** The top-level value is an object: its keys (depth 1) count. */
  topIsObject: boolean;
  /** The depth of the top-level `response` object's keys while inside it, else 0. */
  responseDepth: number;
  inString: boolean;
  /** The chunk ended inside a string on an unpaired backslash: the next byte is escaped. */
  escaped: boolean;
  /** The next string at a depth whose keys count is a key. */
  expectKey: boolean;
  field: number;
  reading: number;
  /** The depth a usage object opened at while it is read, else -1. */
  usageDepth: number;
  /** The start of the key, model value or usage object being read, cut by an earlier chunk's end. */
  carried: Uint8Array | undefined;
  /** A gzip, deflate or br body is decoded on a copy, its output scanned. */
  decoder: import("node:zlib").Gunzip | undefined;
  encodedBytes: number;
  decodedBytes: number;
}

export function newUsageScan(events = false): UsageScan {
  return startUsageScan({} as UsageScan, events);
}

/** The scan set to an answer's start (the same fields in the same order every time, one shape for the engine). */
function startUsageScan(scan: UsageScan, events: boolean): UsageScan {
  scan.model = "";
  scan.usage = undefined;
  scan.events = events;
  scan.depth = 0;
  scan.topIsObject = false;
  scan.responseDepth = 0;
  scan.inString = false;
  scan.escaped = false;
  scan.expectKey = false;
  scan.field = NO_FIELD;
  scan.reading = PLAIN_STRING;
  scan.usageDepth = -1;
  scan.carried = undefined;
  scan.decoder = undefined;
  scan.encodedBytes = 0;
  scan.decodedBytes = 0;
  return scan;
}

/**
 * The next bytes of an answer. Strings are crossed with a native search for
 * their closing quote; only the bytes between strings are looked at one by
 * one, for the structure. What is read (the usage object, the model value)
 * is decoded in place by readUsageObject, without a string or a parse.
 */
export function scanUsageBytes(scan: UsageScan, bytes: Uint8Array): void {
  const end = bytes.length;
  let { depth, inString, expectKey, field } = scan;
  let at = 0;
  /** Where what is being read starts in this chunk (an earlier part is carried). */
  let from = 0;
  if (scan.escaped && end > 0) {
    scan.escaped = false;
    at = 1;
  }
  while (at < end) {
    if (inString) {
      const quote = closingQuoteCandidate(bytes, at, end);
      if (quote === -1) {
        scan.escaped = (end - backslashRunStart(bytes, end, at)) % 2 === 1;
        at = end;
        break;
      }
      if ((quote - backslashRunStart(bytes, quote, at)) % 2 === 1) {
        at = quote + 1;
        continue;
      }
      inString = false;
      at = quote + 1;
      if (scan.reading === PLAIN_STRING) continue;
      const carried = scan.carried !== undefined;
      const value = carried ? readSpan(scan, bytes, from, quote) : bytes;
      const [start, stop] = carried ? [0, value.length] : [from, quote];
      if (scan.reading === KEY_STRING) field = keyField(value, start, stop, depth);
      else if (scan.model === "") scan.model = modelName(value, start, stop) ?? "";
      scan.reading = PLAIN_STRING;
      scan.carried = undefined;
      continue;
    }
    const byte = bytes[at]!;
    if (byte === 34) {
      if (depth > 0 || !scan.events) {
        inString = true;
        if (expectKey && ((depth === 1 && scan.topIsObject) || depth === scan.responseDepth)) scan.reading = KEY_STRING;
        else if (field === MODEL_FIELD) scan.reading = MODEL_STRING;
        if (scan.reading !== PLAIN_STRING) from = at + 1;
        expectKey = false;
        field = NO_FIELD;
      }
    } else if (byte === 123 /* "{" */ || byte === 91 /* "[" */) {
      if (depth === 0) {
        scan.topIsObject = byte === 123;
        scan.responseDepth = 0;
      } else if (byte === 123 && field === USAGE_FIELD) {
        scan.usageDepth = depth;
        from = at;
      } else if (byte === 123 && field === RESPONSE_FIELD) {
        scan.responseDepth = depth + 1;
      }
      depth += 1;
      expectKey = byte === 123;
      field = NO_FIELD;
    } else if (byte === 125 /* "}" */ || byte === 93 /* "]" */) {
      if (depth > 0) {
        depth -= 1;
        if (depth === scan.usageDepth) {
          const usage = scan.carried === undefined ? usageTokens(bytes, from, at + 1) : usageTokens(readSpan(scan, bytes, from, at + 1), 0, -1);
          if (usage !== null) scan.usage = usage;
          scan.usageDepth = -1;
          scan.carried = undefined;
        }
        if (depth < scan.responseDepth) scan.responseDepth = 0;
      }
      expectKey = false;
      field = NO_FIELD;
    } else if (byte === 44 /* "," */) {
      expectKey = true;
      field = NO_FIELD;
    } else if (byte !== 58 /* ":" */ && byte > 32 && field !== NO_FIELD) {
      // A number or a literal (`"usage":null` until a chat stream's last chunk): nothing to read.
      field = NO_FIELD;
    }
    at += 1;
  }
  scan.depth = depth;
  scan.inString = inString;
  scan.expectKey = expectKey;
  scan.field = field;
  if (scan.reading !== PLAIN_STRING || scan.usageDepth !== -1) carry(scan, bytes, from);
}

/**
 * The next `"` at or after `at`, or -1. Keys and most values are short: a
 * look at their first bytes in JavaScript is cheaper than a call to the
 * native search, which crosses the long ones (message content) at once.
 */
function closingQuoteCandidate(bytes: Uint8Array, at: number, end: number): number {
  const near = Math.min(end, at + 24);
  for (; at < near; at += 1) if (bytes[at] === 34) return at;
  return at === end ? -1 : bytes.indexOf(34, at);
}

/** Where the run of backslashes that ends just before `before` starts, not reaching back past `from`: a quote after an odd run of backslashes is escaped. */
function backslashRunStart(bytes: Uint8Array, before: number, from: number): number {
  let start = before;
  while (start > from && bytes[start - 1] === 92 /* "\\" */) start -= 1;
  return start;
}

/** The field a key just read opens: `usage` and `model` at a depth whose keys count, `response` at the top. */
function keyField(bytes: Uint8Array, start: number, end: number, depth: number): number {
  if (keyIs(bytes, start, end, "usage")) return USAGE_FIELD;
  if (keyIs(bytes, start, end, "model")) return MODEL_FIELD;
  return depth === 1 && keyIs(bytes, start, end, "response") ? RESPONSE_FIELD : NO_FIELD;
}

/** The bytes from `from` to `to` of this chunk, after what was carried: a view, or a copy when something was. */
function readSpan(scan: UsageScan, bytes: Uint8Array, from: number, to: number): Uint8Array {
  const carried = scan.carried;
  if (carried === undefined) return bytes.subarray(from, to);
  const span = new Uint8Array(carried.length + to - from);
  span.set(carried);
  span.set(bytes.subarray(from, to), carried.length);
  return span;
}

/** What is being read when the chunk ends is kept for the next, as long as it can still be what it is read for; else it is let go. */
export function carry(scan: UsageScan, bytes: Uint8Array, from: number): void {
  const length = (scan.carried?.length ?? 0) + bytes.length - from;
  const limit = scan.usageDepth !== -1 ? MAX_USAGE_OBJECT_BYTES : scan.reading === KEY_STRING ? MAX_KEY_BYTES : MAX_MODEL_VALUE_BYTES;
  if (length > limit) {
    scan.carried = undefined;
    scan.reading = PLAIN_STRING;
    scan.usageDepth = -1;
    return;
  }
  scan.carried = readSpan(scan, bytes, from, bytes.length).slice();
}

/**
 * A usage object's tokens, in every shape: chat completions, completions
 * and embeddings (`prompt_tokens`, `completion_tokens`, `*_tokens_details`),
 * the Responses API (`input_tokens`, `output_tokens`, `*_tokens_details`)
 * and Realtime (`input_token_details`); null when it is none (not JSON, not
 * believable).
 */
function usageTokens(bytes: Uint8Array, start: number, end: number): Usage["tokens"] | null {
  if (end === -1) end = bytes.length;
  const tokens: Usage["tokens"] = [-1, -1, -1, -1];
  if (readUsageObject(bytes, start, end, tokens, -1) !== end) return null;
  if (tokens[0] === -1 && tokens[1] === -1) return null;
  // The details are parts of their totals: a part larger than its whole is not believed.
  if (tokens[2] > tokens[0]) tokens[2] = -1;
  if (tokens[3] > tokens[1]) tokens[3] = -1;
  return tokens;
}

/**
 * Reads the JSON object at `at` (its end known to be `end`) in place,
 * without a string or a parse (an answer's bytes, touched by a decoder or a
 * view, cost more than all the rest): whole numbers under the usage keys
 * go to their slots; a `*_details` object is read for its part (`detail`:
 * 2 for cached, 3 for reasoning); any other value is skipped. Returns past
 * the object, or -1 when it is not JSON.
 */
function readUsageObject(bytes: Uint8Array, at: number, end: number, tokens: Usage["tokens"], detail: number): number {
  at = blanksEnd(bytes, at + 1, end);
  if (bytes[at] === 125 /* "}" */) return at + 1;
  for (;;) {
    if (bytes[at] !== 34) return -1;
    const keyStart = at + 1;
    const keyEnd = stringEnd(bytes, at, end);
    if (keyEnd === -1) return -1;
    at = blanksEnd(bytes, keyEnd + 1, end);
    if (bytes[at] !== 58 /* ":" */) return -1;
    at = blanksEnd(bytes, at + 1, end);
    const slot = detail === -1 ? usageSlot(bytes, keyStart, keyEnd) : keyIs(bytes, keyStart, keyEnd, detail === 2 ? "cached_tokens" : "reasoning_tokens") ? detail : -1;
    const byte = bytes[at]!;
    if (byte >= 48 && byte <= 57) {
      let value = 0;
      let next = at;
      while (next < end && bytes[next]! >= 48 && bytes[next]! <= 57) value = value * 10 + bytes[next++]! - 48;
      const fraction = bytes[next] === 46 /* "." */ || bytes[next] === 101 /* "e" */ || bytes[next] === 69; /* "E" */
      at = fraction ? skipValue(bytes, at, end) : next;
      if (at === -1) return -1;
      if (slot >= 0 && slot < 4 && !fraction && value <= MAX_TOKENS_AN_ANSWER && tokens[slot] === -1) tokens[slot] = value;
    } else if (byte === 123 && slot >= 4) {
      at = readUsageObject(bytes, at, end, tokens, slot - 2);
    } else {
      at = skipValue(bytes, at, end);
    }
    if (at === -1) return -1;
    at = blanksEnd(bytes, at, end);
    if (bytes[at] === 125) return at + 1;
    if (bytes[at] !== 44 /* "," */) return -1;
    at = blanksEnd(bytes, at + 1, end);
  }
}

/** A usage key's slot: 0 input, 1 output (counts), 4 input details, 5 output details (objects); -1 for any other key. */
function usageSlot(bytes: Uint8Array, start: number, end: number): number {
  if (keyIs(bytes, start, end, "prompt_tokens") || keyIs(bytes, start, end, "input_tokens")) return 0;
  if (keyIs(bytes, start, end, "completion_tokens") || keyIs(bytes, start, end, "output_tokens")) return 1;
  if (keyIs(bytes, start, end, "prompt_tokens_details") || keyIs(bytes, start, end, "input_tokens_details") || keyIs(bytes, start, end, "input_token_details")) return 4;
  if (keyIs(bytes, start, end, "completion_tokens_details") || keyIs(bytes, start, end, "output_tokens_details") || keyIs(bytes, start, end, "output_token_details")) return 5;
  return -1;
}

function keyIs(bytes: Uint8Array, start: number, end: number, name: string): boolean {
  if (end - start !== name.length) return false;
  for (let index = 0; index < name.length; index += 1) if (bytes[start + index] !== name.charCodeAt(index)) return false;
  return true;
}

function blanksEnd(bytes: Uint8Array, at: number, end: number): number {
  while (at < end && (bytes[at] === 32 || bytes[at] === 9 || bytes[at] === 10 || bytes[at] === 13)) at += 1;
  return at;
}

/** The closing quote of the string opening at `at`, or -1. */
function stringEnd(bytes: Uint8Array, at: number, end: number): number {
  for (let index = at + 1; index < end; index += 1) {
    if (bytes[index] === 92 /* "\\" */) index += 1;
    else if (bytes[index] === 34) return index;
  }
  return -1;
}

/** Past any other JSON value (a string, an object or array, a literal, a signed or fractional number), or -1. */
function skipValue(bytes: Uint8Array, at: number, end: number): number {
  const byte = bytes[at];
  if (byte === 34) {
    const close = stringEnd(bytes, at, end);
    return close === -1 ? -1 : close + 1;
  }
  if (byte === 123 || byte === 91 /* "[" */) {
    let depth = 0;
    for (let index = at; index < end; index += 1) {
      const inner = bytes[index];
      if (inner === 34) {
        index = stringEnd(bytes, index, end);
        if (index === -1) return -1;
      } else if (inner === 123 || inner === 91) depth += 1;
      else if ((inner === 125 || inner === 93) && --depth === 0) return index + 1;
    }
    return -1;
  }
  let index = at;
  while (index < end && ((bytes[index]! >= 97 && bytes[index]! <= 122) || (bytes[index]! >= 48 && bytes[index]! <= 57) || bytes[index] === 45 || bytes[index] === 43 || bytes[index] === 46 || bytes[index] === 69)) index += 1;
  return index === at ? -1 : index;
}

/** The last model name read, reused while answers name the same one (no string made for it). */
let lastModelName = "";

/** A model value's bytes as a model name, or undefined when they are none. */
function modelName(bytes: Uint8Array, start: number, end: number): string | undefined {
  if (end - start > MAX_MODEL_VALUE_BYTES) return undefined;
  if (keyIs(bytes, start, end, lastModelName)) return lastModelName;
  let model = "";
  for (let index = start; index < end; index += 1) model += String.fromCharCode(bytes[index]!);
  if (!MODEL_NAME.test(model)) return undefined;
  return (lastModelName = model);
}

/** Whole answers are scanned one at a time, start to end, within a turn: one scan serves them all. */
const wholeBodyScan = newUsageScan();

/** A whole JSON answer's (or SSE body's, or Realtime event's) own usage and model, read in place. */
export function usageInBody(bytes: Uint8Array, events = false): Usage | undefined {
  const fromEnd = events ? FORWARD_SCAN : usageFromEnd(bytes);
  if (fromEnd !== FORWARD_SCAN) return fromEnd;
  scanUsageBytes(startUsageScan(wholeBodyScan, events), bytes);
  return scannedUsage(wholeBodyScan);
}

const FORWARD_SCAN = Symbol("forward scan");

/**
 * A whole JSON answer's own usage, found from its end: every API puts the
 * top-level `usage` at or near the end (Azure sorts its keys: `model`,
 * `object`, ..., `usage`), so walking back over the top-level object's last
 * members reaches it after a few hundred bytes, where the forward scan
 * crosses the whole answer (0.5 us of the bench's 1 KB answer). An answer
 * without the key anywhere has no usage; one whose top-level members end
 * without it, or that does not read as an object, gets the forward scan.
 */
function usageFromEnd(bytes: Uint8Array): Usage | undefined | typeof FORWARD_SCAN {
  if (!holdsUsageKey(bytes)) return undefined;
  let close = bytes.length;
  while (close > 0 && isBlank(bytes[close - 1]!)) close -= 1;
  if (bytes[close - 1] !== 125 /* "}" */) return FORWARD_SCAN;
  let tokens: Usage["tokens"] | null | undefined;
  let model: string | undefined;
  // `at` is where the member being walked back over ends (its `,` or the closing brace).
  for (let at = close - 1; tokens === undefined || model === undefined; ) {
    const valueEnd = blanksBefore(bytes, at);
    const valueStart = valueStartBefore(bytes, valueEnd);
    if (valueStart < 0) return FORWARD_SCAN;
    const colon = blanksBefore(bytes, valueStart) - 1;
    if (bytes[colon] !== 58 /* ":" */) return FORWARD_SCAN;
    const keyEnd = blanksBefore(bytes, colon) - 1;
    const keyStart = bytes[keyEnd] === 34 ? openingQuote(bytes, keyEnd) : -1;
    if (keyStart < 0) return FORWARD_SCAN;
    if (tokens === undefined && keyIs(bytes, keyStart + 1, keyEnd, "usage")) {
      tokens = bytes[valueStart] === 123 ? usageTokens(bytes, valueStart, valueEnd) : null;
      if (tokens === null) return undefined;
    }
    else if (model === undefined && keyIs(bytes, keyStart + 1, keyEnd, "model")) model = bytes[valueStart] === 34 ? (modelName(bytes, valueStart + 1, valueEnd - 1) ?? "") : "";
    at = blanksBefore(bytes, keyStart) - 1;
    if (bytes[at] === 123 /* "{" */ && blanksBefore(bytes, at) === 0) {
      // The object's first member: what was not found is not there.
      if (tokens === undefined) return FORWARD_SCAN;
      break;
    }
    if (bytes[at] !== 44 /* "," */) return FORWARD_SCAN;
  }
  return { model: model ?? "", tokens: tokens! };
}

/** Whether `"usage"` stands anywhere outside an escape: a native search for its rarest letter from the end, where it is. */
function holdsUsageKey(bytes: Uint8Array): boolean {
  for (let at = bytes.lastIndexOf(103 /* "g" */); at >= 4; at = bytes.lastIndexOf(103, at - 1)) {
    if (bytes[at + 2] === 34 && bytes[at - 4] === 34 && keyIs(bytes, at - 3, at + 2, "usage")) return true;
  }
  return false;
}

function isBlank(byte: number): boolean {
  return byte === 32 || byte === 9 || byte === 10 || byte === 13;
}

/** Where the blanks that end at `end` (exclusive) start. */
function blanksBefore(bytes: Uint8Array, end: number): number {
  while (end > 0 && isBlank(bytes[end - 1]!)) end -= 1;
  return end;
}

/** Where the JSON value that ends at `end` (exclusive) starts, or -1 when none does (the object's own opening brace). */
function valueStartBefore(bytes: Uint8Array, end: number): number {
  const last = bytes[end - 1];
  if (last === 34) return openingQuote(bytes, end - 1);
  if (last === 125 || last === 93 /* "]" */) {
    let depth = 0;
    for (let at = end - 1; at >= 0; at -= 1) {
      const byte = bytes[at]!;
      if (byte === 34) {
        at = openingQuote(bytes, at);
        if (at < 0) return -1;
      } else if (byte === 125 || byte === 93) depth += 1;
      else if ((byte === 123 || byte === 91) && --depth === 0) return at;
    }
    return -1;
  }
  let at = end;
  while (at > 0 && ((bytes[at - 1]! >= 97 && bytes[at - 1]! <= 122) || (bytes[at - 1]! >= 48 && bytes[at - 1]! <= 57) || bytes[at - 1] === 45 || bytes[at - 1] === 43 || bytes[at - 1] === 46 || bytes[at - 1] === 69)) at -= 1;
  return at === end ? -1 : at;
}

/** The opening quote of the string whose closing quote is at `close`: the nearest quote before it that no backslash escapes. */
function openingQuote(bytes: Uint8Array, close: number): number {
  for (let at = bytes.lastIndexOf(34, close - 1); at >= 0; at = bytes.lastIndexOf(34, at - 1)) {
    if ((at - backslashRunStart(bytes, at, 0)) % 2 === 0) return at;
  }
  return -1;
}

/** Server-sent events (`text/event-stream`) or JSON carry usage; undefined for other bodies (audio, images, files), which are not looked at. */
export function usageEvents(headers: Headers): boolean | undefined {
  const type = headers.get("content-type") ?? "";
  if (type.startsWith("text/event-stream")) return true;
  return type.includes("json") ? false : undefined;
}

/**
 * A scan for a 200 answer that may carry usage (JSON or SSE), undefined for
 * any other. A compressed one gets a decoder: node:zlib's streams decode a
 * chunk at a time off the event loop's turn, so a 500-byte answer that
 * expands to 300 MiB costs the scan's carry, not 300 MiB, and other
 * requests are served meanwhile (the synchronous decoders held the proxy
 * for 0.5 s and 310 MB on one such answer, measured).
 */
export function usageScanFor(headers: Headers): UsageScan | undefined {
  const events = usageEvents(headers);
  if (events === undefined) return undefined;
  const scan = newUsageScan(events);
  const encoding = headers.get("content-encoding");
  if (encoding === null) return scan;
  const decoder = streamDecoder(encoding.trim().toLowerCase());
  if (decoder === null) return scan;
  if (decoder === undefined) return undefined;
  decoder.on("data", (decoded: Buffer) => {
    scan.decodedBytes += decoded.byteLength;
    if (scan.decodedBytes > Math.min(MAX_DECODED_BYTES, scan.encodedBytes * MAX_DECODED_RATIO + DECODED_ALLOWANCE_BYTES)) return decoder.destroy();
    scanUsageBytes(scan, decoded);
  });
  // A body the decoder cannot read is a usage the proxy cannot read: not counted, never an error.
  decoder.on("error", () => (scan.usage = undefined));
  scan.decoder = decoder as import("node:zlib").Gunzip;
  return scan;
}

/** The decoder of a Content-Encoding the proxy reads; null for `identity`; undefined for any other. */
function streamDecoder(encoding: string) {
  if (encoding === "gzip" || encoding === "x-gzip") return zlib.createGunzip();
  if (encoding === "deflate") return zlib.createInflate();
  if (encoding === "br") return zlib.createBrotliDecompress();
  return encoding === "identity" ? null : undefined;
}

/** An answer's next bytes, scanned, or given to the decoder as a copy: the chunk itself is freed once written. */
export function scanUsageChunk(scan: UsageScan, chunk: Uint8Array): void {
  if (scan.decoder === undefined) return scanUsageBytes(scan, chunk);
  scan.encodedBytes += chunk.byteLength;
  if (!scan.decoder.destroyed) scan.decoder.write(chunk.slice());
}

/** Resolves once a compressed body's decoder has scanned its last output (at once for a plain body). */
export function usageScanned(scan: UsageScan): Promise<void> | undefined {
  const decoder = scan.decoder;
  if (decoder === undefined || decoder.destroyed) return undefined;
  return new Promise((resolve) => {
    decoder.once("end", resolve).once("error", resolve).once("close", resolve);
    decoder.end();
  });
}

/** The usage a finished scan found, with its model; a decoder still open is closed. */
export function scannedUsage(scan: UsageScan): Usage | undefined {
  if (scan.decoder !== undefined && !scan.decoder.destroyed) scan.decoder.destroy();
  return scan.usage === undefined ? undefined : { model: scan.model, tokens: scan.usage };
}

/** Adds an answer's usage to `auth_proxy_model_tokens_total{[caller,]deployment,model,type}`. */
export function countTokens(metrics: Metrics, set: SeriesSet, deployment: string, usage: Usage): void {
  // An app mostly calls one deployment and model: the last series is checked before the key is built.
  let series = set.lastTokenSeries;
  if (series === undefined || series.model !== usage.model || series.deployment !== deployment) {
    const model = usage.model === "" ? "" : boundedLabel(metrics.models, usage.model, MODEL_NAME, MAX_MODEL_LABELS);
    const key = `${deployment}\0${model}`;
    series = set.tokenSeries.get(key);
    if (series === undefined) set.tokenSeries.set(key, (series = { deployment, model, tokens: new Float64Array(TOKEN_TYPES.length) }));
    if (model === usage.model) set.lastTokenSeries = series;
  }
  for (let type = 0; type < TOKEN_TYPES.length; type += 1) if (usage.tokens[type]! > 0) series.tokens[type]! += usage.tokens[type]!;
}
