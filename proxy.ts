/**
 * auth-proxy: a sidecar that holds an Entra ID (Azure AD) access token, got
 * with a certificate, workload identity, managed identity or client secret,
 * and forwards every request to API_BASE_URL (or, with a routes file, to
 * its route's backends, a token per scope, the next backend answering when
 * one throttles or fails) with `Authorization: Bearer <token>`, streaming
 * both ways and changing nothing else; WebSocket upgrades are relayed with
 * the token in the upstream handshake. The external contract is
 * shared/CONTRACT.md; the README explains it to users.
 *
 * This file is the core, read as the journey: the token manager's refresh
 * loop around MSAL, the streaming fetch passthrough (forward), the server
 * (Bun.serve, listeners, signals, drain) and main (flags, help, --check,
 * --healthcheck). It wires the rooms of src/ around it in journey order (the
 * README's code map: log, config, certificate, identity, metrics, usage,
 * stream-usage, routes, caller-tokens, limits, limits-redis, callers,
 * reload, pools, http, websocket), each importing only those before it.
 */
import arg from "arg";
import { readFileSync } from "node:fs";
import { ABORTED_END, ACCESS_LINE_BYTES, accessLogEnabled, BYTES_IN, BYTES_OUT, CALLER, CLIENT_REQUEST_ID, LIMITS_STORE, deferredLines, DEPLOYMENT, errorMessage, flushLogAtExit, LINE_END, log, MINUTE, MODEL, openLogOutput, pathOf, putAccessLineHead, putBytes, putIntegerField, putMillisField, putStringField, REQUEST_ID, reserveLog, SECOND, setLogLevel, TRUNCATED_END, TTFB_MS, UPSTREAM_MS, USAGE_FIELDS } from "./src/log.ts";
import { type Config, configurationWarnings, type Environment, type Flags, KEEP_ALIVE_IDLE_SECONDS, loadConfig, outboundProxyFor, proxyAddress, readSetting, VERSION } from "./src/config.ts";
import { bypassProxyFor, createIdentity, describeTokenError, type HeldToken, type Identity, tokenEndpoint, watchCertificateExpiry } from "./src/identity.ts";
import { COUNTED, countStatus, deploymentLabel, type Metrics, newMetrics, noteRateLimits, observe, renderMetrics, type RequestSeries, requestSeries, type SeriesSet, UNCOUNTED_SERIES, upstreamErrorReason } from "./src/metrics.ts";
import { type Backend, buildRoutes, type FailoverReason, forwardedPath, matchRoute, type Route, type ScopeTokens, tokenManagers } from "./src/routes.ts";
import { type Caller, type CallerEntry, callerEntriesOf, CALLER_KEYS_FILE_POLL_MS, type Callers, callersFor, isWebSocketUpgrade, type Refusal } from "./src/callers.ts";
import { type Attempts, attemptsOutcome, backendPath, checkConnect, chooseBackend, connectTimedOut, failoverReason, type HeldBody, heldBodyBytes, holdBody, idempotent, movesOnAfterFailure, noteBackendAnswer, REACHED_RECENTLY_MS, releaseHeldBody, SMALL_BODY_BYTES, STALLED, swapHeldBody } from "./src/pools.ts";
import { countTokens, scannedUsage, scanUsageChunk, TOKENS_COUNTED, type Usage, usageEvents, usageInBody, type UsageScan, usageScanFor, usageScanned } from "./src/usage.ts";
import { strippedUsageStream, type UsageStrip } from "./src/stream-usage.ts";
import { type Admission, type LimitedCaller, type Limiter, putBudgetHeaders, reservationFor } from "./src/limits.ts";
import { checkStore, MEMORY_STORE, REDIS_ENTRA_SCOPE, redactedUrl, startLimiter, type StoreSettings, storeSettings } from "./src/limits-redis.ts";
import { CONFIG_POLL_MS, newReloadCounts, readWatched, reloadedCallers, reloadedRoutes, type ReloadCounts, reloadFiles, type WatchedFile } from "./src/reload.ts";
import { answered, idleTimerLifted, LIFT_IDLE_TIMER_AFTER_MS, liftIdleTimer, proxyError, putRouteFields, removeHopByHopHeaders, requestTarget, rewriteRequestHeaders, stalledUpload, unanswered } from "./src/http.ts";
import { clientClosed, clientDrained, clientOpened, closeBoth, MAX_WEBSOCKET_FRAME_BYTES, type ProxyServer, type Relay, type RelaySession, relayToUpstream, relayWebSocket, WEBSOCKET_PING_SECONDS } from "./src/websocket.ts";

// ---------------------------------------------------------------- token manager: the refresh loop around MSAL

/**
 * When to refresh, in ms from `obtainedAtMs`: at expiry minus 5 minutes, or
 * earlier when Entra says so with `refresh_in`; a token living under 10
 * minutes (Entra issues 60-90 min ones; tests and some policies issue less)
 * is refreshed at half its life so it never expires in use.
 */
export function refreshDelay(token: Pick<HeldToken, "expiresOnMs" | "refreshOnMs" | "obtainedAtMs">): number {
  const lifetime = token.expiresOnMs - token.obtainedAtMs;
  let refreshAt = lifetime < 10 * MINUTE ? token.obtainedAtMs + lifetime / 2 : token.expiresOnMs - 5 * MINUTE;
  if (token.refreshOnMs !== undefined && token.refreshOnMs < refreshAt) refreshAt = token.refreshOnMs;
  return Math.max(0, refreshAt - token.obtainedAtMs);
}

/** Exponential backoff, 1 s doubling to 60 s, with equal jitter so a fleet of sidecars does not retry in step. */
export function backoffDelay(failures: number, random: number): number {
  const ceiling = Math.min(60 * SECOND, SECOND * 2 ** Math.max(0, failures - 1));
  return ceiling / 2 + (random * ceiling) / 2;
}

/**
 * A token living under this is unusable: by the time a request carries it
 * upstream it may have expired. MSAL rounds `expires_on` down to the
 * second, so `expires_in: 0` can look valid for half a second.
 */
export const MIN_TOKEN_LIFETIME_MS = 2 * SECOND;

/** Entra issues 60-90 minute tokens (managed identity: about 24 h); `expires_in` of years is capped here. */
export const MAX_TOKEN_LIFETIME_MS = 24 * 60 * MINUTE;

/** However the identity provider answers, scheduled token requests are never closer than this. */
export const MIN_TOKEN_REQUEST_INTERVAL_MS = SECOND;

/**
 * Refuses a token the proxy cannot use (already expired, living under 2 s,
 * or with no expiry at all) so the caller backs off instead of asking again
 * at once, and caps an absurd lifetime so the refresh still happens daily.
 */
export function checkTokenLifetime(token: HeldToken, nowMs: number): HeldToken {
  const lifetimeMs = token.expiresOnMs - nowMs;
  if (!Number.isFinite(lifetimeMs)) throw new Error("the identity provider answered with a token without a valid expiry (expires_in)");
  if (lifetimeMs < MIN_TOKEN_LIFETIME_MS) {
    const seconds = Math.round(lifetimeMs / 100) / 10;
    throw new Error(
      lifetimeMs <= 0
        ? `the identity provider answered with a token that had already expired (expires_on ${new Date(token.expiresOnMs).toISOString()}, ${-seconds} s ago)`
        : `the identity provider answered with a token that expires in ${seconds} s, too soon to use`,
    );
  }
  if (token.expiresOnMs - token.obtainedAtMs <= MAX_TOKEN_LIFETIME_MS) return token;
  return { ...token, expiresOnMs: token.obtainedAtMs + MAX_TOKEN_LIFETIME_MS };
}

/** Upstream 401s arrive in bursts; one refresh per burst is enough. */
const UNAUTHORIZED_REFRESH_INTERVAL_MS = 5 * SECOND;

/**
 * Holds the current token as plain state for the hot path and keeps it fresh:
 * one acquisition at a time, proactive refresh, backoff on failure, and a
 * loop that never stops while the process runs.
 */
export class TokenManager {
  /** Read on every request; never a promise. */
  current: HeldToken | undefined;
  private lastFailure = "the first token has not been acquired yet";
  private failures = 0;
  private nextAttemptAtMs = 0;
  private lastRequestAtMs = -Infinity;
  private inFlight: Promise<void> | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private lastUnauthorizedRefreshMs = -Infinity;
  private stopped = false;
  /** For /metrics: plain counts and times, read when scraped. */
  acquisitionsSucceeded = 0;
  acquisitionsFailed = 0;
  lastSuccessAtMs: number | undefined;
  /** The prefixes of the routes this scope's token serves, for log lines and /ready. */
  readonly routePrefixes: string[] = [];

