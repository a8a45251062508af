/**
 * Backend pools: choose (smooth weighted round-robin by priority), rest
 * (after a 429 for as long as it asks, after failures), connect checks for
 * backends not heard from lately, the answers that move a request on, and
 * the request bodies held so the next backend can be sent the same bytes.
 *
 * Imports: log, config, metrics, routes.
 */
import { log, MINUTE, SECOND } from "./log.ts";
import { KEEP_ALIVE_IDLE_SECONDS } from "./config.ts";
import { DEPLOYMENT_PREFIX, endsPathSegment, type UpstreamErrorReason } from "./metrics.ts";
import { type Backend, type ConnectAddress, type ConnectCheck, type FailoverReason, type Route } from "./routes.ts";

/** A backend rests this long after a connection failure, three 5xx in a row, or a 429 that names no time. */
const DEFAULT_REST_MS = 10 * SECOND;

/** However long a 429 asks for: a backend is never out for longer. */
const MAX_REST_MS = 5 * MINUTE;

const SERVER_ERRORS_BEFORE_REST = 3;

/**
 * A request body is held, so the next backend can be sent the same bytes,
 * only up to this size and while all held bodies together stay under the
 * second bound; a larger or chunked body streams to one backend.
 */
export const MAX_REPLAY_BODY_BYTES = 4 * 1024 * 1024;

export const MAX_HELD_BODY_BYTES = 64 * 1024 * 1024;

/**
 * Bodies still arriving hold at most half of it, so uploads that stall (16
 * announcing 4 MiB and sending a byte took the whole budget, measured) never
 * take failover from requests whose bodies have arrived.
 */
const MAX_ARRIVING_BODY_BYTES = MAX_HELD_BODY_BYTES / 2;

/** Bytes received of the request bodies held now, and the part of them whose bodies are still arriving. */
export let heldBodyBytes = 0;

let arrivingBodyBytes = 0;

/**
 * The backend for a request's next attempt: among those serving and not yet
 * tried, the lowest priority; among equals, smooth weighted round-robin
 * (nginx's: each adds its weight, the largest running weight wins and gives
 * back the total), which spreads 3:1 as a b a a, deterministically.
 */
export function chooseBackend(backends: Backend[], tried: number, nowMs: number): Backend | undefined {
  if (backends.length === 1) return tried === 0 ? backends[0] : undefined;
  let best: Backend | undefined;
  let total = 0;
  for (const backend of backends) {
    if ((tried & (1 << backend.index)) !== 0 || backend.restsUntil > nowMs) continue;
    if (best !== undefined && backend.priority > best.priority) break;
    backend.currentWeight += backend.weight;
    total += backend.weight;
    if (best === undefined || backend.currentWeight > best.currentWeight) best = backend;
  }
  if (best !== undefined) best.currentWeight -= total;
  return best;
}

/** The answers that move a request on to the next backend (with a connection failure: `unreachable`). */
export function failoverReason(status: number): FailoverReason | undefined {
  if (status === 429) return "throttled";
  return status === 500 || status === 502 || status === 503 || status === 504 ? "server_error" : undefined;
}

/**
 * Whether an attempt that got no answer moves the request on: a connection
 * that failed before the request was sent (refused, DNS, TLS, connect
 * timeout) always; a reset after it went out only for an idempotent method,
 * as nginx's proxy_next_upstream does for non-idempotent requests (the
 * backend may have acted on a POST it received whole).
 */
export function movesOnAfterFailure(reason: UpstreamErrorReason, method: string): boolean {
  return reason === "connect" || reason === "tls" || (reason !== "client_abort" && idempotent(method));
}

/**
 * How long a 429 asks its backend to rest: `retry-after-ms` (what the
 * OpenAI SDKs prefer), else `Retry-After` in seconds or as an HTTP date,
 * else `x-ratelimit-reset-requests`/`-tokens` as OpenAI writes them (the
 * longer), else 10 s; at most 5 minutes. The Responses API has been seen to
 * send `-1` and no Retry-After (openai-dotnet#838): unreadable values count
 * as absent.
 */
export function throttleRestMs(headers: Headers, nowMs: number): number {
  const retryAfterMs = firstValue(headers.get("retry-after-ms"));
  const fromRetryAfterMs = retryAfterMs !== undefined && /^\d+$/.test(retryAfterMs) ? Number(retryAfterMs) : undefined;
  const resets = [headers.get("x-ratelimit-reset-requests"), headers.get("x-ratelimit-reset-tokens")].map((value) => {
    const first = firstValue(value);
    return first === undefined ? undefined : openAiDuration(first);
  });
  const fromResets = resets.some((value) => value !== undefined) ? Math.max(...resets.map((value) => value ?? 0)) : undefined;
  return Math.min(fromRetryAfterMs ?? retryAfterDelay(headers.get("retry-after"), nowMs) ?? fromResets ?? DEFAULT_REST_MS, MAX_REST_MS);
}

