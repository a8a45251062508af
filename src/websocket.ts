/**
 * The WebSocket relay (Realtime, the Responses API's WebSocket mode): the
 * handshake checked and failed over before the client is switched, then
 * one copy loop per direction with back-pressure, closes passed on, the
 * session's line and its Realtime token usage.
 *
 * Imports: log, identity, metrics, usage, routes, limits, callers, pools, http.
 */
import { errorMessage, log, pathEnd, pathOf, SECOND } from "./log.ts";
import { readBounded } from "./identity.ts";
import { boundedLabel, DEPLOYMENT_NAME, deploymentLabel, MAX_DEPLOYMENT_LABELS, type Metrics, MODEL_NAME, requestSeries, type SeriesSet, TOKEN_TYPES, upstreamErrorReason } from "./metrics.ts";
import { type FailoverReason, forwardedPath, type Route } from "./routes.ts";
import { type LimitedCaller } from "./limits.ts";
import { CREDENTIAL_QUERY_PARAMETERS, INSECURE_KEY_SUBPROTOCOL } from "./callers.ts";
import { backendPath, chooseBackend, failoverReason, noteBackendAnswer } from "./pools.ts";
import { countTokens, TOKENS_COUNTED, type Usage, usageInBody } from "./usage.ts";
import { answered, proxyError, removeHopByHopHeaders, rewriteRequestHeaders, unanswered } from "./http.ts";

export type ProxyServer = import("bun").Server<RelaySession>;

/**
 * Handshake headers that belong to each hop (RFC 6455 section 4): the
 * proxy's own client negotiates its key, version and extensions with the
 * upstream, and the subprotocols go through the client's `protocols`.
 */
const WEBSOCKET_HANDSHAKE_HEADERS = ["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol", "sec-websocket-accept"];

/** A client frame larger than this closes its session with 1009; realtime audio frames are far smaller. */
export const MAX_WEBSOCKET_FRAME_BYTES = 64 * 1024 * 1024;

/** Past this, the upstream socket's unsent bytes stop the proxy reading its client until they drain below the low mark. */
const UPSTREAM_HIGH_WATER_BYTES = 1024 * 1024;

const UPSTREAM_LOW_WATER_BYTES = 256 * 1024;

const UPSTREAM_DRAIN_POLL_MS = 5;

/**
 * Bun pings a silent client shortly before this and keeps the session while
 * it answers: a voice session may be silent for minutes, a vanished peer is
 * still found.
 */
export const WEBSOCKET_PING_SECONDS = 60;

/** The request target without credential query parameters; every other byte of the query stays as sent. */
export function withoutCredentialParameters(target: string): string {
  const queryStart = target.indexOf("?");
  if (queryStart === -1) return target;
  const kept = target
    .slice(queryStart + 1)
    .split("&")
    .filter((parameter) => !CREDENTIAL_QUERY_PARAMETERS.includes(queryParameterName(parameter)));
  return target.slice(0, queryStart) + (kept.length > 0 ? `?${kept.join("&")}` : "");
}

function queryParameterName(parameter: string): string {
  const equals = parameter.indexOf("=");
  const raw = (equals === -1 ? parameter : parameter.slice(0, equals)).replace(/\+/g, " ");
  try {
    return decodeURIComponent(raw).toLowerCase();
  } catch {
    return raw.toLowerCase();
  }
}

/** The client's offered subprotocols, in order, minus any that carries a key. */
export function upstreamSubprotocols(offered: string | null): string[] {
  if (offered === null) return [];
  return offered
    .split(",")
    .map((protocol) => protocol.trim())
    .filter((protocol) => protocol !== "" && !protocol.startsWith(INSECURE_KEY_SUBPROTOCOL));
}

/** The client's end-to-end headers for the upstream handshake, with the bearer token in place of any client credential. */
export function upstreamHandshakeHeaders(clientHeaders: Headers, authorization: string): Headers {
  const headers = new Headers(clientHeaders);
  rewriteRequestHeaders(headers, authorization);
  for (const name of WEBSOCKET_HANDSHAKE_HEADERS) headers.delete(name);
  return headers;
}