  /**
   * `labelled` (a routes file): the scope is named in log lines, /health's
   * reason and the token metrics, where several scopes share them.
   */
  constructor(
    private readonly identity: Identity,
    readonly scope: string,
    readonly labelled = false,
  ) {}

  start(): void {
    void this.refresh("startup");
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  /** The token to send, or undefined when none is valid now. */
  usable(nowMs: number): HeldToken | undefined {
    const token = this.current;
    return token !== undefined && nowMs < token.expiresOnMs ? token : undefined;
  }

  /** Why no valid token is held, for /health and 503 bodies: never a secret. */
  unavailableReason(): string {
    const now = Date.now();
    const certificate = this.identity.certificate;
    const certificateExpired =
      certificate && certificate.notAfter.getTime() < now ? `the certificate (SHA-1 ${certificate.thumbprintSha1}) expired at ${certificate.notAfter.toISOString()}; ` : "";
    const tokenExpired = this.current ? `the token expired at ${new Date(this.current.expiresOnMs).toISOString()}; ` : "";
    return `${certificateExpired}${tokenExpired}${this.lastFailure}`;
  }

  /** Seconds until the next acquisition attempt, for Retry-After. */
  retryAfterSeconds(nowMs: number): number {
    return Math.max(1, Math.ceil((this.nextAttemptAtMs - nowMs) / SECOND));
  }

  /**
   * The upstream rejected a token: it may have been revoked or its roles
   * changed, so get a new one now, unless the identity provider is failing
   * (its backoff decides when it is asked again: a fleet of sidecars in a
   * 401 storm must not hammer it while it struggles) or was just asked.
   */
  refreshAfterUnauthorized(): void {
    const now = Date.now();
    if (this.failures !== 0 || this.inFlight !== undefined || now - this.lastUnauthorizedRefreshMs < UNAUTHORIZED_REFRESH_INTERVAL_MS) return;
    this.lastUnauthorizedRefreshMs = now;
    // Through the schedule, so the floor holds: a token refused as soon as it came is asked for again a second after the last request.
    this.schedule(0, "upstream answered 401");
  }

  /** Single-flight: callers during an acquisition share it. */
  refresh(trigger: string): Promise<void> {
    if (this.stopped) return Promise.resolve();
    this.inFlight ??= this.acquire(trigger).finally(() => (this.inFlight = undefined));
    return this.inFlight;
  }

  private async acquire(trigger: string): Promise<void> {
    clearTimeout(this.timer);
    this.lastRequestAtMs = Date.now();
    try {
      const token = checkTokenLifetime(await this.identity.requestToken(this.scope), Date.now());
      this.current = token;
      this.acquisitionsSucceeded += 1;
      this.lastSuccessAtMs = Date.now();
      this.failures = 0;
      this.lastFailure = "";
      const delay = refreshDelay(token);
      this.schedule(delay);
      log("info", "token acquired", {
        scope: this.labelled ? this.scope : undefined,
        trigger,
        expires_on: new Date(token.expiresOnMs).toISOString(),
        refresh_at: new Date(token.obtainedAtMs + delay).toISOString(),
        ...this.identity.describe(),
      });
    } catch (error) {
      this.failures += 1;
      this.acquisitionsFailed += 1;
      const delay = backoffDelay(this.failures, Math.random());
      const { message, aadsts } = describeTokenError(error);
      this.lastFailure = `token acquisition failed: ${message}`;
      this.schedule(delay);
      const tokenStillValid = this.usable(Date.now()) !== undefined;
      log(tokenStillValid ? "warn" : "error", "token acquisition failed", {
        scope: this.labelled ? this.scope : undefined,
        trigger,
        aadsts,
        error: message,
        hint: this.identity.hint(error, aadsts),
        ...this.identity.describe(),
        attempt: this.failures,
        retry_in_s: Math.round(delay / 100) / 10,
        serving: tokenStillValid ? "current token still valid" : this.labelled ? `no valid token: routes ${this.routePrefixes.join(", ")} answer 503` : "no valid token: requests get 503",
      });
    }
  }

  private schedule(delayMs: number, trigger = "scheduled"): void {
    if (this.stopped) return;
    const now = Date.now();
    // The floor holds whatever the schedule says: an identity provider must never be asked in a tight loop.
    delayMs = Math.max(delayMs, this.lastRequestAtMs + MIN_TOKEN_REQUEST_INTERVAL_MS - now);
    this.nextAttemptAtMs = now + delayMs;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.refresh(trigger), delayMs);
  }
}

// ---------------------------------------------------------------- forwarding: the streaming fetch passthrough

/**
 * A burst of new streams allocates faster than JSC's collector reclaims:
 * 9,900 streams opened within 2 s peaked at 284 MB of anonymous memory, and
 * at 235-244 MB with a full collection at every 1,000 more requests in
 * flight (6-36 ms each, nine in that burst; bench/RESULTS.md). The mark
 * follows the count back down so the next burst is collected alike; below
 * 1,000 requests in flight it never fires.
 */
const COLLECT_EVERY_IN_FLIGHT = 1000;

let collectAtInFlight = COLLECT_EVERY_IN_FLIGHT;

function collectOnBurst(inFlight: number): void {
  if (inFlight >= collectAtInFlight) Bun.gc(true);
  collectAtInFlight = nextCollectionMark(inFlight, collectAtInFlight);
}

/** The in-flight count of the next collection: 1,000 past this one, or re-armed 1,000 above a count that fell 2,000 below the mark. */
export function nextCollectionMark(inFlight: number, mark: number): number {
  return inFlight >= mark || inFlight + 2 * COLLECT_EVERY_IN_FLIGHT <= mark ? inFlight + COLLECT_EVERY_IN_FLIGHT : mark;
}

/**
 * The request sent to the route's backends in turn, as nginx's
 * proxy_next_upstream does: an answer of 429, 500, 502, 503 or 504, or a
 * backend that cannot be reached, moves it on to the next available
 * backend, each at most once, while the client has received nothing and
 * the body can be sent again (held: none, or bytes). A request that went
 * out whole and then lost its connection without an answer moves on only
 * when its method is idempotent: a POST the backend received may have been
 * acted on. The client gets the first answer that is not a reason to move
 * on; when there is none, a 429 among the answers (the throttled backend's
 * own, saying when to come back), else the last. A route with one backend
 * is the same loop, once, with the body streamed.
 */
async function sendToBackends(req: Request, method: string, path: string, route: Route, held: Exclude<HeldBody, typeof STALLED>): Promise<Attempts> {
  const replayable = held === null || held instanceof Uint8Array;
  const body = held === undefined ? req.body : held;
  let tried = 0;
  let last: Attempts = { response: undefined, error: undefined, backend: undefined, count: 0, tried: "" };
  let throttled: Attempts | undefined;
  let movingOn: FailoverReason | undefined;
  try {
    for (;;) {
      const nowMs = Date.now();
      const backend = req.signal.aborted ? undefined : chooseBackend(route.backends, tried, nowMs);
      if (backend === undefined) return attemptsOutcome(last, throttled);
      if (movingOn !== undefined) route.failovers[movingOn] += 1;
      if (last !== throttled) void last.response?.body?.cancel().catch(() => {});
      tried |= 1 << backend.index;
      const names = last.count === 0 ? backend.name : `${last.tried},${backend.name}`;
      try {
        const response = await sendAttempt(req, method, backend.url + backendPath(backend, path), body, backend, nowMs);
        noteBackendAnswer(route, backend, response.status, response.headers, Date.now());
        last = { response, error: undefined, backend, count: last.count + 1, tried: names };
        movingOn = failoverReason(response.status);
        if (movingOn === "throttled" && replayable && (throttled === undefined || backend.restsUntil < throttled.backend!.restsUntil)) {
          void throttled?.response?.body?.cancel().catch(() => {});
          throttled = last;
        }
      } catch (error) {
        last = attemptFailed(req, route, backend, error, last.count + 1, names);
        movingOn = movesOnAfterFailure(upstreamErrorReason(error, req.signal.aborted), method) ? "unreachable" : undefined;
      }
      if (movingOn === undefined || !replayable) return attemptsOutcome(last, throttled);
    }
  } finally {
    if (held instanceof Uint8Array) releaseHeldBody(held);
  }
}

/**
 * One backend asked. One that answered lately is asked at once; any other
 * is connect-checked beside the request, which is abandoned as a
 * connection failure (never sent, so its body may go to the next backend)
 * when the check has not connected within the backend's connect_timeout.
 */
