/**
 * The route table, resolved once at start from the configuration: each
 * route's prefix, strip length, its scope's tokens (given by the entry),
 * its backends as records of numbers, and matching a target to its route.
 *
 * Imports: config, metrics.
 */
import { type Config, type Environment, outboundProxyFor } from "./config.ts";
import { type Metrics, type RateLimitsSeen } from "./metrics.ts";

/**
 * A route as the hot path reads it, resolved once at start from its
 * RouteConfig: which targets it takes, its scope's token manager and its
 * backend. API_BASE_URL is the one route `/` with one backend.
 */
/**
 * What a route asks of its scope's token manager (the core's refresh loop
 * around MSAL, which the entry gives buildRoutes): the current token as
 * plain state, and what to say when there is none.
 */
export interface ScopeTokens {
  scope: string;
  usable(nowMs: number): { authorization: string } | undefined;
  retryAfterSeconds(nowMs: number): number;
  unavailableReason(): string;
  refreshAfterUnauthorized(): void;
}

export interface Route<Tokens extends ScopeTokens = ScopeTokens> {
  /** As configured (`/`, `/search`): the route's name in logs. */
  prefix: string;
  /** What a target starts with to be this route's: the prefix, or "" for `/`. */
  match: string;
  /** How many characters of the target are cut before it is appended to the backend's URL (strip_prefix). */
  stripLength: number;
  tokens: Tokens;
  /** By priority, lowest first. */
  backends: Backend[];
  metrics: Metrics;
  /** With a routes file, the access line names the route. */
  named: boolean;
  /** Several backends: requests fail over, and logs and metrics name the backend. */
  pooled: boolean;
  /** Requests moved on to another backend, by why. */
  failovers: Record<FailoverReason, number>;
}

/**
 * A backend as the pool reads it: its address and a record of numbers, as
 * nginx keeps its peers (ngx_http_upstream_round_robin.c: weight,
 * current_weight, fails, checked).
 */
export interface Backend {
  /** Its place in the route's list: the bit of a request's tried mask. */
  index: number;
  /** The backend's URL without trailing slash: the forwarded path is appended. */
  url: string;
  /** The same URL as ws: or wss:, for WebSocket upgrades. */
  websocketBaseUrl: string;
  /** The outbound proxy WebSocket connections take, per HTTPS_PROXY/NO_PROXY. */
  websocketProxy: string | undefined;
  origin: string;
  name: string;
  priority: number;
  weight: number;
  /** Smooth weighted round-robin's running weight. */
  currentWeight: number;
  /** Date.now() until which it rests (skipped); in the past while it serves. */
  restsUntil: number;
  /** Why it rests: throttled (429), server_error (5xx in a row) or unreachable. */
  restReason: FailoverReason | undefined;
  restTimer: ReturnType<typeof setTimeout> | undefined;
  /** 5xx answers in a row. */
  serverErrors: number;
  /** `/openai/deployments/<from>/` renamed for this backend; undefined when none is. */
  deployments: Map<string, string> | undefined;
  /** Its answers by status, for /metrics. */
  codes: Map<number, number>;
  /** x-ratelimit-remaining-* last seen, by deployment label, for /metrics. */
  rateLimits: Map<string, RateLimitsSeen>;
  /** A connect not done within this is a connection failure. */
  connectTimeoutMs: number;
  /** Where a connect check goes: the backend, or the outbound proxy its requests take. */
  connectAddress: ConnectAddress;
  /** Date.now() of its last answer or connect check that connected. */
  reachedAt: number;
  /** The connect check under way, which every request to it waits on meanwhile. */
  connectCheck: Promise<ConnectCheck> | undefined;
}

/**
 * The route table: one token manager per distinct scope (all from the one
 * identity), routes longest prefix first so the first that matches is the
 * longest.
 */
