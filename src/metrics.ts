/**
 * Metrics: the registry of plain counters, gauges and histograms per
 * method and deployment (label values bounded), and its Prometheus text
 * exposition, rendered from the registry and from figures the entry hands
 * in (routes and backends, scopes' tokens, held bodies).
 *
 * Imports: log, config, certificate.
 */
import { readdirSync } from "node:fs";
import { logLinesDropped, SECOND } from "./log.ts";
import { VERSION } from "./config.ts";
import { type Credential } from "./certificate.ts";

/**
 * The Prometheus text format (0.0.4) written by hand, as Go's expvar writes
 * JSON: plain number fields updated on the hot path, and `renderMetrics()`
 * walking them in a fixed order when scraped. Label values come from small
 * closed sets; the deployment label is capped.
 */
const METRIC_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"] as const;

/** Upstream header times and stream lengths of LLM calls: 5 ms to 10 minutes. */
export const DURATION_BUCKETS_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

/** Distinct deployment names kept as label values; the rest count as `other`, so random names cannot grow memory. */
export const MAX_DEPLOYMENT_LABELS = 50;

export const DEPLOYMENT_PREFIX = "/openai/deployments/";

/** Azure deployment names: letters, digits, `-`, `_`, `.`, at most 64. Anything else is `other`. */
export const DEPLOYMENT_NAME = /^[A-Za-z0-9._-]{1,64}$/;

/** Distinct model names kept as label values, bounded as deployments are. */
export const MAX_MODEL_LABELS = 50;

/** Model names as answers give them (`gpt-4o-2024-08-06`, `ft:gpt-4o-mini:org::id`), at most 128 characters. */
export const MODEL_NAME = /^[A-Za-z0-9._:\/@+-]{1,128}$/;

/**
 * Every build counts. `make bench` alone compiles one with `--define
 * AUTH_PROXY_BENCH_UNCOUNTED=true`, the same code with the per-request
 * counting folded away, to measure what metrics and access lines cost
 * together (issue 8: at most 5 % of throughput).
 */
declare const AUTH_PROXY_BENCH_UNCOUNTED: boolean;

export const COUNTED = typeof AUTH_PROXY_BENCH_UNCOUNTED === "undefined";

export type UpstreamErrorReason = "connect" | "tls" | "reset" | "client_abort" | "other";

interface Histogram {
  /** Per bucket, not cumulative; the last one is +Inf. */
  counts: Float64Array;
  sum: number;
  count: number;
}

/** One method and deployment (of one caller, with callers): its status codes and its three timings. */
export interface RequestSeries {
  method: string;
  deployment: string;
  /** The caller's series this one belongs to: its label, its token series. */
  set: SeriesSet;
  codes: Map<number, number>;
  upstreamHeaders: Histogram;
  responseEnd: Histogram;
  firstByte: Histogram;
}

/**
 * The request and token series of one caller, or of every request where no
 * caller is known (`caller` undefined: no caller label). Callers are the
 * callers file's names, a key's hash prefix, or `unknown`: a closed set.
 */
export interface SeriesSet {
  caller: string | undefined;
  /** deployment -> series per method index. */
  series: Map<string, (RequestSeries | undefined)[]>;
  /** `deployment` NUL `model` -> its token counts. */
  tokenSeries: Map<string, TokenSeries>;
  /** The series the last counted answer went to (its model kept as a label), checked first. */
  lastTokenSeries: TokenSeries | undefined;
  /** Requests refused before forwarding, by reason (401 and 403 codes). */
  rejections: Map<string, number>;
}

export function newSeriesSet(caller: string | undefined): SeriesSet {
  return { caller, series: new Map(), tokenSeries: new Map(), lastTokenSeries: undefined, rejections: new Map() };
}

/** One deployment and model: the tokens its answers reported, by type (TOKEN_TYPES' order). */
interface TokenSeries {
  deployment: string;
  model: string;
  tokens: Float64Array;
}