async function sendAttempt(req: Request, method: string, url: string, body: Uint8Array | ReadableStream<Uint8Array> | null, backend: Backend, nowMs: number): Promise<Response> {
  const connectDeadline = nowMs - backend.reachedAt < REACHED_RECENTLY_MS ? undefined : new AbortController();
  let answered = false;
  if (connectDeadline !== undefined) {
    void checkConnect(backend).then((check) => {
      if (check === "timed_out" && !answered) connectDeadline.abort(connectTimedOut(backend));
    });
  }
  try {
    const response = await upstreamFetch(req, method, url, body, connectDeadline === undefined ? req.signal : AbortSignal.any([req.signal, connectDeadline.signal]));
    answered = true;
    return response;
  } catch (error) {
    throw connectDeadline?.signal.aborted && !req.signal.aborted ? connectTimedOut(backend) : error;
  }
}

/** The upstream request: the client's method, rewritten headers and body, to `url`. */
function upstreamFetch(req: Request, method: string, url: string, body: Uint8Array | ReadableStream<Uint8Array> | null, signal: AbortSignal): Promise<Response> {
  return fetch(url, {
    method,
    headers: req.headers,
    body,
    // A disconnected client aborts the upstream request (oven-sh/bun#25919).
    signal,
    // Redirects go back to the client: following one would send the token to another origin.
    redirect: "manual",
    // fetch would decode gzip/br but keep Content-Encoding (oven-sh/bun#35546); pass the bytes as sent.
    decompress: false,
    // fetch's own idle timer has cut requests silent for 300 s (oven-sh/bun#6217); reasoning models can be.
    timeout: false,
    // Bun's fetch resends a request whose reused connection is reset, on the next pooled one and the next
    // (oven-sh/bun#28708 stopped it for non-idempotent methods only): 4 GETs to an upstream that hangs and
    // resets went out 44 times with 40 idle connections (measured). Those methods take a connection of their own.
    keepalive: !idempotent(method),
  });
}

/** An attempt whose backend could not be reached (or whose client left): counted, logged, its backend told. */
function attemptFailed(req: Request, route: Route, backend: Backend, error: unknown, count: number, tried: string): Attempts {
  const aborted = req.signal.aborted;
  route.metrics.upstreamErrors[upstreamErrorReason(error, aborted)] += 1;
  if (!aborted) {
    log("warn", "upstream unreachable", { upstream: backend.origin, error: errorMessage(error) });
    noteBackendAnswer(route, backend, undefined, undefined, Date.now());
  }
  return { response: undefined, error, backend, count, tried };
}

/** One forwarded request, the whole hot path: rewrite headers, send to the route's backends, strip the response's hop-by-hop headers, count, relay. */
export async function forward(req: Request, method: string, target: string, authorization: string, route: Route, server: ProxyServer, figures: SeriesSet, limited: LimitedCaller | undefined): Promise<Response> {
  const startedAt = performance.now();
  const metrics = route.metrics;
  const path = forwardedPath(route, target);
  // Taken now, while the target's characters are fresh: read after the fetch, the first touch alone cost 160-200 ns (measured in place).
  const series = COUNTED ? requestSeries(metrics, method, deploymentLabel(metrics, path), figures) : UNCOUNTED_SERIES;
  const lift = setTimeout(liftIdleTimer, LIFT_IDLE_TIMER_AFTER_MS, server, req);
  // Counted as declared: measuring a chunked upload would mean relaying every request body through JavaScript.
  const bytesIn = Number(req.headers.get("content-length")) || 0;
  const clientRequestId = accessLogEnabled ? req.headers.get("x-ms-client-request-id") : null;
  rewriteRequestHeaders(req.headers, authorization);
  collectOnBurst((metrics.requestsInFlight += 1));
  let held = route.pooled || limited !== undefined ? await holdBody(req, bytesIn) : undefined;
  if (held === STALLED) {
    clearTimeout(lift);
    metrics.requestsInFlight -= 1;
    return stalledUpload(method, target, route, startedAt, series);
  }
  let admission: Admission | undefined;
  let strip: UsageStrip | undefined;
  if (limited !== undefined) {
    const reservation = reservationFor(path, target, held, bytesIn, limited.limits);
    const asked = limited.limiter.admit(limited, reservation.tokens);
    const verdict = asked instanceof Promise ? await asked : asked;
    if (!("caller" in verdict)) {
      clearTimeout(lift);
      metrics.requestsInFlight -= 1;
      if (held instanceof Uint8Array) releaseHeldBody(held);
      answered(metrics, method, target, verdict.status, startedAt, series, route);
      return proxyError(verdict.status, verdict.code, verdict.message, verdict.headers);
    }
    admission = verdict;
    if (reservation.injected && held instanceof Uint8Array) {
      held = swapHeldBody(held, reservation.body as Uint8Array);
      req.headers.set("content-length", String(held.byteLength));
      strip = { carry: undefined, usage: undefined };
    }
  }
  const only = route.backends[0]!;
  let attempts: Attempts;
  if (!route.pooled && Date.now() - only.reachedAt < REACHED_RECENTLY_MS) {
    // One backend that answered lately, as most run: one fetch, without the attempts loop's two async frames (1.3-1.7 µs a request, measured).
    try {
      const answer = await upstreamFetch(req, method, only.url + backendPath(only, path), held === undefined ? req.body : held, req.signal);
      noteBackendAnswer(route, only, answer.status, answer.headers, Date.now());
      attempts = { response: answer, error: undefined, backend: only, count: 1, tried: only.name };
    } catch (error) {
      attempts = attemptFailed(req, route, only, error, 1, only.name);
    }
  } else {
    attempts = await sendToBackends(req, method, path, route, held);
  }
  const response = attempts.response;
  if (response === undefined) {
    clearTimeout(lift);
    metrics.requestsInFlight -= 1;
    if (admission !== undefined) limited!.limiter.settle(admission, 502, undefined);
    return unanswered(req, method, target, route, attempts, startedAt, series, server);
  }
  clearTimeout(lift);
  const headersAt = performance.now();
  if (response.status === 401) route.tokens.refreshAfterUnauthorized();
  const headers = response.headers;
  removeHopByHopHeaders(headers);
  if (COUNTED) noteRateLimits(attempts.backend!.rateLimits, series.deployment, headers);
  if (admission !== undefined) putBudgetHeaders(headers, admission);
  metrics.requestBytes += bytesIn;
  const exchange: Exchange = {
    req,
    server,
    method,
    target,
    route,
    backend: attempts.backend!,
    attempts: attempts.count,
    tried: attempts.tried,
    series,
    metrics,
    status: response.status,
    startedAt,
    headersAt,
    firstByteAt: 0,
    endedAt: 0,
    end: "done",
    bytesIn,
    bytesOut: 0,
    requestId: accessLogEnabled ? (headers.get("apim-request-id") ?? headers.get("x-request-id")) : null,
    clientRequestId,
    usage: undefined,
    usageScan: undefined,
    admission,
    strip: undefined,
  };
  const lifted = idleTimerLifted(startedAt, headersAt);
  if (method === "HEAD") return headAnswered(response, exchange, lifted);
  // Bun invents `content-type: application/octet-stream` for a body of known length that has none (oven-sh/bun#21193); a relayed body gets none.
  if (!lifted && Number(headers.get("content-length") ?? Infinity) <= SMALL_BODY_BYTES && headers.has("content-type")) {
    return smallBodyAnswered(response, exchange);
  }
  const body = response.body;
  if (body === null) {
    exchange.firstByteAt = headersAt;
    exchangeEnded(exchange, lifted ? "rearm" : "done");
    return response;
  }
  // A stream or a large body may run for minutes: no timer until it ends, then the keep-alive timer again.
  server.timeout(req, 0);
  if (strip !== undefined && response.status === 200 && !headers.has("content-encoding") && usageEvents(headers) === true) {
    // The usage chunk this proxy asked for is taken out before the client and counted from there.
    exchange.strip = strip;
    return new Response(relayBody(strippedUsageStream(body, strip), exchange), response);
  }
  if (TOKENS_COUNTED && response.status === 200) exchange.usageScan = usageScanFor(headers);
  return new Response(relayBody(body, exchange), response);
}

/**
 * A small body with a Content-Length mostly comes with the headers, whole:
 * its bytes are taken at once (`Bun.peek` of an answer already in hand)
 * and the exchange ends now, with no JavaScript stream (relaying it cost
 * 3.5 % of c=64 throughput, profiled). One that trickles is held until
 * its last byte, so the access line and the in-flight gauge follow the
 * real end; a client cannot use part of a small JSON answer anyway.
 */