/** Close codes an endpoint may send (RFC 6455 section 7.4); 1005 and 1006 only describe what was received. */
function isSendableCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

type Frame = string | Buffer;

/** One relayed session: both sockets and its counts, as plain fields. */
export interface RelaySession {
  path: string;
  upstream: WebSocket;
  /** Set when the client's upgrade completes; upstream frames wait in `queued` until then. */
  client: ServerWebSocket<RelaySession> | undefined;
  queued: Frame[];
  startedAt: number;
  framesFromClient: number;
  bytesFromClient: number;
  framesFromUpstream: number;
  bytesFromUpstream: number;
  closedBy: "client" | "upstream" | "proxy" | undefined;
  closeCode: number;
  closeReason: string;
  resumePoll: ReturnType<typeof setInterval> | undefined;
  ended: boolean;
  metrics: Metrics;
  /** Its caller's series (or everyone's): where its tokens are counted. */
  figures: SeriesSet;
  /** The deployment label its tokens are counted under, from the path or the `deployment` query parameter. */
  deployment: string;
  /** A limited caller's session: each response's usage is charged as it ends. */
  limited: LimitedCaller | undefined;
  /** The model `session.created` named, and the tokens of the session's responses so far (-1: none said). */
  model: string;
  tokens: Usage["tokens"];
}

type ServerWebSocket<T> = import("bun").ServerWebSocket<T>;

export interface Relay {
  sessions: Set<RelaySession>;
  metrics: Metrics;
  /** Called when the last session ends, for the drain. */
  onIdle: (() => void) | undefined;
}

function frameBytes(frame: Frame): number {
  return typeof frame === "string" ? Buffer.byteLength(frame) : frame.byteLength;
}

/**
 * The handshake comes first, as in Go's ReverseProxy: the client's upgrade
 * is accepted only once the upstream's succeeded, so the client sees the
 * upstream's real refusal (401, 404, 429...) as an HTTP status rather than
 * a socket that opens and closes.
 */
export async function relayWebSocket(
  req: Request,
  server: ProxyServer,
  target: string,
  authorization: string,
  route: Route,
  relay: Relay,
  figures: SeriesSet,
  limited: LimitedCaller | undefined,
): Promise<Response | undefined> {
  const startedAt = performance.now();
  const counted = (status: number) => answered(route.metrics, req.method, target, status, startedAt, requestSeries(route.metrics, req.method, deploymentLabel(route.metrics, target), figures));
  const protocols = upstreamSubprotocols(req.headers.get("sec-websocket-protocol"));
  const fault = handshakeFault(req, protocols);
  if (fault !== undefined) return badHandshake(fault, counted);
  if (limited !== undefined) {
    // Admitted like a request (one request, a token so that a spent quota refuses it); its responses are charged as they end.
    const asked = limited.limiter.admit(limited, 1);
    const admission = asked instanceof Promise ? await asked : asked;
    if (!("caller" in admission)) {
      counted(admission.status);
      return proxyError(admission.status, admission.code, admission.message, admission.headers);
    }
  }
  // A fragment never belongs to a request (RFC 9112 section 3.2); fetch drops it, and so does the relay.
  const path = withoutCredentialParameters(withoutFragment(forwardedPath(route, target)));
  const headers = upstreamHandshakeHeaders(req.headers, authorization);
  const deployment = TOKENS_COUNTED ? websocketDeployment(route.metrics, path) : "";
  // The handshake fails over as requests do: a refusal with 429 or 5xx, or an unreachable backend, moves it on.
  let tried = 0;
  let refused: { handshake: UpstreamHandshake; failure: string; reason: FailoverReason | undefined } | undefined;
  let session: RelaySession;
  for (;;) {
    const backend = req.signal.aborted ? undefined : chooseBackend(route.backends, tried, Date.now());
    if (backend === undefined && refused !== undefined) return refusedHandshake(req, refused.handshake, refused.failure, route, counted);
    if (backend === undefined) return unanswered(req, req.method, target, route, { response: undefined, error: undefined, backend: undefined, count: 0, tried: "" }, startedAt, requestSeries(route.metrics, req.method, deploymentLabel(route.metrics, target), figures), server);
    if (refused !== undefined) route.failovers[refused.reason!] += 1;
    tried |= 1 << backend.index;
    const url = backend.url + backendPath(backend, path);
    let socket: WebSocket;
    try {
      socket = new WebSocket(backend.websocketBaseUrl + backendPath(backend, path), {
        headers,
        protocols,
        // Each hop negotiates its own extensions; compressing here would cost CPU on every audio frame.
        perMessageDeflate: false,
        proxy: backend.websocketProxy,
      });
    } catch (error) {
      // Bun's client refuses what it cannot send (a malformed URL or protocol): the client's handshake was at fault.
      return badHandshake(errorMessage(error), counted);
    }
    session = newSession(socket, target, deployment, startedAt, relay, figures, limited);
    const failure = await upstreamHandshake(socket, req.signal);
    if (failure === undefined) break;
    const status = refusalStatus(failure);
    if (!req.signal.aborted) noteBackendAnswer(route, backend, status, new Headers(), Date.now());
    refused = { handshake: { url, headers, origin: backend.origin }, failure, reason: status === undefined ? "unreachable" : failoverReason(status) };
    if (refused.reason === undefined || !route.pooled) return refusedHandshake(req, refused.handshake, failure, route, counted);
  }

  const socket = session.upstream;
  const protocol = socket.protocol;
  // Without an explicit header Bun answers with the client's first offer, not the upstream's choice.
  if (!server.upgrade(req, { data: session, headers: protocol ? { "sec-websocket-protocol": protocol } : undefined })) {
    socket.close(1001, "client went away");
    return undefined;
  }
  relay.sessions.add(session);
  return undefined;
}