/** A header's first value (a repeated header arrives joined by `, `, RFC 9110 section 5.3); undefined when absent or blank. */
function firstValue(value: string | null): string | undefined {
  if (value === null) return undefined;
  const comma = value.indexOf(",");
  const first = (comma === -1 ? value : value.slice(0, comma)).trim();
  return first === "" ? undefined : first;
}

/** Retry-After as whole seconds or an HTTP date (whose own comma, `Wed, 21 Oct ...`, ends at its `GMT`), by its first value. */
function retryAfterDelay(value: string | null, nowMs: number): number | undefined {
  const first = firstValue(value);
  if (first === undefined) return undefined;
  if (/^\d+$/.test(first)) return Number(first) * SECOND;
  const gmt = value!.indexOf("GMT");
  return nonNegative(Date.parse(gmt === -1 ? value! : value!.slice(0, gmt + 3)) - nowMs);
}

function nonNegative(value: number): number | undefined {
  return Number.isFinite(value) && value >= 0 ? value : undefined;
}

/** OpenAI's reset durations (`1s`, `6m0s`, `250ms`, `1h2m3.5s`) or plain seconds, in ms. */
export function openAiDuration(text: string): number | undefined {
  const value = text.trim();
  if (/^\d+(\.\d+)?$/.test(value)) return Number(value) * SECOND;
  const parts = /^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$/.exec(value);
  if (parts === null || value === "") return undefined;
  const [, hours = "0", minutes = "0", seconds = "0", millis = "0"] = parts;
  return Number(hours) * 60 * MINUTE + Number(minutes) * MINUTE + Number(seconds) * SECOND + Number(millis);
}

/**
 * What a backend's answer (a status, or `undefined` for a connection that
 * failed) says of it: a 429 rests it for as long as it asks, a failed
 * connection for 10 s, the third 5xx in a row for 10 s; any other answer
 * clears its 5xx count. A route with one backend never rests it: its
 * answers pass through as they would without a pool.
 */
export function noteBackendAnswer(route: Route, backend: Backend, status: number | undefined, headers: Headers | undefined, nowMs: number): void {
  if (status !== undefined) backend.reachedAt = nowMs;
  // API_BASE_URL's one backend is the request series itself: counting it again would only cost.
  if (status !== undefined && (route.pooled || route.named)) backend.codes.set(status, (backend.codes.get(status) ?? 0) + 1);
  if (!route.pooled) return;
  const reason = status === undefined ? "unreachable" : failoverReason(status);
  if (reason !== "server_error") backend.serverErrors = 0;
  if (reason === "throttled") rest(route, backend, reason, throttleRestMs(headers!, nowMs), nowMs);
  else if (reason === "unreachable") rest(route, backend, reason, DEFAULT_REST_MS, nowMs);
  else if (reason === "server_error" && (backend.serverErrors += 1) >= SERVER_ERRORS_BEFORE_REST) {
    backend.serverErrors = 0;
    rest(route, backend, reason, DEFAULT_REST_MS, nowMs);
  }
}

/** One warn line when a backend starts resting (a longer rest extends it quietly), one info line when it serves again. */
export function rest(route: Route, backend: Backend, reason: FailoverReason, ms: number, nowMs: number): void {
  const until = nowMs + ms;
  if (ms <= 0 || until <= backend.restsUntil) return;
  const starts = backend.restsUntil <= nowMs;
  backend.restsUntil = until;
  backend.restReason = reason;
  clearTimeout(backend.restTimer);
  backend.restTimer = setTimeout(() => {
    backend.restTimer = undefined;
    log("info", "backend serving again", { route: route.prefix, backend: backend.name });
  }, ms);
  backend.restTimer.unref();
  if (starts) log("warn", "backend resting", { route: route.prefix, backend: backend.name, reason, rest_ms: Math.round(ms) });
}

/**
 * A backend heard from within this long is taken as reachable; a request to
 * one that was not (new, idle, or gone dark) goes out while a connect check
 * runs beside it, and moves on if the check has not connected within the
 * backend's connect_timeout. Bun's fetch has no connect timeout and does
 * not say when its connection is made, so this is how a SYN-dropping
 * address is told from a model that thinks for minutes: under steady
 * traffic no check runs and the hot path pays one comparison.
 */
export const REACHED_RECENTLY_MS = 5 * SECOND;

/** The backend's connect check: one at a time, which every request sent to it meanwhile waits on. */
export function checkConnect(backend: Backend): Promise<ConnectCheck> {
  if (backend.connectCheck !== undefined) return backend.connectCheck;
  const check = connectWithin(backend.connectAddress, backend.connectTimeoutMs).then((result) => {
    backend.connectCheck = undefined;
    if (result === "connected") backend.reachedAt = Date.now();
    return result;
  });
  return (backend.connectCheck = check);
}