function smallBodyAnswered(response: Response, exchange: Exchange): Response | Promise<Response> {
  const whole = response.bytes();
  const bytes = Bun.peek(whole);
  if (bytes instanceof Uint8Array) return bodyAnswered(response, bytes, exchange);
  return whole.then(
    (late) => {
      exchange.firstByteAt = performance.now();
      return bodyAnswered(response, late, exchange);
    },
    (error) => {
      const aborted = exchange.req.signal.aborted;
      const reason = upstreamErrorReason(error, aborted);
      exchange.metrics.upstreamErrors[reason === "other" ? "reset" : reason] += 1;
      if (!aborted) exchange.status = 502;
      exchangeEnded(exchange, aborted ? "aborted" : "truncated");
      // Nothing has reached the client yet: a body cut by the upstream is its failure, said as one.
      return aborted ? new Response(null, { status: 499 }) : proxyError(502, "upstream_unreachable", `the upstream's answer was cut before its end: ${errorMessage(error)}`);
    },
  );
}

function bodyAnswered(response: Response, bytes: Uint8Array, exchange: Exchange): Response {
  if (exchange.firstByteAt === 0) exchange.firstByteAt = exchange.headersAt;
  exchange.bytesOut = bytes.byteLength;
  const events = TOKENS_COUNTED && exchange.status === 200 ? usageEvents(response.headers) : undefined;
  if (events !== undefined && !response.headers.has("content-encoding")) exchange.usage = usageInBody(bytes, events);
  else if (events !== undefined) return compressedBodyAnswered(response, bytes, exchange);
  exchangeEnded(exchange, "done");
  return new Response(bytes, response);
}

/** A compressed small answer goes out at once; its usage is read by a decoder, on a copy, and the exchange ends when that is done. */
function compressedBodyAnswered(response: Response, bytes: Uint8Array, exchange: Exchange): Response {
  const scan = usageScanFor(response.headers);
  exchange.usageScan = scan;
  if (scan !== undefined) scanUsageChunk(scan, bytes);
  const scanned = scan === undefined ? undefined : usageScanned(scan);
  if (scanned === undefined) exchangeEnded(exchange, "done");
  else void scanned.then(() => exchangeEnded(exchange, "done"));
  return new Response(bytes, response);
}

/**
 * HEAD: no body, and the framing a GET would have. Without Content-Length
 * Bun answers `content-length: 0`, telling the client the resource is
 * empty, so a resource of unknown length (served chunked) says so.
 */
function headAnswered(response: Response, exchange: Exchange, lifted: boolean): Response {
  if (!response.headers.has("content-length")) response.headers.set("transfer-encoding", "chunked");
  exchange.firstByteAt = exchange.headersAt;
  exchangeEnded(exchange, lifted ? "rearm" : "done");
  return response;
}

/** How an exchange ended: its body done (`rearm` where the idle timer must be put back), the client gone, or the upstream gone mid-body. */
type ExchangeEnd = "done" | "rearm" | "aborted" | "truncated";

/** One forwarded request's facts, filled in as it goes and written as its access line when the body ends. */
interface Exchange {
  req: Request;
  server: ProxyServer;
  method: string;
  /** As the client sent it: the access line's path. */
  target: string;
  route: Route;
  /** The backend that answered, how many were asked, and which (comma-separated). */
  backend: Backend;
  attempts: number;
  tried: string;
  series: RequestSeries;
  metrics: Metrics;
  /** The upstream's status; 499 when the client went away mid-body. */
  status: number;
  startedAt: number;
  headersAt: number;
  firstByteAt: number;
  /** 0 until the exchange ends. A cancelled body can also see its read fail: the end is counted once. */
  endedAt: number;
  /** How the exchange ended, for its access line. */
  end: ExchangeEnd;
  bytesIn: number;
  bytesOut: number;
  requestId: string | null;
  clientRequestId: string | null;
  /** The tokens the answer's usage reported, once read. */
  usage: Usage | undefined;
  /** A relayed answer's scan for its usage, while it passes. */
  usageScan: UsageScan | undefined;
  /** A limited caller's reservation, settled when the exchange ends. */
  admission: Admission | undefined;
  /** A stream whose usage chunk the proxy asked for and takes out: the usage it took. */
  strip: UsageStrip | undefined;
}

/**
 * Chunks this large are freed as soon as they are written (releaseChunk);
 * smaller ones, SSE events, are left to the collector: detaching costs a
 * new ArrayBuffer object, more than such an event (+22 MB of peak RSS with
 * 9,900 streams when every chunk was freed).
 */
const RELEASED_CHUNK_BYTES = 16 * 1024;

/**
 * The upstream body passed on chunk by chunk as the client reads: a pull
 * source with no queue of its own keeps back-pressure (TransformStream lost
 * it, oven-sh/bun#28035) and the bytes as they came, and lets the proxy
 * count them and see where the body ends. It costs about a third of the
 * throughput of Bun's native pipe (measured with 1 MB bodies), which is why
 * small bodies with a Content-Length skip it.
 */
function relayBody(body: ReadableStream<Uint8Array>, exchange: Exchange): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  let written: Uint8Array | undefined;
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        if (written !== undefined) {
          releaseChunk(written);
          written = undefined;
        }
        let chunk: Awaited<ReturnType<typeof reader.read>>;
        try {
          chunk = await reader.read();
        } catch (error) {
          // The upstream went away mid-body: the client gets a cut body, as it would from the upstream itself.
          if (exchange.endedAt === 0) {
            const reason = upstreamErrorReason(error, false);
            exchange.metrics.upstreamErrors[reason === "other" ? "reset" : reason] += 1;
            exchangeEnded(exchange, "truncated");
          }
          throw error;
        }
        if (chunk.done) {
          controller.close();
          // A compressed body's last decoded bytes are scanned before its usage is counted and logged.
          const scanned = exchange.usageScan === undefined ? undefined : usageScanned(exchange.usageScan);
          return scanned === undefined ? exchangeEnded(exchange, "rearm") : scanned.then(() => exchangeEnded(exchange, "rearm"));
        }
        if (exchange.firstByteAt === 0) exchange.firstByteAt = performance.now();
        exchange.bytesOut += chunk.value.byteLength;
        if (chunk.value.byteLength >= RELEASED_CHUNK_BYTES) written = chunk.value;
        controller.enqueue(chunk.value);
        if (exchange.usageScan !== undefined) scanUsageChunk(exchange.usageScan, chunk.value);
      },
      cancel(reason) {
        if (exchange.endedAt === 0) {
          exchange.metrics.upstreamErrors.client_abort += 1;
          exchangeEnded(exchange, "aborted");
        }
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
}

/**
 * Frees a chunk's memory now rather than at the next garbage collection.
 * Bun's response sink copies each chunk it writes (into the socket or its
 * own buffer) and asks for the next one only after, so when `pull` runs
 * again the previous chunk is dead. Left to the collector, chunks of up to
 * 1 MiB from Bun's fetch piled up ahead of a slow reader: a 300 MB response
 * read at 40 MB/s took the proxy from +15 to +36 MB and climbing; released
 * here it holds +13-14 MB from start to end (bench/RESULTS.md). Detaching
 * (`transfer(0)`) is the only way JavaScript can free an ArrayBuffer.
 */
function releaseChunk(chunk: Uint8Array): void {
  // Only a chunk that is its whole buffer: a view would take its neighbours with it.
  if (chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength) (chunk.buffer as ArrayBuffer).transfer(0);
}

/**
 * The end of an exchange: the keep-alive timer re-armed (`rearm`) where the
 * request had it lifted (Bun would otherwise leave the lift on the socket
 * for good, measured), the metrics counted and the access line queued for
 * the turn's write.
 */
function exchangeEnded(exchange: Exchange, how: ExchangeEnd): void {
  const endedAt = (exchange.endedAt = performance.now());
  if (how === "rearm") exchange.server.timeout(exchange.req, KEEP_ALIVE_IDLE_SECONDS);
  const { metrics, series } = exchange;
  const status = how === "aborted" ? 499 : exchange.status;
  metrics.requestsInFlight -= 1;
  metrics.responseBytes += exchange.bytesOut;
  if (COUNTED) {
    countStatus(series, status);
    observe(series.upstreamHeaders, (exchange.headersAt - exchange.startedAt) / SECOND);
    if (exchange.firstByteAt !== 0) observe(series.firstByte, (exchange.firstByteAt - exchange.startedAt) / SECOND);
    observe(series.responseEnd, (endedAt - exchange.startedAt) / SECOND);
  }
  if (exchange.strip !== undefined) exchange.usage = exchange.strip.usage;
  if (TOKENS_COUNTED) {
    if (exchange.usageScan !== undefined) exchange.usage = scannedUsage(exchange.usageScan);
    if (exchange.usage !== undefined) countTokens(metrics, series.set, series.deployment, exchange.usage);
  }
  // A client that left keeps its reservation: the upstream's status, not 499, decides.
  if (exchange.admission !== undefined) exchange.admission.caller.limiter.settle(exchange.admission, exchange.status, exchange.usage);
  if (!accessLogEnabled) return;
  exchange.status = status;
  exchange.end = how;
  deferAccessLine(exchange);
}