/** The `type` label's values, in the order of TokenSeries.tokens and Usage's fields. */
export const TOKEN_TYPES = ["input", "output", "cached_input", "reasoning"] as const;

export interface Metrics {
  /** Every request's series without callers; with callers, none. */
  anyone: SeriesSet;
  /** With callers: each caller's series, by its label. */
  callers: Map<string, SeriesSet>;
  /** The deployment names kept as label values, at most MAX_DEPLOYMENT_LABELS. */
  deployments: Set<string>;
  /** The deployment of the last request that named a kept one, checked first. */
  lastDeployment: string;
  /** The model names kept as label values, at most MAX_MODEL_LABELS. */
  models: Set<string>;
  requestsInFlight: number;
  requestBytes: number;
  responseBytes: number;
  upstreamErrors: Record<UpstreamErrorReason, number>;
  websocketSessionsTotal: { completed: number; refused: number; failed: number };
  startTimeSeconds: number;
}

export function newMetrics(): Metrics {
  return {
    anyone: newSeriesSet(undefined),
    callers: new Map(),
    deployments: new Set(),
    lastDeployment: "",
    models: new Set(),
    requestsInFlight: 0,
    requestBytes: 0,
    responseBytes: 0,
    upstreamErrors: { connect: 0, tls: 0, reset: 0, client_abort: 0, other: 0 },
    websocketSessionsTotal: { completed: 0, refused: 0, failed: 0 },
    startTimeSeconds: Math.floor(Date.now() / SECOND - process.uptime()),
  };
}

function methodIndex(method: string): number {
  switch (method) {
    case "POST":
      return 2;
    case "GET":
      return 0;
    case "HEAD":
      return 1;
    case "PUT":
      return 3;
    case "PATCH":
      return 4;
    case "DELETE":
      return 5;
    case "OPTIONS":
      return 6;
    default:
      return 7;
  }
}

/** The deployment in `/openai/deployments/{name}/...`, "" for other paths, `other` past the cap or when malformed. */
export function deploymentLabel(metrics: Metrics, target: string): string {
  if (!target.startsWith(DEPLOYMENT_PREFIX)) return "";
  // An app mostly calls one deployment: matching the last one in place spares a substring and its hash (60-130 ns a request, measured in place).
  const last = metrics.lastDeployment;
  if (last !== "" && target.startsWith(last, DEPLOYMENT_PREFIX.length) && endsPathSegment(target, DEPLOYMENT_PREFIX.length + last.length)) return last;
  let stop = DEPLOYMENT_PREFIX.length;
  while (stop < target.length && !endsPathSegment(target, stop)) stop += 1;
  const name = boundedLabel(metrics.deployments, target.slice(DEPLOYMENT_PREFIX.length, stop), DEPLOYMENT_NAME, MAX_DEPLOYMENT_LABELS);
  if (name !== "other") metrics.lastDeployment = name;
  return name;
}

/** `name` when it is kept as a label value (or can be, within `max`), else `other`: random names cannot grow memory. */
export function boundedLabel(kept: Set<string>, name: string, pattern: RegExp, max: number): string {
  if (kept.has(name)) return name;
  if (!pattern.test(name) || kept.size >= max) return "other";
  kept.add(name);
  return name;
}

/** Whether a path segment ends at `index`: a slash, the query, or the end of the target. */
export function endsPathSegment(target: string, index: number): boolean {
  const code = target.charCodeAt(index);
  return code === 47 /* "/" */ || code === 63 /* "?" */ || index === target.length;
}

function newHistogram(): Histogram {
  return { counts: new Float64Array(DURATION_BUCKETS_SECONDS.length + 1), sum: 0, count: 0 };
}

/** The series every request shares in the benchmark's uncounted build. */
export const UNCOUNTED_SERIES: RequestSeries = { method: "other", deployment: "", set: newSeriesSet(undefined), codes: new Map(), upstreamHeaders: newHistogram(), responseEnd: newHistogram(), firstByte: newHistogram() };