/** Azure's Realtime endpoint names its deployment in the query (`/openai/realtime?deployment=…`), the older form in the path. */
function websocketDeployment(metrics: Metrics, path: string): string {
  const inPath = deploymentLabel(metrics, path);
  if (inPath !== "") return inPath;
  const name = new URLSearchParams(path.slice(pathEnd(path))).get("deployment");
  return name === null ? "" : boundedLabel(metrics.deployments, name, DEPLOYMENT_NAME, MAX_DEPLOYMENT_LABELS);
}

/** Server events name their `type` first; looking only that far keeps long audio deltas from being searched. */
const EVENT_TYPE_WITHIN = 96;

/**
 * Realtime server events: `session.created` and `session.updated` name the
 * model, each `response.done` carries one response's usage (the Responses
 * API's WebSocket mode: `response.completed`, with its model). Only those
 * frames are parsed; each response is counted as it ends.
 */
function noteRealtimeEvent(session: RelaySession, frame: string): void {
  const done = frame.lastIndexOf('"response.done"', EVENT_TYPE_WITHIN) !== -1 || frame.lastIndexOf('"response.completed"', EVENT_TYPE_WITHIN) !== -1;
  if (!done && frame.lastIndexOf('"session.created"', EVENT_TYPE_WITHIN) === -1 && frame.lastIndexOf('"session.updated"', EVENT_TYPE_WITHIN) === -1) return;
  let event: { type?: unknown; session?: { model?: unknown }; response?: { model?: unknown } };
  try {
    event = JSON.parse(frame);
  } catch {
    return;
  }
  const model = done ? event.response?.model : event.session?.model;
  if (typeof model === "string" && MODEL_NAME.test(model)) session.model = model;
  if (!done || (event.type !== "response.done" && event.type !== "response.completed")) return;
  // The same reader and rules as for HTTP answers: the usage is the event's `response` object's own.
  const tokens = usageInBody(Buffer.from(frame))?.tokens;
  if (tokens === undefined) return;
  countTokens(session.metrics, session.figures, session.deployment, { model: session.model, tokens });
  session.limited?.limiter.charge(session.limited, { model: session.model, tokens });
  for (let type = 0; type < tokens.length; type += 1) if (tokens[type]! >= 0) session.tokens[type] = Math.max(session.tokens[type]!, 0) + tokens[type]!;
}