function writeAccessLine(exchange: Exchange): void {
  const { method, target, route, backend, startedAt, endedAt, status, series, requestId, clientRequestId, usage, end: how } = exchange;
  const textLength = method.length + target.length + route.prefix.length + exchange.tried.length + (requestId?.length ?? 0) + (clientRequestId?.length ?? 0) + (usage?.model.length ?? 0) + (series.set.caller?.length ?? 0);
  if (!reserveLog(ACCESS_LINE_BYTES + 6 * textLength)) return;
  putAccessLineHead(method, target, status, startedAt, endedAt);
  putRouteFields(route, backend.name, exchange.attempts, exchange.tried);
  putMillisField(UPSTREAM_MS, exchange.headersAt - startedAt);
  if (exchange.firstByteAt !== 0) putMillisField(TTFB_MS, exchange.firstByteAt - startedAt);
  putIntegerField(BYTES_IN, exchange.bytesIn);
  putIntegerField(BYTES_OUT, exchange.bytesOut);
  if (series.deployment !== "") putStringField(DEPLOYMENT, series.deployment);
  if (series.set.caller !== undefined) putStringField(CALLER, series.set.caller);
  if (exchange.admission !== undefined) putStringField(LIMITS_STORE, exchange.admission.store.kind);
  if (usage !== undefined) putUsageFields(usage);
  if (requestId !== null) putStringField(REQUEST_ID, requestId);
  if (clientRequestId !== null) putStringField(CLIENT_REQUEST_ID, clientRequestId);
  putBytes(how === "aborted" ? ABORTED_END : how === "truncated" ? TRUNCATED_END : LINE_END);
}

/** Forwarded requests' access lines wait for the turn's write (src/log.ts says why). */
const deferAccessLine = deferredLines(writeAccessLine);

/** The answer's model and the token counts its usage gave. */
function putUsageFields(usage: Usage): void {
  if (usage.model !== "") putStringField(MODEL, usage.model);
  for (let type = 0; type < USAGE_FIELDS.length; type += 1) if (usage.tokens[type]! >= 0) putIntegerField(USAGE_FIELDS[type]!, usage.tokens[type]!);
}

// ---------------------------------------------------------------- server and lifecycle

const FORCED_STOP_GRACE_MS = 1000;

const JSON_HEADERS = { "content-type": "application/json" };

const METRICS_HEADERS = { "content-type": "text/plain; version=0.0.4; charset=utf-8" };

export interface RunningProxy {
  server: ReturnType<typeof Bun.serve>;
  /** Reads the routes and callers files again (SIGHUP), changed or not. */
  reload(trigger: string): void;
  /** The admin listener (ADMIN_PORT), when configured. */
  admin: ReturnType<typeof Bun.serve> | undefined;
  shutdown(signal: string): Promise<void>;
}

/** Names the address in the error a user sees when a port is taken. */
function listen<T>(address: string, start: () => T): T {
  try {
    return start();
  } catch (error) {
    throw new Error(`cannot listen on ${address} (${(error as NodeJS.ErrnoException).code ?? errorMessage(error)})`);
  }
}

/** What the server's handlers share: built once at start, read per request; only `draining` changes (once). */
interface ProxyState {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  routes: Route<TokenManager>[];
  tokens: TokenManager[];
  relay: Relay;
  /** Who may call (a callers file, PROXY_API_KEYS, AUTH_PROXY_CALLER); undefined: anyone, unlabelled. */
  callers: Callers | undefined;
  /** Callers' limits and their counts, kept across reloads; undefined without a callers file. */
  limiter: Limiter | undefined;
  /** The routes and callers files, read again when they change: `routes`, `tokens` and `callers` are replaced whole, never edited. */
  watched: WatchedFile[];
  reloads: ReloadCounts;
  draining: boolean;
}

export function startProxy(config: Config, identity: Identity, callerEntries?: CallerEntry[], store?: StoreSettings): RunningProxy {
  const metrics = newMetrics();
  const routes = buildRoutes(config, (scope, labelled) => new TokenManager(identity, scope, labelled), metrics, process.env);
  const limiter = config.callersFile === undefined ? undefined : startLimiter(store ?? MEMORY_STORE, () => new TokenManager(identity, REDIS_ENTRA_SCOPE, true));
  const callers = callersFor(config, metrics, callerEntries, limiter);
  for (const route of routes) route.tokens.routePrefixes.push(route.prefix);
  const watched: WatchedFile[] = [];
  if (config.routesFile !== undefined) watched.push({ file: "routes", path: config.routesFile, source: config.routesFileSource, text: undefined });
  if (config.callersFile !== undefined) watched.push({ file: "callers", path: config.callersFile, source: config.callersFileSource, text: undefined });
  for (const file of watched) {
    const read = readWatched(file);
    if ("text" in read) file.text = read.text;
  }
  const state: ProxyState = { config, identity, metrics, routes, tokens: tokenManagers(routes), relay: { sessions: new Set(), metrics, onIdle: undefined }, callers, limiter, watched, reloads: newReloadCounts(), draining: false };
  const server = listen(`${config.host}:${config.port}`, () => Bun.serve<RelaySession>(mainListener(state)));
  // kubelet's httpGet probes and Prometheus reach the pod IP while the proxy itself stays on 127.0.0.1.
  const admin = config.adminPort === undefined ? undefined : listen(`ADMIN_HOST:ADMIN_PORT ${config.adminHost}:${config.adminPort}`, () => Bun.serve(adminListener(state)));
  const callerKeysPoll = config.callerKeys === undefined ? undefined : setInterval(() => callers!.reloadIfChanged(), CALLER_KEYS_FILE_POLL_MS);
  callerKeysPoll?.unref();
  callers?.start();
  for (const manager of state.tokens) manager.start();
  const certificateWatch = watchCertificateExpiry(identity);
  const configPoll = watched.length === 0 ? undefined : setInterval(() => reloadChanged(state, "file changed"), CONFIG_POLL_MS);
  configPoll?.unref();
  const stopTimers = () => {
    clearInterval(certificateWatch);
    clearInterval(callerKeysPoll);
    clearInterval(configPoll);
  };
  return { server, admin, reload: (trigger) => reloadChanged(state, trigger, true), shutdown: shutdownOnce(state, server, admin, stopTimers) };
}

/** The routes and callers files read again (src/reload.ts); a good one replaces its table. */
function reloadChanged(state: ProxyState, trigger: string, always = false): void {
  if (state.draining) return;
  reloadFiles(state.watched, state.reloads, trigger, always, (watched, text) => (watched.file === "routes" ? reloadRoutes(state, watched, text) : reloadCallers(state, watched, text)), (watched) =>
    watched.file === "routes" ? { routes: state.routes.map((route) => route.prefix) } : { callers: state.callers?.names() },
  );
}

/** A new routes table: scopes already held keep their token (a new one is asked for at once), backends their state. */
function reloadRoutes(state: ProxyState, watched: WatchedFile, text: string): string[] | undefined {
  const held = new Map(state.tokens.map((manager) => [manager.scope, manager]));
  const result = reloadedRoutes(text, watched, state.config, state.routes, (scope, labelled) => held.get(scope) ?? new TokenManager(state.identity, scope, labelled), state.metrics, process.env);
  if ("faults" in result) return result.faults;
  const before = state.tokens;
  const tokens = tokenManagers(result.routes);
  for (const manager of tokens) manager.routePrefixes.length = 0;
  for (const route of result.routes) route.tokens.routePrefixes.push(route.prefix);
  state.routes = result.routes;
  state.tokens = tokens;
  for (const manager of tokens) if (!before.includes(manager)) manager.start();
  for (const manager of before) if (!tokens.includes(manager)) manager.stop();
  for (const warning of result.warnings) log("warn", warning);
  return undefined;
}

/** A new callers table: a removed caller's next request is refused; each caller's counts go on under its name. */
function reloadCallers(state: ProxyState, watched: WatchedFile, text: string): string[] | undefined {
  const result = reloadedCallers(text, watched, state.config, process.env);
  if ("faults" in result) return result.faults;
  state.callers = callersFor(state.config, state.metrics, result.callers, state.limiter);
  state.callers?.start();
  return undefined;
}

