/**
 * What forwarding and the WebSocket relay share: the hop-by-hop headers,
 * the request target as received, the upstream request's headers, the
 * OpenAI-shaped error body, the idle-timer rules, and the proxy's own
 * answers (counted and given their access line, naming route and
 * backends): a client gone, every backend resting, none reachable.
 *
 * Imports: log, config, metrics, routes, pools.
 */
import { ACCESS_LINE_BYTES, accessLogEnabled, ATTEMPTS, BACKEND, CALLER, errorMessage, LINE_END, putAccessLineHead, putBytes, putIntegerField, putStringField, reserveLine, ROUTE, SECOND, TRIED } from "./log.ts";
import { KEEP_ALIVE_IDLE_SECONDS } from "./config.ts";
import { countStatus, deploymentLabel, type Metrics, type RequestSeries, requestSeries } from "./metrics.ts";
import { type Route } from "./routes.ts";
import { type Attempts } from "./pools.ts";

/**
 * Hop-by-hop headers (RFC 9110 section 7.6.1, formerly RFC 7230 section
 * 6.1): they describe one connection, so a proxy removes them both ways,
 * along with any header the Connection header names. Proxy-Connection is
 * the pre-standard spelling some clients still send; Proxy-Authenticate is
 * hop-by-hop per RFC 9110 section 11.7.1, as in Go's ReverseProxy.
 */
const HOP_BY_HOP_HEADERS = [
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
];

export function removeHopByHopHeaders(headers: Headers): void {
  const connection = headers.get("connection");
  if (connection !== null) {
    for (const name of connection.split(",")) {
      const trimmed = name.trim();
      // A listed name that is no header name (`x a`) names no header to remove; Headers.delete would throw on it.
      try {
        if (trimmed) headers.delete(trimmed);
      } catch {}
    }
  }
  for (const name of HOP_BY_HOP_HEADERS) headers.delete(name);
}

/**
 * The request's raw path and query as Bun received them. Bun builds
 * `req.url` from the Host header when it is valid and leaves it relative
 * when it is not; an absolute-form target (`GET http://other/x`) arrives
 * already reduced to its path. Taking only the path, and appending it to
 * API_BASE_URL by concatenation rather than `new URL(path, base)` (which
 * resolves `//host/x` to another host), keeps every request on API_BASE_URL's
 * origin.
 */
export function requestTarget(url: string): string {
  const pathStart = url.charCodeAt(0) === 47 /* "/" */ ? 0 : url.indexOf("/", url.indexOf("://") + 3);
  if (pathStart === -1) return "/";
  const target = pathStart === 0 ? url : url.slice(pathStart);
  // Three native scans screen out every target without a dot-segment (the hot path's); the rest are checked exactly.
  return target.indexOf("/.") === -1 && target.indexOf("%2") === -1 && target.indexOf("\\") === -1 ? target : withoutDotSegments(target);
}

/**
 * Bun resolves `..` and `%2e%2e` in the target only when it parses the
 * Host header as a URL's host; with an empty or malformed one (`Host:`,
 * `Host: %%%`, `Host: x:99999`) the target comes as it was on the wire.
 * fetch would resolve its dot-segments against API_BASE_URL's path and
 * climb above the prefix (`/deployments/allowed` + `/../../other` is
 * `/other`), so they are resolved here against the root, as the URL parser
 * does for every other request; the query is kept as sent.
 */
function withoutDotSegments(target: string): string {
  const queryStart = target.indexOf("?");
  const path = queryStart === -1 ? target : target.slice(0, queryStart);
  if (!/(^|[/\\])(\.|%2e)/i.test(path)) return target;
  return new URL(`http://host${path}`).pathname + (queryStart === -1 ? "" : target.slice(queryStart));
}

/** The upstream request's headers, edited in place: the request's own object is not used again. */
export function rewriteRequestHeaders(headers: Headers, authorization: string): void {
  removeHopByHopHeaders(headers);
  headers.delete("host"); // fetch sets the upstream's
  headers.delete("api-key"); // the app's placeholder key must not reach Azure
  headers.set("authorization", authorization);
}

/** Every error the proxy itself answers with is shaped like OpenAI's, so SDKs surface the message. */
export function proxyError(status: number, code: string, message: string, headers: Record<string, string> = {}): Response {
  return Response.json({ error: { message, type: "auth_proxy_error", code } }, { status, headers });
}

/**
 * A forwarded request still waiting after this has the timer lifted
 * (`server.timeout(req, 0)`), well before it would fire. Lifting every
 * request at once would cost nothing more, but the lift stays on the
 * socket after the response (measured: such connections were never
 * reaped), so it is undone when the body ends, which costs a body relay.
 */
export const LIFT_IDLE_TIMER_AFTER_MS = 30 * SECOND;

