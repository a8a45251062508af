/**
 * Reload without a restart: the routes file and the callers file are read
 * again when their content changes (polled, through symlinks, so a
 * ConfigMap's `..data` swap is seen: Bun's file watching misses symlink
 * swaps, oven-sh/bun#43064) and on SIGHUP. A new file is checked whole
 * before it is used; the tables it builds replace the old ones at once, so
 * a request keeps what it started with. What a backend or a scope has
 * learned (rests, weights, answers, tokens) carries over by URL and scope.
 *
 * Imports: log, config, metrics, routes, callers.
 */
import { log, SECOND } from "./log.ts";
import { type Config, configurationWarnings, type Environment, parseRoutes, readConfigFile } from "./config.ts";
import { type Metrics } from "./metrics.ts";
import { buildRoutes, type Route, type ScopeTokens } from "./routes.ts";
import { type CallerEntry, checkedCallers } from "./callers.ts";

/** How often the files are read for a change: a ConfigMap update reaches the pod within a minute; 2 s more is nothing, one read is cheap. */
export const CONFIG_POLL_MS = 2 * SECOND;

export type ConfigFile = "routes" | "callers";

/** Each file's reloads by result, for `auth_proxy_config_reloads_total{file,result}`. */
export type ReloadCounts = Record<ConfigFile, { success: number; failure: number }>;

export function newReloadCounts(): ReloadCounts {
  return { routes: { success: 0, failure: 0 }, callers: { success: 0, failure: 0 } };
}

/** A file's text as last used: a change is a different text, whatever the file's times or inode say. */
export interface WatchedFile {
  file: ConfigFile;
  path: string;
  /** The variable or flag that named it, for messages. */
  source: string;
  text: string | undefined;
  /** The last text (or fault) refused, so a bad file is logged once, not every poll. */
  rejected?: string;
}

/** The file's text now, or why it cannot be read. */
export function readWatched(watched: WatchedFile): { text: string } | { fault: string } {
  return readConfigFile(watched.path, watched.source);
}

/**
 * The routes a new routes file builds, or every fault in it. Each scope
 * already held keeps its token manager (`tokensFor` finds it); each backend
 * whose route and URL were there before keeps its rest, its weight, its
 * counts and when it last answered, so a reload never wakes a resting
 * region or forgets a throttle.
 */
export function reloadedRoutes<Tokens extends ScopeTokens>(
  text: string,
  watched: WatchedFile,
  config: Config,
  current: Route<Tokens>[],
  tokensFor: (scope: string, labelled: boolean) => Tokens,
  metrics: Metrics,
  env: Environment,
): { routes: Route<Tokens>[]; warnings: string[] } | { faults: string[] } {
  const { routes: parsed, faults } = parseRoutes(text, config.scope, config.defaultConnectTimeoutMs);
  if (faults.length > 0) return { faults: faults.map((fault) => `${watched.source}=${watched.path}: ${fault}`) };
  const routes = buildRoutes({ routes: parsed, routesFile: config.routesFile }, tokensFor, metrics, env);
  for (const route of routes) {
    const before = current.find((old) => old.prefix === route.prefix);
    if (before === undefined) continue;
    route.failovers = before.failovers;
    for (const backend of route.backends) {
      const known = before.backends.find((old) => old.url === backend.url);
      if (known === undefined) continue;
      backend.restsUntil = known.restsUntil;
      backend.restReason = known.restReason;
      backend.serverErrors = known.serverErrors;
      backend.currentWeight = known.currentWeight;
      backend.codes = known.codes;
      backend.rateLimits = known.rateLimits;
      backend.reachedAt = known.reachedAt;
    }
  }
  return { routes, warnings: configurationWarnings({ ...config, routes: parsed }) };
}

/** The callers a new callers file names, or every fault in it, checked as at start. */
export function reloadedCallers(text: string, watched: WatchedFile, config: Config, env: Environment): { callers: CallerEntry[] } | { faults: string[] } {
  return checkedCallers(text, watched.source, watched.path, config, env);
}

/**
 * Each file whose text changed (every one, `always`: SIGHUP) is read and
 * handed to `apply`, which swaps in what it builds or returns its faults;
 * a bad file is logged once with every fault and the last good one kept.
 */
export function reloadFiles(
  files: WatchedFile[],
  counts: ReloadCounts,
  trigger: string,
  always: boolean,
  apply: (watched: WatchedFile, text: string) => string[] | undefined,
  describe: (watched: WatchedFile) => Record<string, unknown>,
): void {
  for (const watched of files) {
    const read = readWatched(watched);
    const text = "text" in read ? read.text : undefined;
    const fault = "fault" in read ? read.fault : undefined;
    if (!always && (text === watched.text || (text ?? fault) === watched.rejected)) continue;
    const faults = text === undefined ? [fault!] : apply(watched, text);
    if (faults === undefined) {
      watched.text = text;
      watched.rejected = undefined;
      counts[watched.file].success += 1;
      log("info", "configuration reloaded", { file: watched.path, trigger, ...describe(watched) });
    } else {
      watched.rejected = text ?? fault;
      counts[watched.file].failure += 1;
      log("error", "configuration reload failed; the last good one keeps serving", { file: watched.path, trigger, faults });
    }
  }
}