/** Why a scope has no token; with several scopes, which one it is. */
function tokenUnavailableReason(state: ProxyState, manager: ScopeTokens): string {
  return state.tokens.length > 1 ? `no token for ${manager.scope}: ${manager.unavailableReason()}` : manager.unavailableReason();
}

/** /health, /ready, /live and /metrics, exact paths, GET or HEAD: the proxy's own, on both listeners. */
function ownEndpoint(state: ProxyState, method: string, target: string): Response | undefined {
  if (target.length > 8 || (method !== "GET" && method !== "HEAD")) return undefined;
  if (target === "/health") return health(state, method);
  if (target === "/ready") return ready(state, method);
  if (target === "/live") return new Response(method === "HEAD" ? null : '{"status":"ok"}', { headers: JSON_HEADERS });
  if (target === "/metrics") return metricsPage(state, method);
  return undefined;
}

/** Ready only while every scope's token is held: each route without one would answer 503. */
function health(state: ProxyState, method: string): Response {
  const now = Date.now();
  const missing = state.tokens.filter((manager) => manager.usable(now) === undefined);
  const reason = state.draining ? "shutting down" : missing.length === 0 ? undefined : missing.map((manager) => tokenUnavailableReason(state, manager)).join("; ");
  const body = reason === undefined ? '{"status":"ok"}' : JSON.stringify({ status: "unavailable", reason });
  return new Response(method === "HEAD" ? null : body, { status: reason === undefined ? 200 : 503, headers: JSON_HEADERS });
}

/**
 * Ready while any route can serve: a gateway's readiness, where one scope
 * without a token must not take the other routes out of the Service (its
 * routes answer 503 naming it). 200 `degraded` names what does not serve.
 */
function ready(state: ProxyState, method: string): Response {
  const now = Date.now();
  const missing = state.tokens.filter((manager) => manager.usable(now) === undefined);
  const serving = !state.draining && missing.length < state.tokens.length;
  const reason = state.draining ? "shutting down" : missing.map((manager) => `${tokenUnavailableReason(state, manager)} (routes ${manager.routePrefixes.join(", ")} answer 503)`).join("; ");
  const body = reason === "" ? '{"status":"ok"}' : JSON.stringify({ status: serving ? "degraded" : "unavailable", reason });
  return new Response(method === "HEAD" ? null : body, { status: serving ? 200 : 503, headers: JSON_HEADERS });
}

function metricsPage({ metrics, routes, tokens, identity, relay, watched, reloads, limiter }: ProxyState, method: string): Response {
  const configReloads = Object.fromEntries(watched.map(({ file }) => [file, reloads[file]]));
  const lines: string[] = [];
  limiter?.render(lines);
  const text = renderMetrics({ metrics, routes, tokens, certificate: identity.certificate, websocketSessionsOpen: relay.sessions.size, heldRequestBodyBytes: heldBodyBytes, configReloads }) + (lines.length === 0 ? "" : `${lines.join("\n")}\n`);
  return new Response(method === "HEAD" ? null : text, { headers: METRICS_HEADERS });
}

/** The main listener: the proxy's own endpoints, then every other request to its route, forwarded or relayed. */
function mainListener(state: ProxyState): import("bun").Serve.Options<RelaySession> {
  const { config, relay } = state;
  return {
    hostname: config.host,
    port: config.port,
    idleTimeout: KEEP_ALIVE_IDLE_SECONDS,
    // Bun refuses bodies over 128 MB by default; the upstream decides what it accepts.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    development: false,
    fetch: (req, server) => handleRequest(state, req, server),
    websocket: {
      data: {} as RelaySession,
      maxPayloadLength: MAX_WEBSOCKET_FRAME_BYTES,
      // The upstream is paused at the first sign of back-pressure; this only bounds frames already read.
      backpressureLimit: MAX_WEBSOCKET_FRAME_BYTES,
      idleTimeout: WEBSOCKET_PING_SECONDS,
      sendPings: true,
      perMessageDeflate: false,
      open: clientOpened,
      message: relayToUpstream,
      drain: clientDrained,
      close: (client, code, reason) => clientClosed(client, code, reason, relay),
    },
    error(error) {
      log("error", "request failed inside the proxy", { error: errorMessage(error) });
      return proxyError(500, "internal_error", "auth-proxy failed to handle the request");
    },
  };
}

/** One request on the main listener, in the order the contract checks it. */
function handleRequest(state: ProxyState, req: Request, server: ProxyServer): Response | Promise<Response | undefined> | undefined {
  const { metrics, callers } = state;
  const method = req.method;
  const target = requestTarget(req.url);
  const own = ownEndpoint(state, method, target);
  if (own !== undefined) return own;
  // A reverse proxy, not a tunnel: CONNECT would ask it to open a socket to any host, TRACE echoes the request (and its keys).
  if (method === "CONNECT" || method === "TRACE") {
    answered(metrics, method, target, 405, performance.now(), callers?.unknownSeries(method, target));
    return proxyError(405, "method_not_allowed", `auth-proxy is a reverse proxy; it does not forward ${method}`, {
      allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
      connection: "close",
    });
  }
  if (state.draining) {
    answered(metrics, method, target, 503, performance.now(), callers?.unknownSeries(method, target));
    return proxyError(503, "shutting_down", "auth-proxy is shutting down", { connection: "close", "retry-after": "1" });
  }
  if (callers === undefined) return routed(state, req, server, method, target, metrics.anyone);
  const caller = callers.identify(req.headers, target, Date.now());
  if (caller instanceof Promise) return caller.then((settled) => admitted(state, req, server, method, target, settled));
  return admitted(state, req, server, method, target, caller);
}

/** A caller identified goes on to its route; a refusal is counted under its caller (or `unknown`) and nothing is forwarded. */
function admitted(state: ProxyState, req: Request, server: ProxyServer, method: string, target: string, caller: Caller | Refusal): Response | Promise<Response | undefined> | undefined {
  if (!("code" in caller)) return routed(state, req, server, method, target, caller.figures, caller.limited);
  const { metrics } = state;
  caller.figures.rejections.set(caller.code, (caller.figures.rejections.get(caller.code) ?? 0) + 1);
  answered(metrics, method, target, caller.status, performance.now(), requestSeries(metrics, method, deploymentLabel(metrics, target), caller.figures));
  return proxyError(caller.status, caller.code, caller.message, caller.status === 401 ? { "www-authenticate": 'Bearer realm="auth-proxy"' } : {});
}

/** To the request's route with its scope's token, forwarded or relayed, counted under its caller's series. */
function routed(state: ProxyState, req: Request, server: ProxyServer, method: string, target: string, figures: SeriesSet, limited?: LimitedCaller): Response | Promise<Response | undefined> | undefined {
  const { metrics } = state;
  const route = matchRoute(state.routes, target);
  if (route === undefined) {
    answered(metrics, method, target, 404, performance.now(), requestSeries(metrics, method, deploymentLabel(metrics, target), figures));
    return proxyError(404, "no_route", `no route of ${state.config.routesFile} takes ${pathOf(target)}`);
  }
  const now = Date.now();
  const token = route.tokens.usable(now);
  if (token === undefined) {
    answered(metrics, method, target, 503, performance.now(), requestSeries(metrics, method, deploymentLabel(metrics, target), figures));
    return proxyError(503, "token_unavailable", `auth-proxy holds no valid Azure AD token: ${tokenUnavailableReason(state, route.tokens)}`, {
      "retry-after": String(route.tokens.retryAfterSeconds(now)),
    });
  }
  if (isWebSocketUpgrade(req.headers)) return relayWebSocket(req, server, target, token.authorization, route, state.relay, figures, limited);
  return forward(req, method, target, token.authorization, route, server, figures, limited);
}

/** The admin listener: the proxy's own endpoints only, never forwarded. */
function adminListener(state: ProxyState): import("bun").Serve.Options<undefined> {
  return {
    hostname: state.config.adminHost,
    port: state.config.adminPort,
    idleTimeout: KEEP_ALIVE_IDLE_SECONDS,
    development: false,
    fetch: (req) => ownEndpoint(state, req.method, requestTarget(req.url)) ?? proxyError(404, "not_found", "the admin listener serves only /health, /ready, /live and /metrics"),
  };
}

/**
 * A second signal during the drain (kubelet's preStop and its own
 * SIGTERM, a Ctrl-C reaching a wrapper and the proxy) is ignored: it gets
 * the first drain's promise, so the deadline still holds.
 */