/** A caller's series, made at its first request (callers are a closed set). */
export function callerSeries(metrics: Metrics, caller: string): SeriesSet {
  let set = metrics.callers.get(caller);
  if (set === undefined) metrics.callers.set(caller, (set = newSeriesSet(caller)));
  return set;
}

export function requestSeries(metrics: Metrics, method: string, deployment: string, set = metrics.anyone): RequestSeries {
  let byMethod = set.series.get(deployment);
  if (byMethod === undefined) {
    byMethod = new Array(METRIC_METHODS.length);
    set.series.set(deployment, byMethod);
  }
  const index = methodIndex(method);
  return (byMethod[index] ??= {
    method: METRIC_METHODS[index]!,
    deployment,
    set,
    codes: new Map(),
    upstreamHeaders: newHistogram(),
    responseEnd: newHistogram(),
    firstByte: newHistogram(),
  });
}

export function observe(histogram: Histogram, seconds: number): void {
  let bucket = 0;
  while (bucket < DURATION_BUCKETS_SECONDS.length && seconds > DURATION_BUCKETS_SECONDS[bucket]!) bucket += 1;
  histogram.counts[bucket]! += 1;
  histogram.sum += seconds;
  histogram.count += 1;
}

export function countStatus(series: RequestSeries, status: number): void {
  series.codes.set(status, (series.codes.get(status) ?? 0) + 1);
}

/** The reason an upstream request failed, from fetch's error, as a closed set. */
export function upstreamErrorReason(error: unknown, clientAborted: boolean): UpstreamErrorReason {
  if (clientAborted) return "client_abort";
  const { code = "", message = "" } = (error ?? {}) as { code?: string; message?: string };
  const text = `${code} ${message}`;
  if (/ConnectionRefused|ECONNREFUSED|ENOTFOUND|EAI_AGAIN|FailedToOpenSocket|EHOSTUNREACH|ENETUNREACH|ConnectionTimeout|ETIMEDOUT/i.test(text)) return "connect";
  if (/CERT|TLS|SSL|self.signed|unable to verify|HANDSHAKE/i.test(text)) return "tls";
  if (/ECONNRESET|ConnectionClosed|socket hang up|EPIPE|closed unexpectedly/i.test(text)) return "reset";
  return "other";
}

/** A backend's x-ratelimit-remaining-* as last seen for one deployment. */
export interface RateLimitsSeen {
  requests: number | undefined;
  tokens: number | undefined;
}

/**
 * The rate-limit headers Azure OpenAI sends, kept as last seen per backend
 * and deployment: each region's deployment has a quota of its own, and one
 * gauge for all flipped between them. Deployments are bounded labels.
 */
export function noteRateLimits(seen: Map<string, RateLimitsSeen>, deployment: string, headers: Headers): void {
  const requests = headers.get("x-ratelimit-remaining-requests");
  const tokens = headers.get("x-ratelimit-remaining-tokens");
  if (requests === null && tokens === null) return;
  let figures = seen.get(deployment);
  if (figures === undefined) seen.set(deployment, (figures = { requests: undefined, tokens: undefined }));
  if (requests !== null) figures.requests = Number(requests);
  if (tokens !== null) figures.tokens = Number(tokens);
}

export const escapeLabel = (value: string) => value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

export function family(lines: string[], name: string, type: "counter" | "gauge" | "histogram", help: string): void {
  lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
}

function histogramLines(lines: string[], name: string, labels: string, histogram: Histogram): void {
  let cumulative = 0;
  for (let bucket = 0; bucket < DURATION_BUCKETS_SECONDS.length; bucket++) {
    cumulative += histogram.counts[bucket]!;
    lines.push(`${name}_bucket{${labels},le="${DURATION_BUCKETS_SECONDS[bucket]}"} ${cumulative}`);
  }
  lines.push(`${name}_bucket{${labels},le="+Inf"} ${histogram.count}`, `${name}_sum{${labels}} ${histogram.sum}`, `${name}_count{${labels}} ${histogram.count}`);
}