/** What forwarding asks of Bun.serve's server: a request's idle timer, lifted (0) or re-armed. */
export interface IdleTimers {
  timeout(request: Request, seconds: number): void;
}

export function liftIdleTimer(server: IdleTimers, req: Request): void {
  server.timeout(req, 0);
}

/** Whether the lift may have fired for a request started at `startedAt`: a second's margin covers a timer that ran late. */
export function idleTimerLifted(startedAt: number, nowMs: number): boolean {
  return nowMs - startedAt >= LIFT_IDLE_TIMER_AFTER_MS - SECOND;
}

/** No answer to pass on: the client left (499), every backend rests (429/503), or the last one could not be reached (502). */
export function unanswered(req: Request, method: string, target: string, route: Route, attempts: Attempts, startedAt: number, series: RequestSeries | undefined, server: IdleTimers): Response {
  const metrics = route.metrics;
  if (req.signal.aborted) {
    answered(metrics, method, target, 499, startedAt, series, route, attempts);
    return new Response(null, { status: 499 });
  }
  if (attempts.backend === undefined) {
    const resting = restingAnswer(route, Date.now());
    answered(metrics, method, target, resting.status, startedAt, series, route, attempts);
    return resting;
  }
  answered(metrics, method, target, 502, startedAt, series, route, attempts);
  // A request that waited long enough to have its timer lifted gets it back, as after any response.
  if (idleTimerLifted(startedAt, performance.now())) server.timeout(req, KEEP_ALIVE_IDLE_SECONDS);
  return proxyError(502, "upstream_unreachable", `auth-proxy could not reach ${attempts.backend.origin}: ${errorMessage(attempts.error)}`);
}

/** An upload that sent nothing for the keep-alive idle time while its body was held: its hold is released and the connection closed. */
export function stalledUpload(method: string, target: string, route: Route, startedAt: number, series: RequestSeries): Response {
  answered(route.metrics, method, target, 408, startedAt, series, route);
  return proxyError(408, "request_body_stalled", `the request body sent nothing for ${KEEP_ALIVE_IDLE_SECONDS} s`, { connection: "close" });
}

/**
 * A request the proxy answered itself (401, 405, 499, 502, 503...): counted
 * and given its access line at once; one that reached a route names it, and
 * the backends it tried.
 */
export function answered(metrics: Metrics, method: string, target: string, status: number, startedAt: number, series = requestSeries(metrics, method, deploymentLabel(metrics, target)), route?: Route, attempts?: Attempts): void {
  countStatus(series, status);
  if (!accessLogEnabled) return;
  const tried = attempts?.tried ?? "";
  const caller = series.set.caller;
  if (!reserveLine(ACCESS_LINE_BYTES + 6 * (method.length + target.length + (route?.prefix.length ?? 0) + tried.length + (caller?.length ?? 0)))) return;
  putAccessLineHead(method, target, status, startedAt, performance.now());
  if (route !== undefined) putRouteFields(route, attempts?.backend?.name, attempts?.count ?? 0, tried);
  if (caller !== undefined) putStringField(CALLER, caller);
  putBytes(LINE_END);
}

/**
 * With a routes file or a pool: the route, the backend whose answer the
 * client got (when one did), the attempts, and when there were several
 * (or none answered), the backends tried in order.
 */
export function putRouteFields(route: Route, backend: string | undefined, attempts: number, tried: string): void {
  if (!route.named && !route.pooled) return;
  if (route.named) putStringField(ROUTE, route.prefix);
  if (backend !== undefined) putStringField(BACKEND, backend);
  putIntegerField(ATTEMPTS, attempts);
  if (attempts > 1 || (backend === undefined && attempts > 0)) putStringField(TRIED, tried);
}

/**
 * Every backend of the route rests, so nothing is forwarded: 429
 * `backends_throttled` while a throttled one is among them, else 503
 * `backends_unavailable`, each saying when the first backend, of any kind,
 * returns (Retry-After in whole seconds, rounded up, and `retry-after-ms`
 * as Azure writes it): a client told to wait for the throttled one would
 * wait past an unreachable one that came back.
 */
export function restingAnswer(route: Route, nowMs: number): Response {
  const throttled = route.backends.filter((backend) => backend.restReason === "throttled" && backend.restsUntil > nowMs);
  const returns = Math.min(...route.backends.map((backend) => backend.restsUntil)) - nowMs;
  const headers = { "retry-after": String(Math.max(1, Math.ceil(returns / SECOND))), "retry-after-ms": String(Math.max(0, Math.ceil(returns))) };
  return throttled.length > 0
    ? proxyError(429, "backends_throttled", `every backend of route ${route.prefix} is throttled; the first returns in ${headers["retry-after"]} s`, headers)
    : proxyError(503, "backends_unavailable", `every backend of route ${route.prefix} is resting after failures; the first returns in ${headers["retry-after"]} s`, { "retry-after": headers["retry-after"] });
}