function shutdownOnce(state: ProxyState, server: Bun.Server<RelaySession>, admin: Bun.Server<undefined> | undefined, stopTimers: () => void): (signal: string) => Promise<void> {
  let stopped: Promise<void> | undefined;
  return (signal) => {
    if (stopped !== undefined) {
      log("info", "signal ignored: already shutting down", { signal });
      return stopped;
    }
    state.draining = true;
    log("info", "shutting down", { signal, shutdown_timeout_s: state.config.shutdownTimeoutMs / SECOND });
    for (const manager of state.tokens) manager.stop();
    stopTimers();
    return (stopped = drain(state, server).then((clean) => {
      admin?.stop(true);
      log("info", "stopped", { drained: clean });
    }));
  };
}

/** In-flight requests and sessions finish up to SHUTDOWN_TIMEOUT, then are closed: whether all finished in time. */
async function drain({ config, relay }: ProxyState, server: Bun.Server<RelaySession>): Promise<boolean> {
  // server.stop() waits for in-flight requests but has hung on idle
  // keep-alive sockets (oven-sh/bun#37074) and never ends open WebSockets:
  // sessions are waited for here, and both are raced against the deadline.
  const sessionsEnded = new Promise<void>((resolve) => {
    relay.onIdle = resolve;
    if (relay.sessions.size === 0) resolve();
  });
  const drained = Promise.all([server.stop(false), sessionsEnded]).then(() => true);
  const deadline = new Promise<false>((resolve) => setTimeout(resolve, config.shutdownTimeoutMs, false));
  const clean = await Promise.race([drained, deadline]);
  if (!clean) {
    log("warn", "shutdown timeout reached; closing open requests", {
      pending_requests: server.pendingRequests,
      open_websocket_sessions: relay.sessions.size,
    });
    for (const session of relay.sessions) closeBoth(session, 1001, "going away");
    // stop(true) has never resolved while a handler awaited its upstream (oven-sh/bun#40043): bound it too.
    await Promise.race([server.stop(true), Bun.sleep(FORCED_STOP_GRACE_MS)]);
  }
  return clean;
}

// ---------------------------------------------------------------- main

export const HELP = `auth-proxy ${VERSION}
Forwards requests to Azure OpenAI (or any Entra ID protected API) with an
Entra ID access token: client certificate, workload identity, managed
identity or client secret.

Usage: auth-proxy [flags]          (development: bun proxy.ts [flags])

Flags override the environment variables named beside them:
  --auth-mode <mode>        AZURE_AUTH_MODE          certificate, client-secret, workload-identity, managed-identity
                                                     (unset: the first of certificate, client secret, federated token file set)
  --client-id <id>          AZURE_CLIENT_ID          application (client) ID; managed identity: a user-assigned one's
  --tenant-id <id>          AZURE_TENANT_ID          tenant ID or domain (not for managed identity)
  --certificate-path <file> AZURE_CERTIFICATE_PATH   PEM with certificate and private key (certificate mode)
  --api-base-url <url>      API_BASE_URL             upstream, e.g. https://x.openai.azure.com (this or --routes)
  --routes <file>           AUTH_PROXY_ROUTES        YAML or JSON routes: a prefix, scope and backends each (this or --api-base-url)
  --host <addr>             HOST                     listen address (0.0.0.0)
  --port <n>                PORT                     listen port (8080)
  --scope <scope>           AZURE_SCOPE              (https://cognitiveservices.azure.com/.default)
  --authority-host <url>    AZURE_AUTHORITY_HOST     (https://login.microsoftonline.com)
  --log-level <level>       LOG_LEVEL                debug, info, warn, error (info)
  --admin-port <n>          ADMIN_PORT               second listener for /health, /ready, /live, /metrics only (none)
  --admin-host <addr>       ADMIN_HOST               its address (0.0.0.0)
  --callers <file>          AUTH_PROXY_CALLERS       YAML or JSON callers: a name, keys or an Entra app, routes each (off)
  --audience <aud>          AUTH_PROXY_AUDIENCE      the aud Entra callers' tokens carry: the proxy's app ID URI or client ID
  --caller <name>           AUTH_PROXY_CALLER        the one app behind a sidecar, named without a credential
  --check                   acquire one token, print a JSON summary, exit 0 (or 1 and why)
  --healthcheck             GET /health of the running proxy (HOST, PORT): exit 0 if 200, else 1
  --livecheck               GET /live of the running proxy: exit 0 if 200, else 1
  -h, --help                this text
  -v, --version             the version

Environment only:
  AZURE_CLIENT_SECRET, AZURE_CLIENT_SECRET_FILE  client-secret mode (the file is re-read for every token)
  AZURE_FEDERATED_TOKEN_FILE           workload-identity mode (set by the AKS webhook; re-read for every token)
  AZURE_CERTIFICATE_PASSWORD           password of an encrypted private key
  AZURE_CLIENT_SEND_CERTIFICATE_CHAIN  true sends x5c (subject name/issuer auth) (false)
  SHUTDOWN_TIMEOUT                     seconds to let requests finish on SIGTERM (25)
  PROXY_API_KEYS, PROXY_API_KEYS_FILE  keys callers must send as api-key or Bearer (off)
  AUTH_PROXY_REDIS_URL (_PASSWORD_FILE, _AUTH=entra)  callers' limits shared by every replica through Redis (memory)
  AUTH_PROXY_LIMITS_ON_STORE_FAILURE   open (each replica counts alone) or closed (503) while Redis is away (open)
  NODE_EXTRA_CA_CERTS, HTTPS_PROXY, NO_PROXY  as usual

Endpoints: /health (200 with a token for every route, else 503), /ready (200 while any route has one: a gateway's
readiness), /live, /metrics (Prometheus); everything else is forwarded,
WebSocket upgrades (the Realtime API) relayed with the token in the upstream handshake.
`;

const FLAG_SPEC = {
  "--auth-mode": String,
  "--client-id": String,
  "--tenant-id": String,
  "--certificate-path": String,
  "--api-base-url": String,
  "--routes": String,
  "--host": String,
  "--port": String,
  "--scope": String,
  "--authority-host": String,
  "--log-level": String,
  "--admin-port": String,
  "--admin-host": String,
  "--callers": String,
  "--audience": String,
  "--caller": String,
  "--check": Boolean,
  "--healthcheck": Boolean,
  "--livecheck": Boolean,
  "--help": Boolean,
  "--version": Boolean,
  "-h": "--help",
  "-v": "--version",
};

/**
 * Bun's fetch runs at most 256 requests at once and queues the rest
 * (oven-sh/bun#12214): the 257th concurrent stream would wait for another
 * to end. BUN_CONFIG_MAX_HTTP_REQUESTS lifts it but is read only when the
 * process starts, so when it is unset the proxy replaces itself (execve:
 * same PID, same arguments, PID 1 stays PID 1) with it set.
 */
const FETCH_CONCURRENCY_LIMIT = "65535";

function reexecWithFetchConcurrencyLimit(): void {
  if (process.env.BUN_CONFIG_MAX_HTTP_REQUESTS || process.platform !== "linux") return;
  try {
    const { dlopen, FFIType, ptr } = require("bun:ffi") as typeof import("bun:ffi");
    const cString = (text: string) => Buffer.from(`${text}\0`);
    const pointerArray = (strings: Buffer[]) => {
      const pointers = new BigUint64Array(strings.length + 1);
      strings.forEach((text, index) => (pointers[index] = BigInt(ptr(text))));
      return pointers;
    };
    const argv = readFileSync("/proc/self/cmdline", "utf8").split("\0").slice(0, -1).map(cString);
    const env = Object.entries(process.env)
      .map(([name, value]) => cString(`${name}=${value}`))
      .concat(cString(`BUN_CONFIG_MAX_HTTP_REQUESTS=${FETCH_CONCURRENCY_LIMIT}`));
    const executable = cString("/proc/self/exe");
    const libc = dlopen("libc.so.6", { execve: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 } });
    libc.symbols.execve(ptr(executable), ptr(pointerArray(argv)), ptr(pointerArray(env)));
    // execve returns only on failure.
  } catch {}
  log("warn", "could not raise Bun's fetch concurrency limit; set BUN_CONFIG_MAX_HTTP_REQUESTS=65535 to allow over 256 concurrent upstream requests");
}

/**
 * `--healthcheck` and `--livecheck`: a distroless image has no curl or
 * shell, so the binary probes its own /health or /live (Docker HEALTHCHECK,
 * Kubernetes exec probes when HOST=127.0.0.1 keeps kubelet's HTTP probes
 * out). Needs only HOST and PORT.
 */
const HEALTHCHECK_TIMEOUT_MS = 1500;