/** Backends and failovers, for routes of a routes file or a pool (labels bounded by the configuration). */
function backendLines(lines: string[], routes: RouteFigures[], heldRequestBodyBytes: number): void {
  if (routes.length === 0) return;
  const now = Date.now();
  const labels = (route: RouteFigures, backend: BackendFigures) => `route="${escapeLabel(route.prefix)}",backend="${escapeLabel(backend.name)}"`;
  family(lines, "auth_proxy_backend_up", "gauge", "1 while the backend serves, 0 while it rests (throttled, unreachable, or failing).");
  for (const route of routes) for (const backend of route.backends) lines.push(`auth_proxy_backend_up{${labels(route, backend)}} ${backend.restsUntil > now ? 0 : 1}`);
  family(lines, "auth_proxy_backend_requests_total", "counter", "Answers each backend gave, by status code (every attempt, failed-over ones included).");
  for (const route of routes) {
    for (const backend of route.backends) for (const [code, count] of backend.codes) lines.push(`auth_proxy_backend_requests_total{${labels(route, backend)},code="${code}"} ${count}`);
  }
  family(lines, "auth_proxy_failovers_total", "counter", "Requests moved on to the next backend, by why.");
  for (const route of routes) {
    for (const [reason, count] of Object.entries(route.failovers)) lines.push(`auth_proxy_failovers_total{route="${escapeLabel(route.prefix)}",reason="${reason}"} ${count}`);
  }
  family(lines, "auth_proxy_held_request_body_bytes", "gauge", "Request bodies held now so they can be sent to another backend (at most 64 MiB).");
  lines.push(`auth_proxy_held_request_body_bytes ${heldRequestBodyBytes}`);
}