/** The session line's model and token sums, when a response reported usage. */
function sessionUsageFields(session: RelaySession): Record<string, string | number> {
  const fields: Record<string, string | number> = {};
  if (session.tokens[0] === -1 && session.tokens[1] === -1) return fields;
  if (session.model !== "") fields.model = session.model;
  for (let type = 0; type < TOKEN_TYPES.length; type += 1) if (session.tokens[type]! >= 0) fields[`${TOKEN_TYPES[type]}_tokens`] = session.tokens[type]!;
  return fields;
}

/** A session for an upstream socket whose handshake is under way: its frames queue until the client's upgrade completes. */
function newSession(socket: WebSocket, target: string, deployment: string, startedAt: number, relay: Relay, figures: SeriesSet, limited: LimitedCaller | undefined): RelaySession {
  socket.binaryType = "nodebuffer";
  const session: RelaySession = {
    path: pathOf(target),
    upstream: socket,
    client: undefined,
    queued: [],
    startedAt,
    framesFromClient: 0,
    bytesFromClient: 0,
    framesFromUpstream: 0,
    bytesFromUpstream: 0,
    closedBy: undefined,
    closeCode: 0,
    closeReason: "",
    resumePoll: undefined,
    ended: false,
    metrics: relay.metrics,
    figures,
    deployment,
    limited,
    model: "",
    tokens: [-1, -1, -1, -1],
  };
  socket.onmessage = (event) => relayToClient(session, event.data as Frame);
  socket.onclose = (event) => upstreamClosed(session, event.code, event.reason, relay);
  return session;
}

/** The status of a refused handshake, from Bun's "Expected 101 status code: 302"; undefined when no HTTP answer came (unreachable). */
function refusalStatus(failure: string): number | undefined {
  const status = Number(/Expected 101 status code: (\d{3})/.exec(failure)?.[1] ?? 0);
  return status >= 300 && status <= 599 ? status : undefined;
}

/** A Sec-WebSocket-Key is 16 random bytes in base64 (RFC 6455 section 4.1). */
const WEBSOCKET_KEY = /^[A-Za-z0-9+/]{22}==$/;

/** A subprotocol is an HTTP token (RFC 6455 section 4.1, RFC 9110 section 5.6.2). */
const HTTP_TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/**
 * What is wrong with the client's handshake, checked before any upstream
 * session is opened with the token: a handshake the proxy could not
 * complete with its client must not cost one upstream.
 */
function handshakeFault(req: Request, protocols: string[]): string | undefined {
  if (req.method !== "GET") return "a WebSocket upgrade must be a GET";
  if (req.headers.get("sec-websocket-version") !== "13") return "a WebSocket upgrade needs Sec-WebSocket-Version: 13";
  if (!WEBSOCKET_KEY.test(req.headers.get("sec-websocket-key") ?? "")) return "Sec-WebSocket-Key must be 16 bytes in base64";
  const offered = new Set<string>();
  for (const protocol of protocols) {
    if (!HTTP_TOKEN.test(protocol)) return "Sec-WebSocket-Protocol lists a subprotocol that is not a token";
    if (offered.has(protocol)) return `Sec-WebSocket-Protocol offers ${protocol} twice`;
    offered.add(protocol);
  }
  return undefined;
}

function badHandshake(fault: string, counted: (status: number) => void): Response {
  counted(400);
  return proxyError(400, "bad_websocket_handshake", `malformed WebSocket upgrade: ${fault}`);
}

function withoutFragment(target: string): string {
  const hash = target.indexOf("#");
  return hash === -1 ? target : target.slice(0, hash);
}

/** Resolves undefined once the upstream accepted, or with why it did not. */
function upstreamHandshake(socket: WebSocket, clientGone: AbortSignal): Promise<string | undefined> {
  return new Promise((resolve) => {
    const abandon = () => {
      socket.terminate();
      resolve("client went away during the handshake");
    };
    clientGone.addEventListener("abort", abandon, { once: true });
    socket.onopen = () => {
      clientGone.removeEventListener("abort", abandon);
      resolve(undefined);
    };
    socket.onerror = (event) => {
      clientGone.removeEventListener("abort", abandon);
      // The message may leave out the cause ("Failed to connect"); the error's code (ECONNREFUSED) names it.
      const { message, error } = event as ErrorEvent & { error?: { code?: string } };
      const code = error?.code;
      resolve(`${message || "connection failed"}${code && !message?.includes(code) ? ` (${code})` : ""}`);
    };
  });
}