export function probeUrl(host: string, port: string, path: "/health" | "/live"): string {
  const reachable = host === "0.0.0.0" ? "127.0.0.1" : host === "::" ? "::1" : host;
  return `http://${reachable.includes(":") ? `[${reachable}]` : reachable}:${port}${path}`;
}

async function probe(env: Environment, flags: Flags, path: "/health" | "/live"): Promise<never> {
  const url = probeUrl(readSetting("host", env, flags).value!, readSetting("port", env, flags).value!, path);
  try {
    // Bun's fetch sends even loopback through HTTP_PROXY: a probe of the proxy itself never takes an outbound proxy.
    const response = await fetch(bypassProxyFor(url), { signal: AbortSignal.timeout(HEALTHCHECK_TIMEOUT_MS) });
    process.stdout.write(`${response.status} ${await response.text()}\n`);
    process.exit(response.status === 200 ? 0 : 1);
  } catch (error) {
    fail([`probe ${url} failed: ${(error as Error).name === "TimeoutError" ? "no answer" : errorMessage(error)}`]);
  }
}

function fail(lines: string[], exitCode = 1): never {
  for (const line of lines) process.stderr.write(`auth-proxy: ${line}\n`);
  process.exit(exitCode);
}

/** The startup line's and --check's account of who the proxy is and why: never a secret. */
function identitySummary(config: Config, identity: Identity): Record<string, string | undefined> {
  const viaEntra = config.authMode !== "managed-identity";
  const certificate = identity.certificate;
  return {
    identity_mode: config.authMode,
    identity_reason: config.authModeReason,
    client_id: config.clientId,
    tenant_id: viaEntra ? config.tenantId : undefined,
    ...identity.describe(),
    certificate_subject: certificate?.subject,
    certificate_not_after: certificate?.notAfter.toISOString(),
  };
}

/**
 * The outbound proxies (HTTPS_PROXY/NO_PROXY) token and API traffic take,
 * for the startup line and --check: host and port only. Managed identity
 * endpoints live on the host and are never asked through one.
 */
function outboundProxySummary(config: Config): Record<string, string> {
  const token = config.authMode === "managed-identity" ? undefined : outboundProxyFor(tokenEndpoint(config), process.env);
  const upstream = [...new Set(config.routes.flatMap((route) => route.backends).flatMap((backend) => outboundProxyFor(backend.url, process.env) ?? []).map(proxyAddress))];
  if (token === undefined && upstream.length === 0) return {};
  return { outbound_proxy_token: token === undefined ? "none" : proxyAddress(token), outbound_proxy_upstream: upstream.length === 0 ? "none" : upstream.join(", ") };
}

/** Where requests go, each backend's whole URL (its path is part of every forwarded path), for the startup line and --check. */
function routesSummary(config: Config): Record<string, unknown> {
  if (config.routesFile === undefined) {
    const backends = config.routes[0]!.backends;
    return { upstream: backends[0]!.url, backends: backends.length > 1 ? backends.map((backend) => backend.url) : undefined };
  }
  return {
    routes_file: config.routesFile,
    routes: config.routes.map((route) => ({ prefix: route.prefix, scope: route.scope, backends: route.backends.map((backend) => backend.url) })),
  };
}

/** One token for every distinct scope, in the order of their first route: all must come, as /health requires. */
export async function check(config: Config, identity: Identity, store: StoreSettings = MEMORY_STORE): Promise<never> {
  const scopes = [...new Set(config.routes.map((route) => route.scope))];
  let scope = scopes[0]!;
  // On stderr, beside the report or the failure: a wrong scope still gets a token, and fails only at the API.
  const warnings = configurationWarnings(config);
  for (const warning of warnings) process.stderr.write(`auth-proxy: warning: ${warning}\n`);
  const limitsStore = await checkStore(store, identity);
  if (typeof limitsStore === "string") fail([`--check failed: ${limitsStore}`]);
  try {
    const expiries: Record<string, string> = {};
    for (scope of scopes) expiries[scope] = new Date(checkTokenLifetime(await identity.requestToken(scope), Date.now()).expiresOnMs).toISOString();
    const report = {
      status: "ok",
      ...identitySummary(config, identity),
      ...outboundProxySummary(config),
      ...(scopes.length === 1 ? { scope, token_expires_on: expiries[scope] } : {}),
      ...(config.routesFile === undefined ? {} : { scopes: expiries, ...routesSummary(config) }),
      token_endpoint: config.authMode === "managed-identity" ? undefined : tokenEndpoint(config),
      warnings: warnings.length > 0 ? warnings : undefined,
      limits_store: limitsStore,
    };
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
    process.exit(0);
  } catch (error) {
    const { message, aadsts } = describeTokenError(error);
    const certificate = identity.certificate;
    const hint = identity.hint(error, aadsts);
    // Each part a sentence of its own: the failure, then what to do about it.
    const failure =
      `--check failed (${config.authMode} mode${scopes.length > 1 ? `, scope ${scope}` : ""}): ${aadsts && !message.includes(aadsts) ? `${aadsts}: ` : ""}${message.replace(/\.$/, "")}` +
      (certificate ? ` (certificate SHA-256 ${certificate.thumbprintSha256}, SHA-1 ${certificate.thumbprintSha1})` : "");
    fail([hint ? `${failure}. ${hint[0]!.toUpperCase()}${hint.slice(1)}` : failure]);
  }
}

export async function main(argv: string[]): Promise<void> {
  // Batched log lines reach stdout on every exit path, process.exit() included.
  process.on("exit", flushLogAtExit);
  let flags: Flags;
  try {
    flags = arg(FLAG_SPEC, { argv });
  } catch (error) {
    fail([`${errorMessage(error)} (see --help)`], 2);
  }
  const stray = flags._ as string[] | undefined;
  if (stray !== undefined && stray.length > 0) fail([`unknown argument ${stray[0]} (flags start with --; see --help)`], 2);
  if (flags["--help"]) return void process.stdout.write(HELP);
  if (flags["--version"]) return void process.stdout.write(`${VERSION}\n`);
  if (flags["--healthcheck"]) return probe(process.env, flags, "/health");
  if (flags["--livecheck"]) return probe(process.env, flags, "/live");

  const { config, errors } = loadConfig(process.env, flags);
  if (!config) fail(errors);
  setLogLevel(config.logLevel);
  const callersRead = callerEntriesOf(config, config.callersFileSource);
  if ("errors" in callersRead) fail(callersRead.errors);
  const callerEntries = callersRead.entries;
  const store = storeSettings(process.env);
  if ("errors" in store) fail(store.errors);
  if (store.settings.redisUrl !== undefined && config.callersFile === undefined) fail(["AUTH_PROXY_REDIS_URL is set without AUTH_PROXY_CALLERS: limits belong to the callers file's callers"]);

  // Before the credential is read: the process that replaces this one reads it again.
  if (!flags["--check"]) reexecWithFetchConcurrencyLimit();
  let identity: Identity;
  try {
    identity = createIdentity(config);
  } catch (error) {
    fail([errorMessage(error)]);
  }
  if (flags["--check"]) return check(config, identity, store.settings);
  openLogOutput();

  let proxy: RunningProxy;
  try {
    proxy = startProxy(config, identity, callerEntries, store.settings);
  } catch (error) {
    fail([errorMessage(error)]);
  }
  // As PID 1 in a container a process without handlers ignores SIGTERM: install them as soon as there is something to drain.
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => void proxy.shutdown(signal).then(() => process.exit(0)));
  }
  // SIGHUP reads the routes and callers files again (and never stops the proxy, as its default would).
  process.on("SIGHUP", () => proxy.reload("SIGHUP"));
  log("info", "auth-proxy started", {
    version: VERSION,
    listen: `${config.host}:${proxy.server.port}`,
    ...routesSummary(config),
    ...identitySummary(config, identity),
    ...outboundProxySummary(config),
    admin_listen: proxy.admin === undefined ? undefined : `${config.adminHost}:${proxy.admin.port}`,
    caller_keys: config.callerKeys === undefined ? "off" : "file" in config.callerKeys ? "PROXY_API_KEYS_FILE" : "PROXY_API_KEYS",
    callers_file: config.callersFile,
    callers: callerEntries?.map((entry) => entry.name),
    caller: config.callerName,
    limits_store: config.callersFile === undefined ? undefined : store.settings.redisUrl === undefined ? "memory" : `redis ${redactedUrl(store.settings.redisUrl)}${store.settings.entra ? " (Entra ID)" : ""}, on failure ${store.settings.onFailure}`,
  });
  for (const warning of configurationWarnings(config)) log("warn", warning);
}

if (import.meta.main) void main(process.argv.slice(2));
