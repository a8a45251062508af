/**
 * Callers: who is calling, by name. The callers file (AUTH_PROXY_CALLERS)
 * names each with its keys or its Entra ID app, and the paths it may use;
 * PROXY_API_KEYS(_FILE) keys are callers labelled by their hash;
 * AUTH_PROXY_CALLER names the app behind a sidecar. Where a caller presents
 * its credential, and the 401/403 refusals.
 *
 * Imports: log, config, metrics, caller-tokens, limits.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { statSync } from "node:fs";
import { errorMessage, log, pathOf, SECOND } from "./log.ts";
import { type Config, isMapping, parseConfigText, readCallerKeysFile, readConfigFile, unknownKeys } from "./config.ts";
import { callerSeries, deploymentLabel, endsPathSegment, type Metrics, type RequestSeries, requestSeries, type SeriesSet } from "./metrics.ts";
import { CallerTokens, looksLikeJwt, type TokenVerdict } from "./caller-tokens.ts";
import { type CallerLimits, type LimitedCaller, type Limiter, parseLimits } from "./limits.ts";

/**
 * Credentials a WebSocket client may carry where a browser lets it: the
 * openai SDK's browser client sends `api-key` (or `Authorization`) as a
 * query parameter and OpenAI keys as an `openai-insecure-api-key.<key>`
 * subprotocol. The proxy's bearer token replaces them; they never reach the upstream.
 */
export const CREDENTIAL_QUERY_PARAMETERS = ["api-key", "authorization"];

export const INSECURE_KEY_SUBPROTOCOL = "openai-insecure-api-key.";

/** Kubernetes updates a mounted Secret within a minute or two; a second's polling costs one stat. */
export const CALLER_KEYS_FILE_POLL_MS = SECOND;

/** A caller as requests meet it: its label, where it may go, and its series. */
export interface Caller {
  /** Its label in metrics and log lines: the file's name, or a key's hash prefix. */
  name: string;
  /** The path prefixes it may use (on a segment boundary); undefined: every route. */
  paths: string[] | undefined;
  figures: SeriesSet;
  /** Its limits, counted by the limiter that outlives reloads; undefined: none. */
  limited: LimitedCaller | undefined;
}

/** Why a request is refused before forwarding: 401 (who is it?) or 403 (not here). */
export interface Refusal {
  status: 401 | 403;
  code: "missing_credentials" | "invalid_api_key" | "invalid_token" | "route_not_allowed";
  message: string;
  /** The series it is counted under: the caller's when known, else `unknown`'s. */
  figures: SeriesSet;
}

export const CALLER_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** One entry of the callers file, checked. */
export interface CallerEntry {
  name: string;
  /** SHA-256 digests of its keys. */
  keys: Buffer[];
  entra: { tenant: string; appIds: string[]; objectIds: string[] } | undefined;
  paths: string[] | undefined;
  limits: CallerLimits | undefined;
}

const CALLER_KEYS = ["name", "keys", "entra", "routes", "limits"];

/**
 * The callers file (YAML or JSON): every fault found, by place
 * (`callers[1].keys[0]`), as the routes file is read. A key is its SHA-256
 * (`sha256:<64 hex>`, what a ConfigMap may carry), `${VARIABLE}`, or the key.
 */