/**
 * Opens a connection to the address (and its TLS handshake, where the
 * backend speaks TLS: a middlebox that stalls it is as dark as a dropped
 * SYN), then closes it: whether that was done within `timeoutMs`. The
 * certificate is not judged here; fetch judges it on its own connection.
 */
export function connectWithin(address: ConnectAddress, timeoutMs: number): Promise<ConnectCheck> {
  return new Promise((resolve) => {
    const settle = (result: ConnectCheck) => {
      clearTimeout(timer);
      resolve(result);
    };
    const timer = setTimeout(settle, timeoutMs, "timed_out");
    const connected = (socket: import("bun").Socket) => {
      settle("connected");
      socket.end();
    };
    Bun.connect({
      hostname: address.hostname,
      port: address.port,
      tls: address.tls ? { serverName: address.hostname, rejectUnauthorized: false } : undefined,
      socket: {
        open: (socket) => void (address.tls ? undefined : connected(socket)),
        handshake: (socket) => connected(socket),
        data: () => {},
        connectError: () => settle("failed"),
        error: () => settle("failed"),
        close: () => settle("failed"),
      },
    }).catch(() => settle("failed"));
  });
}

/** A connect not done within the backend's connect_timeout: a connection failure, as a refused one is. */
export function connectTimedOut(backend: Backend): Error {
  return Object.assign(new Error(`no connection within ${backend.connectTimeoutMs / SECOND} s (connect_timeout)`), { code: "ConnectionTimeout" });
}

/** The path as this backend gets it: `/openai/deployments/<from>/` renamed `<to>` where its `deployments` say so. */
export function backendPath(backend: Backend, path: string): string {
  if (backend.deployments === undefined || !path.startsWith(DEPLOYMENT_PREFIX)) return path;
  let end = DEPLOYMENT_PREFIX.length;
  while (end < path.length && !endsPathSegment(path, end)) end += 1;
  const renamed = backend.deployments.get(path.slice(DEPLOYMENT_PREFIX.length, end));
  return renamed === undefined ? path : DEPLOYMENT_PREFIX + renamed + path.slice(end);
}

/** A body this small with a Content-Length is taken whole (`smallBodyAnswered`): it needs neither the lift nor the relay. */
export const SMALL_BODY_BYTES = 64 * 1024;

/** What a request's attempts came to. */
export interface Attempts {
  /** The answer to pass on; undefined when the last attempt got none (`error`), or when no backend could be asked. */
  response: Response | undefined;
  error: unknown;
  /** The backend whose answer (or failure) this is; undefined when every backend of the route rests. */
  backend: Backend | undefined;
  count: number;
  /** The backends asked, in order, comma-separated: for the access line. */
  tried: string;
}

/**
 * The methods RFC 9110 section 9.2.2 calls idempotent: Bun's fetch resends
 * them on its own when a reused connection is reset, and they may go to the
 * next backend after a reset (nginx's proxy_next_upstream rule).
 */
export function idempotent(method: string): boolean {
  return method === "GET" || method === "HEAD" || method === "PUT" || method === "DELETE" || method === "OPTIONS";
}

/**
 * What the client gets when the attempts end: the last answer, unless it is
 * a reason to move on (or none) and a backend answered 429 before it; then
 * that 429, the backend that returns first, with every attempt counted.
 */
export function attemptsOutcome(last: Attempts, throttled: Attempts | undefined): Attempts {
  if (throttled === undefined || throttled === last) return last;
  if (last.response !== undefined && failoverReason(last.response.status) === undefined) {
    void throttled.response!.body?.cancel().catch(() => {});
    return last;
  }
  void last.response?.body?.cancel().catch(() => {});
  return { ...throttled, count: last.count, tried: last.tried };
}

/** A pooled request's body: `null` for none, bytes held to be sent again, a stream for one backend (undefined: the request's own), or STALLED. */
export type HeldBody = Uint8Array | null | ReadableStream<Uint8Array> | undefined | typeof STALLED;

export const STALLED = Symbol("stalled");

type BodyReader = Pick<ReadableStreamDefaultReader<Uint8Array>, "read" | "cancel">;

/**
 * The body as bytes to send to each backend asked, when it may be held:
 * none, or a Content-Length within MAX_REPLAY_BODY_BYTES while the budget
 * has room; undefined (or a stream) for a body that goes to one backend.
 * An upload that sends nothing for the keep-alive idle time is STALLED:
 * its hold is released and it is answered 408.
 */
export async function holdBody(req: Request, bytesIn: number): Promise<HeldBody> {
  if (req.body === null) return null;
  if (req.headers.get("content-length") === null || bytesIn > MAX_REPLAY_BODY_BYTES) return undefined;
  return bytesIn <= SMALL_BODY_BYTES ? holdSmallBody(req, bytesIn) : holdLargeBody(req);
}