export function buildRoutes<Tokens extends ScopeTokens>(config: Pick<Config, "routes" | "routesFile">, tokensFor: (scope: string, labelled: boolean) => Tokens, metrics: Metrics, env: Environment): Route<Tokens>[] {
  const managers = new Map<string, Tokens>();
  const named = config.routesFile !== undefined;
  return config.routes
    .map((route) => {
      const tokens = managers.get(route.scope) ?? tokensFor(route.scope, named);
      managers.set(route.scope, tokens);
      const match = route.prefix === "/" ? "" : route.prefix;
      const byPriority = [...route.backends].sort((a, b) => a.priority - b.priority);
      return {
        prefix: route.prefix,
        match,
        stripLength: route.stripPrefix ? match.length : 0,
        tokens,
        backends: byPriority.map((backend, index) => ({
          index,
          url: backend.url,
          websocketBaseUrl: websocketBaseUrl(backend.url),
          websocketProxy: outboundProxyFor(backend.url, env),
          origin: backend.origin,
          name: backend.name,
          priority: backend.priority,
          weight: backend.weight,
          currentWeight: 0,
          restsUntil: 0,
          restReason: undefined,
          restTimer: undefined,
          serverErrors: 0,
          deployments: Object.keys(backend.deployments).length === 0 ? undefined : new Map(Object.entries(backend.deployments)),
          codes: new Map(),
          rateLimits: new Map(),
          connectTimeoutMs: backend.connectTimeoutMs,
          connectAddress: connectAddress(backend.url, outboundProxyFor(backend.url, env)),
          reachedAt: 0,
          connectCheck: undefined,
        })),
        metrics,
        named,
        pooled: route.backends.length > 1,
        failovers: { throttled: 0, server_error: 0, unreachable: 0 },
      };
    })
    .sort((a, b) => b.match.length - a.match.length);
}

/**
 * The longest prefix that matches the target on a segment boundary
 * (`/search` takes `/search` and `/search/x`, never `/searching`). A
 * fragment has no place in a request target (RFC 9112 section 3.2) and
 * fetch drops it: a target holding one is routed by the path before it,
 * never to another route's backends with that route's token.
 */
export function matchRoute<R extends Pick<Route, "match">>(routes: R[], target: string): R | undefined {
  for (const route of routes) {
    const end = route.match.length;
    if (!target.startsWith(route.match)) continue;
    const next = target.charCodeAt(end);
    if (end === target.length || next === 47 /* "/" */ || next === 63 /* "?" */ || next === 35 /* "#" */) return route;
  }
  return undefined;
}

export type FailoverReason = "throttled" | "server_error" | "unreachable";

/** Where a connect check connects: the backend's host and port (with its TLS handshake), or the outbound proxy's. */
export interface ConnectAddress {
  hostname: string;
  port: number;
  tls: boolean;
}

export type ConnectCheck = "connected" | "timed_out" | "failed";

export function connectAddress(url: string, outboundProxy: string | undefined): ConnectAddress {
  const target = new URL(outboundProxy ?? url);
  const https = target.protocol === "https:";
  return { hostname: target.hostname.replace(/^\[|\]$/g, ""), port: Number(target.port) || (https ? 443 : 80), tls: https && outboundProxy === undefined };
}

/** The distinct token managers of a route table, in the order of their first route. */
export function tokenManagers<Tokens extends ScopeTokens>(routes: Route<Tokens>[]): Tokens[] {
  return [...new Set(routes.map((route) => route.tokens))];
}

/** The target as its route's backend gets it: the prefix cut unless strip_prefix is false; the rest byte for byte. */
export function forwardedPath(route: Route, target: string): string {
  return route.stripLength === 0 ? target : target.slice(route.stripLength);
}

/** `ws:`/`wss:` from API_BASE_URL's scheme, with the same prefix rule as HTTP forwarding. */
export function websocketBaseUrl(apiBaseUrl: string): string {
  return apiBaseUrl.startsWith("https:") ? `wss:${apiBaseUrl.slice(6)}` : `ws:${apiBaseUrl.slice(5)}`;
}