export function parseCallers(text: string, env: Record<string, string | undefined>): { callers: CallerEntry[]; faults: string[] } {
  const faults: string[] = [];
  const parsed = parseConfigText(text);
  if ("fault" in parsed) return { callers: [], faults: [parsed.fault] };
  const entries = (parsed.document as { callers?: unknown } | null)?.callers;
  if (!Array.isArray(entries) || entries.length === 0) return { callers: [], faults: ["must hold `callers:`, a list of callers, each with a name and keys or entra"] };
  const callers: CallerEntry[] = [];
  const names = new Set<string>();
  const digests = new Map<string, string>();
  entries.forEach((entry: unknown, index: number) => {
    const place = `callers[${index}]`;
    if (!isMapping(entry)) return void faults.push(`${place} must be a mapping with name and keys or entra`);
    const fields = entry;
    unknownKeys(fields, CALLER_KEYS, place, faults);
    const name = fields.name;
    if (typeof name !== "string" || !CALLER_NAME.test(name)) faults.push(`${place}.name must be lower-case letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63`);
    else if (names.has(name)) faults.push(`${place}.name ${name} is another caller's name too`);
    else names.add(name);
    const keys: Buffer[] = [];
    if (fields.keys !== undefined && !Array.isArray(fields.keys)) faults.push(`${place}.keys must be a list of keys`);
    (Array.isArray(fields.keys) ? fields.keys : []).forEach((key: unknown, keyIndex: number) => {
      const digest = keyDigest(key, `${place}.keys[${keyIndex}]`, env, faults);
      if (digest === undefined) return;
      const hex = digest.toString("hex");
      if (digests.has(hex)) faults.push(`${place}.keys[${keyIndex}] is ${digests.get(hex)}'s key too: a key names one caller`);
      digests.set(hex, place);
      keys.push(digest);
    });
    const entra = entraRule(fields.entra, `${place}.entra`, faults);
    const paths = pathPrefixes(fields.routes, `${place}.routes`, faults);
    const limits = parseLimits(fields.limits, `${place}.limits`, faults);
    if (typeof name === "string") callers.push({ name, keys, entra, paths, limits });
  });
  return { callers, faults };
}

function keyDigest(key: unknown, place: string, env: Record<string, string | undefined>, faults: string[]): Buffer | undefined {
  if (typeof key !== "string" || key.trim() === "") return void faults.push(`${place} must be a key, sha256:<64 hex digits>, or \${VARIABLE}`);
  const hashed = /^sha256:([0-9a-f]{64})$/i.exec(key);
  if (hashed) return Buffer.from(hashed[1]!, "hex");
  if (/^sha256:/i.test(key)) return void faults.push(`${place} starts with sha256: but is not 64 hex digits`);
  const variable = /^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$/.exec(key);
  if (variable) {
    const value = env[variable[1]!]?.trim();
    if (!value) return void faults.push(`${place} names \${${variable[1]}}, which is not set`);
    return digestOf(value);
  }
  return digestOf(key.trim());
}

function entraRule(value: unknown, place: string, faults: string[]): CallerEntry["entra"] {
  if (value === undefined) return undefined;
  const fields = isMapping(value) ? value : {};
  unknownKeys(fields, ["tenant", "app_ids", "object_ids"], place, faults);
  const guids = (key: string) => {
    const list = fields[key] ?? [];
    if (!Array.isArray(list) || !list.every((id) => typeof id === "string" && GUID.test(id))) return void faults.push(`${place}.${key} must be a list of GUIDs`);
    return (list as string[]).map((id) => id.toLowerCase());
  };
  const tenant = typeof fields.tenant === "string" && GUID.test(fields.tenant) ? fields.tenant.toLowerCase() : undefined;
  if (tenant === undefined) faults.push(`${place}.tenant must be the callers' tenant ID (a GUID)`);
  const appIds = guids("app_ids");
  const objectIds = guids("object_ids");
  if (appIds !== undefined && objectIds !== undefined && appIds.length + objectIds.length === 0) faults.push(`${place} must list app_ids (appid/azp) or object_ids (oid)`);
  return tenant === undefined || appIds === undefined || objectIds === undefined ? undefined : { tenant, appIds, objectIds };
}

function pathPrefixes(value: unknown, place: string, faults: string[]): string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || value.length === 0 || !value.every((prefix) => typeof prefix === "string" && /^\/[^\s?#]*$/.test(prefix))) {
    return void faults.push(`${place} must list path prefixes starting with /, e.g. [/search, /openai/deployments/gpt-4o]`);
  }
  // `/` is every path; a trailing slash is the prefix's own boundary.
  return (value as string[]).map((prefix) => (prefix === "/" ? "" : prefix.replace(/\/$/, "")));
}