/**
 * Bun's WebSocket client reports a refused handshake only as "Expected 101
 * status code: 302" (no headers, no body). A redirect is useless without
 * its Location (Azure answers 302 on `*.cognitiveservices.azure.com`
 * upgrades) and a 429 without its Retry-After, so the refusal is asked
 * once more as a plain GET of the same target with the same headers, never
 * followed: when it gets the same status, the client gets that answer
 * (status, headers, body); otherwise the status with a body naming it.
 */
async function refusedHandshake(req: Request, handshake: UpstreamHandshake, failure: string, route: Route, counted: (status: number) => void): Promise<Response> {
  const metrics = route.metrics;
  if (req.signal.aborted) {
    counted(499);
    return new Response(null, { status: 499 });
  }
  const status = refusalStatus(failure);
  if (status !== undefined) {
    if (status === 401) route.tokens.refreshAfterUnauthorized();
    metrics.websocketSessionsTotal.refused += 1;
    const refusal = (await upstreamRefusal(handshake, status, req.signal)) ??
      proxyError(status, "upstream_refused_websocket", `the upstream refused the WebSocket handshake with HTTP ${status}`);
    counted(status);
    return refusal;
  }
  const reason = failure.replace(/^WebSocket connection to '[^']*' failed: /, "");
  log("warn", "upstream unreachable", { upstream: handshake.origin, error: reason });
  metrics.websocketSessionsTotal.failed += 1;
  metrics.upstreamErrors[upstreamErrorReason({ message: reason }, false)] += 1;
  counted(502);
  return proxyError(502, "upstream_unreachable", `auth-proxy could not open a WebSocket to ${handshake.origin}: ${reason}`);
}

/** How long the refusal's second asking may take, and how much of its body is passed on. */
const REFUSAL_TIMEOUT_MS = 5 * SECOND;

const MAX_REFUSAL_BODY_BYTES = 64 * 1024;

/** What the upstream handshake asked for: the backend's URL for the target (credential parameters removed) and the headers with the bearer token. */
interface UpstreamHandshake {
  url: string;
  headers: Headers;
  origin: string;
}

/** The upstream's own answer to the refused handshake's target as a plain GET, when it is the same refusal. */
async function upstreamRefusal(handshake: UpstreamHandshake, status: number, clientGone: AbortSignal): Promise<Response | undefined> {
  try {
    const response = await fetch(handshake.url, {
      headers: handshake.headers,
      // Never followed: the client decides where to go, and the token goes to the upstream's origin only.
      redirect: "manual",
      decompress: false,
      signal: AbortSignal.any([clientGone, AbortSignal.timeout(REFUSAL_TIMEOUT_MS)]),
    });
    if (response.status !== status) {
      void response.body?.cancel().catch(() => {});
      return undefined;
    }
    const body = await readBounded(response, MAX_REFUSAL_BODY_BYTES);
    if (body === undefined) return undefined;
    removeHopByHopHeaders(response.headers);
    response.headers.delete("content-length");
    return new Response(body, { status, headers: response.headers });
  } catch {
    return undefined;
  }
}

export function clientOpened(client: ServerWebSocket<RelaySession>): void {
  const session = client.data;
  session.client = client;
  for (const frame of session.queued) client.send(frame);
  session.queued = [];
  if (session.closedBy === "upstream") closeClient(client, session.closeCode, session.closeReason);
}

/** Upstream to client: when the client's socket backs up, stop reading the upstream until Bun calls `drain`. */
function relayToClient(session: RelaySession, frame: Frame): void {
  session.framesFromUpstream += 1;
  session.bytesFromUpstream += frameBytes(frame);
  if (TOKENS_COUNTED && typeof frame === "string") noteRealtimeEvent(session, frame);
  const client = session.client;
  if (client === undefined) {
    session.queued.push(frame);
    return;
  }
  const sent = client.send(frame);
  if (sent === -1) session.upstream.pause();
  else if (sent === 0 && client.readyState === 1) closeBoth(session, 1011, "client is not reading");
}