/**
 * A small body mostly comes with the headers: it is taken whole
 * (`req.bytes()`; reading it chunk by chunk through a stream reader cost
 * 4 us a request, measured), its announced size counted as arriving until
 * it is in. One not whole within the idle time is stalled (64 KiB taking
 * 75 s is under 1 KB/s).
 */
async function holdSmallBody(req: Request, bytesIn: number): Promise<HeldBody> {
  if (heldBodyBytes + bytesIn > MAX_HELD_BODY_BYTES || arrivingBodyBytes + bytesIn > MAX_ARRIVING_BODY_BYTES) return undefined;
  heldBodyBytes += bytesIn;
  arrivingBodyBytes += bytesIn;
  const stall = stallWatch();
  try {
    const body = await Promise.race([req.bytes(), stall.stalled]);
    if (body !== STALLED) heldBodyBytes += body.byteLength - bytesIn;
    else heldBodyBytes -= bytesIn;
    return body;
  } catch {
    // The client went away while sending it: the attempts see its signal and end.
    heldBodyBytes -= bytesIn;
    return null;
  } finally {
    stall.stop();
    arrivingBodyBytes -= bytesIn;
  }
}

/**
 * A larger body is read as it arrives, each chunk counted when it comes:
 * stalled uploads hold what they sent, not what they announced (16
 * announcing 4 MiB and sending a byte took the whole budget, measured). One
 * that outgrows the budget streams on to one backend with what it had sent.
 */
async function holdLargeBody(req: Request): Promise<HeldBody> {
  const reader = req.body!.getReader();
  const chunks: Uint8Array[] = [];
  let received = 0;
  let held = false;
  const stall = stallWatch();
  try {
    for (;;) {
      const next = await Promise.race([reader.read(), stall.stalled]);
      if (next === STALLED) {
        void reader.cancel().catch(() => {});
        return STALLED;
      }
      if (next.done) {
        held = true;
        return heldBytes(chunks, received);
      }
      const chunk = next.value;
      stall.arrived();
      chunks.push(chunk);
      if (heldBodyBytes + chunk.byteLength > MAX_HELD_BODY_BYTES || arrivingBodyBytes + chunk.byteLength > MAX_ARRIVING_BODY_BYTES) return resumedBody(chunks, reader);
      heldBodyBytes += chunk.byteLength;
      arrivingBodyBytes += chunk.byteLength;
      received += chunk.byteLength;
    }
  } catch {
    return null;
  } finally {
    stall.stop();
    arrivingBodyBytes -= received;
    // A held body's bytes are released when its attempts end; any other's now.
    if (!held) heldBodyBytes -= received;
  }
}

/** The chunks of a body as one array. */
function heldBytes(chunks: Uint8Array[], received: number): Uint8Array {
  if (chunks.length === 1) return chunks[0]!;
  const bytes = new Uint8Array(received);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  return bytes;
}

/** Resolves STALLED once nothing has arrived for the keep-alive idle time; `arrived()` says something did. */
function stallWatch(): { stalled: Promise<typeof STALLED>; arrived(): void; stop(): void } {
  let lastArrivalAt = performance.now();
  let timer: ReturnType<typeof setTimeout>;
  let resolveStalled: (stalled: typeof STALLED) => void;
  const stalled = new Promise<typeof STALLED>((resolve) => (resolveStalled = resolve));
  const check = () => {
    const idle = performance.now() - lastArrivalAt;
    if (idle >= KEEP_ALIVE_IDLE_SECONDS * SECOND) resolveStalled(STALLED);
    else timer = setTimeout(check, KEEP_ALIVE_IDLE_SECONDS * SECOND - idle);
  };
  timer = setTimeout(check, KEEP_ALIVE_IDLE_SECONDS * SECOND);
  return { stalled, arrived: () => (lastArrivalAt = performance.now()), stop: () => clearTimeout(timer) };
}

/** A held body's attempts are over: its bytes leave the budget. */
export function releaseHeldBody(body: Uint8Array): void {
  heldBodyBytes -= body.byteLength;
}

/** A body that outgrew the budget: what it had sent, then the rest as it comes, to one backend. */
function resumedBody(chunks: Uint8Array[], reader: BodyReader): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const chunk = chunks.shift() ?? (await reader.read()).value;
        if (chunk === undefined) controller.close();
        else controller.enqueue(chunk);
      },
      cancel: (reason) => reader.cancel(reason),
    },
    { highWaterMark: 0 },
  );
}

/** A held body replaced by another (a limited caller's stream asked for its usage): the budget counts the one that is sent. */
export function swapHeldBody(from: Uint8Array, to: Uint8Array): Uint8Array {
  heldBodyBytes += to.byteLength - from.byteLength;
  return to;
}