/**
 * Who is calling: a key (compared as SHA-256 digests with timingSafeEqual,
 * against every caller's keys without stopping at a match, so the time is
 * the same whatever was presented), an Entra ID token (src/caller-tokens.ts),
 * or, behind a sidecar, the one app AUTH_PROXY_CALLER names.
 */
export class Callers {
  private keys: { digest: Buffer; caller: Caller }[] = [];
  private readonly unknown: SeriesSet;
  /** PROXY_API_KEYS_FILE, polled for a change; its stamp when last read. */
  private keysFile: string | undefined;
  private fileStamp = "";
  private readonly callerNames: string[];
  private readonly tokens: CallerTokens<Caller> | undefined;
  private readonly sidecar: Caller | undefined;
  /** PROXY_API_KEYS alone answers as it always has: invalid_api_key, missing or wrong. */
  private keysOnly = false;

  constructor(
    private readonly metrics: Metrics,
    entries: CallerEntry[],
    options: { audience?: string; authorityHost: string; sidecarCaller?: string; keysFile?: string; limiter?: Limiter },
  ) {
    this.unknown = callerSeries(metrics, "unknown");
    this.callerNames = entries.map((entry) => entry.name);
    const limited = (entry: CallerEntry) => (entry.limits === undefined || options.limiter === undefined ? undefined : options.limiter.callerFor(entry.name, entry.limits));
    const callers = entries.map((entry) => ({ entry, caller: { name: entry.name, paths: entry.paths, figures: callerSeries(metrics, entry.name), limited: limited(entry) } }));
    this.keys = callers.flatMap(({ entry, caller }) => entry.keys.map((digest) => ({ digest, caller })));
    const rules = callers.flatMap(({ entry, caller }) => (entry.entra === undefined ? [] : [{ ...entry.entra, caller }]));
    this.tokens = rules.length === 0 ? undefined : new CallerTokens(rules, options.audience!, options.authorityHost);
    this.sidecar = options.sidecarCaller === undefined ? undefined : (callers.find(({ caller }) => caller.name === options.sidecarCaller)?.caller ?? { name: options.sidecarCaller, paths: undefined, figures: callerSeries(metrics, options.sidecarCaller), limited: undefined });
    if (options.keysFile !== undefined) {
      this.keysFile = options.keysFile;
      this.fileStamp = fileStampOf(options.keysFile);
    }
  }

  /** PROXY_API_KEYS(_FILE): each key an unnamed caller, labelled by the first 8 hex digits of its SHA-256. */
  static fromKeys(metrics: Metrics, keys: string[], authorityHost: string, keysFile?: string): Callers {
    const callers = new Callers(metrics, keyCallers(keys), { authorityHost, keysFile });
    callers.keysOnly = true;
    return callers;
  }

  start(): void {
    this.tokens?.start();
  }

  /** The callers' names, for log lines. */
  names(): string[] {
    return this.callerNames;
  }

  /** The series of a request refused before anyone could be identified (405, 503 while draining). */
  unknownSeries(method: string, target: string): RequestSeries {
    return requestSeries(this.metrics, method, deploymentLabel(this.metrics, target), this.unknown);
  }

  /** The caller of a request, or why it is refused; a promise only while an Entra tenant's keys are being fetched. */
  identify(headers: Headers, target: string, nowMs: number): Caller | Refusal | Promise<Caller | Refusal> {
    const caller = this.sidecar ?? this.presented(headers, target, nowMs);
    if (caller instanceof Promise) return caller.then((found) => this.admitted(found, target));
    return this.admitted(caller, target);
  }