/** The process's own figures, the names every Prometheus client library uses. */
function processLines(lines: string[], metrics: Metrics): void {
  const cpu = process.cpuUsage();
  family(lines, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
  lines.push(`process_cpu_seconds_total ${(cpu.user + cpu.system) / 1e6}`);
  family(lines, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
  lines.push(`process_resident_memory_bytes ${process.memoryUsage.rss()}`);
  family(lines, "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.");
  lines.push(`process_start_time_seconds ${metrics.startTimeSeconds}`);
  let openFds: number | undefined;
  try {
    openFds = readdirSync("/proc/self/fd").length;
  } catch {}
  if (openFds !== undefined) {
    family(lines, "process_open_fds", "gauge", "Number of open file descriptors.");
    lines.push(`process_open_fds ${openFds}`);
  }
}

/** What /metrics reads of a route of a routes file or a pool (src/routes.ts's Route): each backend's state and answers, the route's failovers. */
export interface RouteFigures {
  prefix: string;
  named: boolean;
  pooled: boolean;
  failovers: Record<string, number>;
  backends: BackendFigures[];
}

interface BackendFigures {
  name: string;
  restsUntil: number;
  codes: Map<number, number>;
  rateLimits: Map<string, RateLimitsSeen>;
}

/** What /metrics reads of a scope's token manager (the core's). */
export interface ScopeTokenFigures {
  scope: string;
  /** With a routes file each series carries a `scope` label. */
  labelled: boolean;
  acquisitionsSucceeded: number;
  acquisitionsFailed: number;
  current: { expiresOnMs: number } | undefined;
  lastSuccessAtMs: number | undefined;
}

interface MetricsSources {
  metrics: Metrics;
  routes: RouteFigures[];
  /** One per scope. */
  tokens: ScopeTokenFigures[];
  certificate: Credential | undefined;
  websocketSessionsOpen: number;
  /** Request bodies held for failover now (src/pools.ts). */
  heldRequestBodyBytes: number;
  /** Reloads of the routes and callers files, by file and result (src/reload.ts); only the files in use. */
  configReloads: Record<string, { success: number; failure: number }>;
}

/** The whole exposition, families in a fixed order, each with HELP and TYPE. */
export function renderMetrics({ metrics, routes, tokens, certificate, websocketSessionsOpen, heldRequestBodyBytes, configReloads }: MetricsSources): string {
  const lines: string[] = [];
  family(lines, "auth_proxy_build_info", "gauge", "auth-proxy's version and the Bun it runs on; always 1.");
  lines.push(`auth_proxy_build_info{version="${escapeLabel(VERSION)}",bun_version="${escapeLabel(Bun.version)}"} 1`);

  const sets = [metrics.anyone, ...metrics.callers.values()];
  const allSeries = sets.flatMap((set) => [...set.series.values()].flatMap((byMethod) => byMethod.filter((series) => series !== undefined)));
  const callerLabel = (set: SeriesSet) => (set.caller === undefined ? "" : `caller="${escapeLabel(set.caller)}",`);
  const labelsOf = (series: RequestSeries) => `${callerLabel(series.set)}method="${series.method}",deployment="${escapeLabel(series.deployment)}"`;
  family(lines, "auth_proxy_requests_total", "counter", "Requests answered, by method, status code sent to the client and Azure OpenAI deployment.");
  for (const series of allSeries) {
    for (const [code, count] of series.codes) lines.push(`auth_proxy_requests_total{${labelsOf(series)},code="${code}"} ${count}`);
  }
  family(lines, "auth_proxy_request_duration_seconds", "histogram", "Time from the request's arrival to the upstream's response headers.");
  for (const series of allSeries) histogramLines(lines, "auth_proxy_request_duration_seconds", labelsOf(series), series.upstreamHeaders);
  family(lines, "auth_proxy_time_to_first_byte_seconds", "histogram", "Time from the request's arrival to the first byte of the response body (an LLM's time to first token).");
  for (const series of allSeries) histogramLines(lines, "auth_proxy_time_to_first_byte_seconds", labelsOf(series), series.firstByte);
  family(lines, "auth_proxy_response_duration_seconds", "histogram", "Time from the request's arrival to the end of the response body.");
  for (const series of allSeries) histogramLines(lines, "auth_proxy_response_duration_seconds", labelsOf(series), series.responseEnd);

  family(lines, "auth_proxy_requests_in_flight", "gauge", "Requests being forwarded now, open streams included.");
  lines.push(`auth_proxy_requests_in_flight ${metrics.requestsInFlight}`);
  family(lines, "auth_proxy_request_bytes_total", "counter", "Request body bytes forwarded to the upstream.");
  lines.push(`auth_proxy_request_bytes_total ${metrics.requestBytes}`);
  family(lines, "auth_proxy_response_bytes_total", "counter", "Response body bytes passed to clients.");
  lines.push(`auth_proxy_response_bytes_total ${metrics.responseBytes}`);
  family(lines, "auth_proxy_upstream_errors_total", "counter", "Upstream requests that failed, by reason.");
  for (const [reason, count] of Object.entries(metrics.upstreamErrors)) lines.push(`auth_proxy_upstream_errors_total{reason="${reason}"} ${count}`);

  family(lines, "auth_proxy_websocket_sessions", "gauge", "WebSocket sessions open now.");
  lines.push(`auth_proxy_websocket_sessions ${websocketSessionsOpen}`);
  family(lines, "auth_proxy_websocket_sessions_total", "counter", "WebSocket upgrades, by result: completed (relayed and closed), refused (by the upstream), failed (upstream unreachable).");
  for (const [result, count] of Object.entries(metrics.websocketSessionsTotal)) lines.push(`auth_proxy_websocket_sessions_total{result="${result}"} ${count}`);

  // With a routes file every token series names its scope: `{scope="…"}`, or `{scope="…",` before more labels.
  const scoped = (manager: ScopeTokenFigures, more = "") => (manager.labelled ? `{scope="${escapeLabel(manager.scope)}"${more ? `,${more}` : ""}}` : more ? `{${more}}` : "");
  family(lines, "auth_proxy_token_acquisitions_total", "counter", "Token requests to the identity provider, by result.");
  for (const manager of tokens) {
    lines.push(`auth_proxy_token_acquisitions_total${scoped(manager, 'result="success"')} ${manager.acquisitionsSucceeded}`, `auth_proxy_token_acquisitions_total${scoped(manager, 'result="failure"')} ${manager.acquisitionsFailed}`);
  }
  family(lines, "auth_proxy_token_expiration_timestamp_seconds", "gauge", "When the token held expires (absent while none is held).");
  for (const manager of tokens) if (manager.current !== undefined) lines.push(`auth_proxy_token_expiration_timestamp_seconds${scoped(manager)} ${manager.current.expiresOnMs / SECOND}`);
  family(lines, "auth_proxy_token_last_success_timestamp_seconds", "gauge", "When the last token was acquired.");
  for (const manager of tokens) if (manager.lastSuccessAtMs !== undefined) lines.push(`auth_proxy_token_last_success_timestamp_seconds${scoped(manager)} ${manager.lastSuccessAtMs / SECOND}`);
  if (certificate !== undefined) {
    family(lines, "auth_proxy_certificate_expiration_timestamp_seconds", "gauge", "When the client certificate in use expires (notAfter).");
    lines.push(`auth_proxy_certificate_expiration_timestamp_seconds ${certificate.notAfter.getTime() / SECOND}`);
  }
  family(lines, "auth_proxy_upstream_ratelimit_remaining", "gauge", "The upstream's x-ratelimit-remaining-requests and -tokens, as last seen per backend and deployment.");
  for (const route of routes) {
    for (const backend of route.backends) {
      const where = route.named || route.pooled ? `route="${escapeLabel(route.prefix)}",backend="${escapeLabel(backend.name)}",` : "";
      for (const [deployment, seen] of backend.rateLimits) {
        const labels = `${where}deployment="${escapeLabel(deployment)}"`;
        if (seen.requests !== undefined) lines.push(`auth_proxy_upstream_ratelimit_remaining{${labels},kind="requests"} ${seen.requests}`);
        if (seen.tokens !== undefined) lines.push(`auth_proxy_upstream_ratelimit_remaining{${labels},kind="tokens"} ${seen.tokens}`);
      }
    }
  }

  family(lines, "auth_proxy_model_tokens_total", "counter", "Tokens the answers' usage reported, by deployment, model and type (cached_input is part of input, reasoning part of output).");
  for (const series of sets.flatMap((set) => [...set.tokenSeries.values()].map((tokens) => ({ ...tokens, set })))) {
    const labels = `${callerLabel(series.set)}deployment="${escapeLabel(series.deployment)}",model="${escapeLabel(series.model)}"`;
    for (let type = 0; type < TOKEN_TYPES.length; type += 1) lines.push(`auth_proxy_model_tokens_total{${labels},type="${TOKEN_TYPES[type]}"} ${series.tokens[type]}`);
  }

  if (metrics.callers.size > 0) {
    family(lines, "auth_proxy_caller_rejections_total", "counter", "Requests refused before forwarding, by caller (unknown when none was identified) and reason.");
    for (const set of metrics.callers.values()) for (const [reason, count] of set.rejections) lines.push(`auth_proxy_caller_rejections_total{caller="${escapeLabel(set.caller!)}",reason="${reason}"} ${count}`);
  }

  backendLines(lines, routes.filter((route) => route.named || route.pooled), heldRequestBodyBytes);

  if (Object.keys(configReloads).length > 0) {
    family(lines, "auth_proxy_config_reloads_total", "counter", "Reloads of the routes and callers files, by file and result (failure: the last good one kept serving).");
    for (const [file, counts] of Object.entries(configReloads)) {
      lines.push(`auth_proxy_config_reloads_total{file="${file}",result="success"} ${counts.success}`, `auth_proxy_config_reloads_total{file="${file}",result="failure"} ${counts.failure}`);
    }
  }

  family(lines, "auth_proxy_log_lines_dropped_total", "counter", "Log lines dropped because stdout was closed or not read fast enough.");
  lines.push(`auth_proxy_log_lines_dropped_total ${logLinesDropped}`);

  processLines(lines, metrics);
  return `${lines.join("\n")}\n`;
}