export function clientDrained(client: ServerWebSocket<RelaySession>): void {
  client.data.upstream.resume();
}

/**
 * Client to upstream. Bun's client WebSocket has no drain event, so when
 * its unsent bytes pass the high mark the client is paused and the buffer
 * polled until it falls below the low mark.
 */
export function relayToUpstream(client: ServerWebSocket<RelaySession>, frame: Frame): void {
  const session = client.data;
  session.framesFromClient += 1;
  session.bytesFromClient += frameBytes(frame);
  const upstream = session.upstream;
  upstream.send(frame);
  if (upstream.bufferedAmount > UPSTREAM_HIGH_WATER_BYTES && session.resumePoll === undefined) {
    client.pause();
    session.resumePoll = setInterval(() => {
      if (upstream.bufferedAmount > UPSTREAM_LOW_WATER_BYTES && upstream.readyState === WebSocket.OPEN) return;
      clearInterval(session.resumePoll);
      session.resumePoll = undefined;
      client.resume();
    }, UPSTREAM_DRAIN_POLL_MS);
  }
}

export function clientClosed(client: ServerWebSocket<RelaySession>, code: number, reason: string, relay: Relay): void {
  const session = client.data;
  if (session.closedBy === undefined) {
    session.closedBy = "client";
    session.closeCode = code;
    session.closeReason = reason;
    if (upstreamOpen(session.upstream)) passClose(session.upstream, code, reason, "client connection lost");
  }
  endSession(session, relay);
}

function upstreamClosed(session: RelaySession, code: number, reason: string, relay: Relay): void {
  if (session.closedBy === undefined) {
    session.closedBy = "upstream";
    session.closeCode = code;
    session.closeReason = reason;
    if (session.client !== undefined) closeClient(session.client, code, reason);
  }
  // Before the client's upgrade completed there is no session to end; clientOpened passes the close on.
  if (session.client !== undefined) endSession(session, relay);
}

function closeClient(client: ServerWebSocket<RelaySession>, code: number, reason: string): void {
  if (client.readyState === 1) passClose(client, code, reason, "upstream connection lost");
}

/** A close passed to the other side as received; an abrupt drop (1006) becomes 1011: something went wrong, not a normal end. */
function passClose(socket: { close(code?: number, reason?: string): void }, code: number, reason: string, lost: string): void {
  if (isSendableCloseCode(code)) socket.close(code, reason);
  else if (code === 1005) socket.close();
  else socket.close(1011, lost);
}

function upstreamOpen(upstream: WebSocket): boolean {
  return upstream.readyState === WebSocket.OPEN || upstream.readyState === WebSocket.CONNECTING;
}

/** The proxy ends a session itself: shutdown (1001) or a client that stopped reading (1011). */
export function closeBoth(session: RelaySession, code: number, reason: string): void {
  if (session.closedBy === undefined) {
    session.closedBy = "proxy";
    session.closeCode = code;
    session.closeReason = reason;
  }
  if (session.client !== undefined) closeClient(session.client, code, reason);
  if (upstreamOpen(session.upstream)) session.upstream.close(code, reason);
}

/** One line per session, written when it ends, and the drain told when the last one has. */
function endSession(session: RelaySession, relay: Relay): void {
  if (session.ended) return;
  session.ended = true;
  clearInterval(session.resumePoll);
  relay.sessions.delete(session);
  relay.metrics.websocketSessionsTotal.completed += 1;
  log("info", "websocket session", {
    path: session.path,
    caller: session.figures.caller,
    upstream_status: 101,
    closed_by: session.closedBy,
    close_code: session.closeCode,
    close_reason: session.closeReason || undefined,
    duration_ms: Math.round(performance.now() - session.startedAt),
    frames_from_client: session.framesFromClient,
    bytes_from_client: session.bytesFromClient,
    frames_from_upstream: session.framesFromUpstream,
    bytes_from_upstream: session.bytesFromUpstream,
    ...sessionUsageFields(session),
  });
  if (relay.sessions.size === 0) relay.onIdle?.();
}