  private presented(headers: Headers, target: string, nowMs: number): Caller | Refusal | Promise<Caller | Refusal> {
    // An Entra caller's token wins over a placeholder api-key its SDK may also send.
    const bearer = this.tokens === undefined ? null : headers.get("authorization");
    if (bearer !== null && /^bearer\s+eyJ/i.test(bearer)) return this.fromToken(bearer.slice(7).trim(), nowMs);
    const credential = presentedCallerKey(headers, target);
    if (this.keysOnly) {
      const caller = credential ? this.keyCaller(credential) : undefined;
      return caller ?? this.refusal(401, "invalid_api_key", "auth-proxy requires a valid caller key (PROXY_API_KEYS) in the api-key header or as Authorization: Bearer <key>");
    }
    if (credential === undefined || credential === "") {
      const how = this.tokens === undefined ? "a key (api-key header or Authorization: Bearer <key>)" : `a key (api-key header) or an Entra ID token for ${this.tokens.audience} (Authorization: Bearer <token>)`;
      return this.refusal(401, "missing_credentials", `auth-proxy requires a caller credential: ${how}`);
    }
    if (this.tokens !== undefined && looksLikeJwt(credential)) return this.fromToken(credential, nowMs);
    return this.keyCaller(credential) ?? this.refusal(401, "invalid_api_key", "auth-proxy does not know the key presented (api-key or Authorization: Bearer)");
  }

  private keyCaller(credential: string): Caller | undefined {
    Bun.SHA256.hash(credential, presentedDigest);
    let match: Caller | undefined;
    for (const known of this.keys) if (timingSafeEqual(presentedDigest, known.digest)) match = known.caller;
    return match;
  }

  /** A token's caller: verified once, then known by its signature until it expires (src/caller-tokens.ts). */
  private fromToken(token: string, nowMs: number): Caller | Refusal | Promise<Caller | Refusal> {
    const verdict = this.tokens!.verify(token, nowMs);
    return verdict instanceof Promise ? verdict.then((settled) => this.fromVerdict(settled)) : this.fromVerdict(verdict);
  }

  private fromVerdict(verdict: TokenVerdict<Caller>): Caller | Refusal {
    return "caller" in verdict ? verdict.caller : this.refusal(401, "invalid_token", `auth-proxy refused the Entra ID token: ${verdict.refused}`);
  }

  private admitted(found: Caller | Refusal, target: string): Caller | Refusal {
    if ("code" in found || found.paths === undefined) return found;
    for (const prefix of found.paths) if (target.startsWith(prefix) && endsPathSegment(target, prefix.length)) return found;
    return this.refusal(403, "route_not_allowed", `caller ${found.name} may not use ${pathOf(target)}`, found.figures);
  }

  private refusal(status: Refusal["status"], code: Refusal["code"], message: string, figures = this.unknown): Refusal {
    return { status, code, message, figures };
  }

  /** PROXY_API_KEYS_FILE changed (a Secret update swaps a symlink: new inode): re-read; a broken one is logged and the last keys kept. */
  reloadIfChanged(): void {
    if (this.keysFile === undefined) return;
    const stamp = fileStampOf(this.keysFile);
    if (stamp === this.fileStamp) return;
    this.fileStamp = stamp;
    try {
      const keys = readCallerKeysFile(this.keysFile);
      this.keys = keyCallers(keys).map((entry) => ({ digest: entry.keys[0]!, caller: { name: entry.name, paths: undefined, figures: callerSeries(this.metrics, entry.name), limited: undefined } }));
      log("info", "caller keys reloaded", { file: this.keysFile, keys: keys.length });
    } catch (error) {
      log("error", "caller keys file unusable; keeping the last good keys", { error: errorMessage(error), keys: this.keys.length });
    }
  }
}

/** PROXY_API_KEYS' keys as callers: the label is the first 8 hex digits of the key's SHA-256, never the key. */
function keyCallers(keys: string[]): CallerEntry[] {
  return keys.map((key) => {
    const digest = digestOf(key);
    return { name: digest.toString("hex").slice(0, 8), keys: [digest], entra: undefined, paths: undefined, limits: undefined };
  });
}

function digestOf(key: string): Buffer {
  return createHash("sha256").update(key).digest();
}

/** The presented key's digest, made in place: Bun's one-shot SHA-256 took 0.07 µs where createHash took 0.38 (measured). */
const presentedDigest = Buffer.alloc(32);

function fileStampOf(file: string): string {
  try {
    const stat = statSync(file);
    return `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
  } catch {
    return "missing";
  }
}

/**
 * A callers file's entries, or every fault: its own, each naming the file
 * and the place, and what only the whole configuration shows (an Entra
 * caller without AUTH_PROXY_AUDIENCE, an AUTH_PROXY_CALLER it does not
 * name). At start and at every reload alike.
 */
export function checkedCallers(text: string, source: string, path: string, config: Pick<Config, "audience" | "callerName">, env: Record<string, string | undefined>): { callers: CallerEntry[] } | { faults: string[] } {
  const { callers, faults } = parseCallers(text, env);
  const problems = faults.map((fault) => `${source}=${path}: ${fault}`);
  if (callers.some((entry) => entry.entra !== undefined) && config.audience === undefined) {
    problems.push(`${source}=${path} has entra callers: set AUTH_PROXY_AUDIENCE to the proxy's app ID URI or client ID, the audience their tokens are for`);
  }
  if (config.callerName !== undefined && !callers.some((entry) => entry.name === config.callerName)) problems.push(`AUTH_PROXY_CALLER=${config.callerName} is no caller of ${path}`);
  return problems.length > 0 ? { faults: problems } : { callers };
}

/** A request asking to become a WebSocket (RFC 6455 section 4.1): relayed, and allowed to carry its key where browsers put it. */
export function isWebSocketUpgrade(headers: Headers): boolean {
  const upgrade = headers.get("upgrade");
  return upgrade !== null && upgrade.toLowerCase().includes("websocket");
}

/**
 * The key a caller presented: `api-key`, else `Authorization: Bearer`; for a
 * WebSocket upgrade also where browsers put it (the `api-key` query
 * parameter, an `openai-insecure-api-key.` subprotocol).
 */
export function presentedCallerKey(headers: Headers, target: string): string | undefined {
  const apiKey = headers.get("api-key");
  if (apiKey !== null) return apiKey.trim();
  const authorization = headers.get("authorization");
  if (authorization !== null && /^bearer\s/i.test(authorization)) return authorization.slice(7).trim();
  if (!isWebSocketUpgrade(headers)) return undefined;
  for (const protocol of (headers.get("sec-websocket-protocol") ?? "").split(",")) {
    const trimmed = protocol.trim();
    if (trimmed.startsWith(INSECURE_KEY_SUBPROTOCOL)) return trimmed.slice(INSECURE_KEY_SUBPROTOCOL.length);
  }
  const query = target.indexOf("?") === -1 ? "" : target.slice(target.indexOf("?") + 1);
  return new URLSearchParams(query).get("api-key") ?? undefined;
}

/** The callers a configuration names: its callers file's entries, its keys, or the sidecar's one app; undefined: anyone, unlabelled. */
export function callersFor(config: Config, metrics: Metrics, entries: CallerEntry[] | undefined, limiter?: Limiter): Callers | undefined {
  const options = { audience: config.audience, authorityHost: config.authorityHost, sidecarCaller: config.callerName, limiter };
  limiter?.forgetLimits();
  if (entries !== undefined) return new Callers(metrics, entries, options);
  if (config.callerKeys !== undefined) return Callers.fromKeys(metrics, config.callerKeys.keys, config.authorityHost, "file" in config.callerKeys ? config.callerKeys.file : undefined);
  return config.callerName === undefined ? undefined : new Callers(metrics, [], options);
}

/** The callers file, read and checked before anything listens: every fault at once. */
export function callerEntriesOf(config: Config, source: string): { entries: CallerEntry[] | undefined } | { errors: string[] } {
  if (config.callerName !== undefined && !CALLER_NAME.test(config.callerName)) {
    return { errors: [`AUTH_PROXY_CALLER=${config.callerName} must be lower-case letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63`] };
  }
  if (config.callersFile === undefined) {
    return config.audience === undefined ? { entries: undefined } : { errors: ["AUTH_PROXY_AUDIENCE is set without AUTH_PROXY_CALLERS: only a callers file's entra callers use it"] };
  }
  const read = readConfigFile(config.callersFile, source);
  if ("fault" in read) return { errors: [read.fault] };
  const checked = checkedCallers(read.text, source, config.callersFile, config, process.env);
  return "faults" in checked ? { errors: checked.faults } : { entries: checked.callers };
}
