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
 * The file reads as the journey: configuration (and the routes file) ->
 * credential -> identity -> token manager -> metrics -> caller keys ->
 * routes -> backend pools -> token usage (read from the answers as they
 * pass) -> forwarding -> WebSocket relay -> server and lifecycle -> main.
 */
import arg from "arg";
import { createHash, createPrivateKey, createPublicKey, timingSafeEqual, X509Certificate, type KeyObject } from "node:crypto";
import zlib from "node:zlib";
import { constants as fsConstants, fstatSync, openSync, readdirSync, readFileSync, statSync, writeSync } from "node:fs";
import type { AuthenticationResult, INetworkModule, NetworkResponse } from "@azure/msal-node";
import packageJson from "./package.json" with { type: "json" };

/** Set by `make build` (bun build --define); absent under `bun proxy.ts`. */
declare const AUTH_PROXY_COMMIT: string | undefined;
export const VERSION =
  packageJson.version + (typeof AUTH_PROXY_COMMIT === "string" && AUTH_PROXY_COMMIT ? `+${AUTH_PROXY_COMMIT}` : "");

const SECOND = 1000;
const MINUTE = 60 * SECOND;

// ---------------------------------------------------------------- logging

export type LogLevel = "debug" | "info" | "warn" | "error";
const LOG_LEVEL_RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
let logThreshold = LOG_LEVEL_RANK.info;

/**
 * Log output is encoded into one buffer as it is made and written once per
 * event-loop turn: one write per access line cost about 9 % of throughput
 * at 20,000 requests/s. Access lines are encoded field by field into it,
 * making no string: joined from strings and flattened at the write, a line
 * cost 0.92-1.22 µs of the proxy's thread in place; encoded, 0.62-0.69 µs
 * (bench/RESULTS.md); those of forwarded requests wait for the turn's
 * write (`writeAccessLines`). Exit paths flush what the reader takes.
 *
 * Logging never stops or slows serving: a blocking write to a pipe nobody
 * reads stopped the only thread once the pipe's 64 KiB were full (about
 * 190 access lines), and a closed one (EPIPE) threw out of the write. So a
 * pipe is written without blocking; what it does not take waits in the
 * buffer, and a line that finds the buffer full, or stdout closed, is
 * dropped and counted (`auth_proxy_log_lines_dropped_total`), and said in
 * a warn line once the reader is back.
 */
let logBuffer = Buffer.allocUnsafe(256 * 1024);
let logLength = 0;
let flushScheduled = false;
/**
 * The forwarded requests that ended this turn, their access lines encoded
 * together when the turn's log is written: the turn's responses go out
 * before any line is made, and the lines are made back to back (in place
 * 0.41-0.64 µs a line, against 0.51-0.70 one at a time; bench/RESULTS.md).
 */
const endedExchanges: Exchange[] = [];

/** stdout, or its pipe reopened without blocking (`openLogOutput`). */
let logFd = 1;
/** False once stdout is closed (EPIPE): every line from then on is dropped. */
let logWritable = true;
/** The pipe is full: writes wait for `retryLogWrite` instead of failing once a turn. */
let logWaitingForReader = false;
/** Lines dropped since the start, and since the last warn line that said so. */
let logLinesDropped = 0;
let logLinesDroppedUnreported = 0;
/** How often a full pipe is tried again: the reader's pace, not the proxy's, decides when lines go out. */
const LOG_RETRY_MS = 50;
/** At exit the reader gets this long to take the last lines, however slow it is. */
const LOG_EXIT_WAIT_MS = 1000;

/**
 * A pipe on stdout (containers, Kubernetes, `| jq`) is reopened through
 * /proc with O_NONBLOCK: the new open file description is the proxy's own,
 * so the shell or runtime sharing fd 1 keeps its blocking mode (setting
 * O_NONBLOCK on fd 1 itself would change theirs). A terminal, a file or
 * journald's socket keep fd 1 as it is: they read as fast as lines come.
 */
export function openLogOutput(): void {
  try {
    if (fstatSync(1).isFIFO()) logFd = openSync("/proc/self/fd/1", fsConstants.O_WRONLY | fsConstants.O_NONBLOCK);
  } catch {}
}

/** The turn's write, scheduled by its first line. */
function scheduleFlush(): void {
  if (flushScheduled) return;
  flushScheduled = true;
  setImmediate(flushLog);
}

/** Room for `bytes` more, or false (the line dropped and counted) when stdout is closed or its reader is behind by a whole buffer. */
function reserveLog(bytes: number): boolean {
  if (!logWritable) return dropLine();
  scheduleFlush();
  if (logLength + bytes > logBuffer.length) writeLog();
  if (logLength + bytes <= logBuffer.length) return true;
  if (logLength !== 0) return dropLine();
  // Only a line of hostile length gets here: URLs and headers are bounded by Bun's limits.
  logBuffer = Buffer.allocUnsafe(bytes);
  return true;
}

function dropLine(): false {
  logLinesDropped += 1;
  logLinesDroppedUnreported += 1;
  return false;
}

/** Room for a line written now: the access lines waiting for the turn's write go first, so lines keep their order. */
function reserveLine(bytes: number): boolean {
  if (endedExchanges.length !== 0) writeAccessLines();
  return reserveLog(bytes);
}

function writeLine(line: string): void {
  // UTF-8 takes at most three bytes per UTF-16 code unit.
  if (reserveLine(line.length * 3)) logLength += logBuffer.write(line, logLength);
}

/** Everything logged so far, access lines waiting for the turn's end included, written now (as far as the reader takes it). */
export function flushLog(): void {
  writeAccessLines();
  writeLog();
  flushScheduled = false;
}

/** At exit: the last lines, waiting a bounded time for a slow reader. */
function flushLogAtExit(): void {
  writeAccessLines();
  const deadline = performance.now() + LOG_EXIT_WAIT_MS;
  for (;;) {
    logWaitingForReader = false;
    writeLog();
    if (logLength === 0 || !logWritable || performance.now() > deadline) return;
    Bun.sleepSync(5);
  }
}

function writeLog(): void {
  if (logLength === 0 || logWaitingForReader) return;
  let written = 0;
  try {
    // A pipe may take part of the buffer: the rest follows.
    while (written < logLength) written += writeSync(logFd, logBuffer, written, logLength - written);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "EAGAIN") {
      // The pipe is full: what it did not take stays, a line cut in two included, and goes first when the reader is back.
      logBuffer.copyWithin(0, written, logLength);
      logLength -= written;
      logWaitingForReader = true;
      setTimeout(retryLogWrite, LOG_RETRY_MS).unref();
      return;
    }
    // EPIPE (the reader closed stdout) or worse: nothing written from now on will be read.
    logWritable = false;
    for (let at = written; at < logLength; at += 1) if (logBuffer[at] === 10) dropLine();
    logLength = 0;
    return;
  }
  logLength = 0;
  if (logLinesDroppedUnreported !== 0) reportDroppedLines();
}

function retryLogWrite(): void {
  logWaitingForReader = false;
  writeLog();
}

function reportDroppedLines(): void {
  const dropped = logLinesDroppedUnreported;
  logLinesDroppedUnreported = 0;
  log("warn", "log lines dropped: stdout was not read fast enough", { dropped, dropped_total: logLinesDropped });
}

/** Text known to be ASCII (JSON punctuation, field names) as bytes, for `encodeBytes`. */
export function asciiBytes(text: string): Uint8Array {
  return new Uint8Array(Buffer.from(text, "latin1"));
}

let isoMonotonicMs = -1;
let isoTime = "";

/**
 * The ISO time of `monotonicMs` (a `performance.now()`), formatted once per
 * millisecond however many lines share it: most lines read no clock of
 * their own.
 */
function isoNow(monotonicMs = performance.now()): string {
  const ms = Math.floor(monotonicMs);
  if (ms !== isoMonotonicMs) {
    isoMonotonicMs = ms;
    // The wall clock less the time since `monotonicMs`: a line encoded after its moment keeps that moment's time.
    isoTime = new Date(Date.now() - (performance.now() - monotonicMs)).toISOString();
  }
  return isoTime;
}

/**
 * `bytes` copied into `buffer` at `at`; returns where they end. A loop: the
 * short constants of a log line copy faster in it than through
 * TypedArray.set's native call (0.56-0.62 against 0.63-0.71 µs a line,
 * measured in place).
 */
export function encodeBytes(buffer: Buffer, at: number, bytes: Uint8Array): number {
  for (let i = 0; i < bytes.length; i += 1) buffer[at + i] = bytes[i]!;
  return at + bytes.length;
}

/** A non-negative integer in decimal; returns where it ends. */
export function encodeInteger(buffer: Buffer, at: number, value: number): number {
  let digits = 1;
  for (let rest = value; rest >= 10; rest = (rest - (rest % 10)) / 10) digits += 1;
  for (let digit = at + digits - 1; digit >= at; digit -= 1) {
    buffer[digit] = 48 + (value % 10);
    value = (value - (value % 10)) / 10;
  }
  return at + digits;
}

/** Milliseconds rounded to hundredths, without trailing zeros (12, 12.5, 12.05), by integer arithmetic. */
export function encodeMillis(buffer: Buffer, at: number, ms: number): number {
  const hundredths = Math.round(Math.max(ms, 0) * 100);
  const fraction = hundredths % 100;
  at = encodeInteger(buffer, at, (hundredths - fraction) / 100);
  if (fraction === 0) return at;
  buffer[at++] = 46; // "."
  buffer[at++] = 48 + (fraction - (fraction % 10)) / 10;
  if (fraction % 10 !== 0) buffer[at++] = 48 + (fraction % 10);
  return at;
}

/**
 * The first `end` code units of `text` as a JSON string (RFC 8259 section
 * 7); returns where it ends. Printable ASCII, all a request path ever holds
 * (Bun percent-encodes the rest), goes byte by byte; anything else through
 * JSON.stringify. Needs room for six bytes per code unit.
 */
export function encodeJsonString(buffer: Buffer, at: number, text: string, end: number): number {
  buffer[at] = 34; // '"'
  for (let i = 0; i < end; i += 1) {
    const code = text.charCodeAt(i);
    if (code < 32 || code === 34 || code === 92 || code > 126) return at + buffer.write(JSON.stringify(text.slice(0, end)), at);
    buffer[at + 1 + i] = code;
  }
  buffer[at + 1 + end] = 34;
  return at + end + 2;
}

/** The line being encoded into the log buffer, field by field: `name` is the field's `,"name":` as bytes. */
function putBytes(bytes: Uint8Array): void {
  logLength = encodeBytes(logBuffer, logLength, bytes);
}

function putIntegerField(name: Uint8Array, value: number): void {
  logLength = encodeInteger(logBuffer, encodeBytes(logBuffer, logLength, name), value);
}

function putMillisField(name: Uint8Array, ms: number): void {
  logLength = encodeMillis(logBuffer, encodeBytes(logBuffer, logLength, name), ms);
}

function putStringField(name: Uint8Array, text: string, end = text.length): void {
  logLength = encodeJsonString(logBuffer, encodeBytes(logBuffer, logLength, name), text, end);
}

/** One JSON object per line on stdout, so any log shipper can parse it. Never pass a secret in `fields`. */
export function log(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
  if (LOG_LEVEL_RANK[level] < logThreshold) return;
  writeLine(JSON.stringify({ time: isoNow(), level, msg, ...fields }) + "\n");
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

// ---------------------------------------------------------------- configuration

export const AUTH_MODES = ["certificate", "client-secret", "workload-identity", "managed-identity"] as const;
export type AuthMode = (typeof AUTH_MODES)[number];

export interface Config {
  authMode: AuthMode;
  /** Why this mode: the setting that chose it, for the startup line and --check. */
  authModeReason: string;
  /** Unset only in managed-identity mode with a system-assigned identity. */
  clientId: string | undefined;
  /** Unused in managed-identity mode (the identity's own tenant issues its tokens). */
  tenantId: string;
  certificatePath: string;
  /** Names the variable or flag the path came from, for error messages. */
  certificatePathSource: string;
  certificatePassword: string | undefined;
  /** client-secret mode: AZURE_CLIENT_SECRET, or AZURE_CLIENT_SECRET_FILE (re-read for every token request). */
  clientSecret: string | undefined;
  clientSecretFile: string | undefined;
  /** workload-identity mode: the projected service account token, re-read for every token request. */
  federatedTokenFile: string;
  /** Send the chain as x5c, for subject-name/issuer (SNI) authentication. */
  sendCertificateChain: boolean;
  /**
   * Where requests go: the routes file's routes, or API_BASE_URL as the one
   * route `/` with one backend (the same data, not a second path).
   */
  routes: RouteConfig[];
  /** AUTH_PROXY_ROUTES (or --routes): with it, logs and metrics name routes and scopes. */
  routesFile: string | undefined;
  host: string;
  port: number;
  /** AZURE_SCOPE: the scope of API_BASE_URL, and of every route that names none. */
  scope: string;
  /** Without trailing slash, e.g. https://login.microsoftonline.com. */
  authorityHost: string;
  logLevel: LogLevel;
  shutdownTimeoutMs: number;
  /** PROXY_API_KEYS, or PROXY_API_KEYS_FILE (re-read when it changes): keys callers must present; none means open. */
  callerKeys: CallerKeySource | undefined;
  /** ADMIN_PORT: a second listener for /health, /live and /metrics only (kubelet and Prometheus reach the pod IP). */
  adminPort: number | undefined;
  adminHost: string;
}

export type CallerKeySource = { keys: string[] } | { file: string; keys: string[] };

/** Every setting: its variable, the flag that overrides it, an alias variable, and its default. */
const SETTINGS = {
  authMode: { env: "AZURE_AUTH_MODE", flag: "--auth-mode" },
  clientId: { env: "AZURE_CLIENT_ID", flag: "--client-id" },
  tenantId: { env: "AZURE_TENANT_ID", flag: "--tenant-id" },
  certificatePath: { env: "AZURE_CERTIFICATE_PATH", alias: "AZURE_CLIENT_CERTIFICATE_PATH", flag: "--certificate-path" },
  apiBaseUrl: { env: "API_BASE_URL", flag: "--api-base-url" },
  routesFile: { env: "AUTH_PROXY_ROUTES", flag: "--routes" },
  host: { env: "HOST", flag: "--host", fallback: "0.0.0.0" },
  port: { env: "PORT", flag: "--port", fallback: "8080" },
  scope: { env: "AZURE_SCOPE", flag: "--scope", fallback: "https://cognitiveservices.azure.com/.default" },
  authorityHost: { env: "AZURE_AUTHORITY_HOST", flag: "--authority-host", fallback: "https://login.microsoftonline.com" },
  logLevel: { env: "LOG_LEVEL", flag: "--log-level", fallback: "info" },
  certificatePassword: { env: "AZURE_CERTIFICATE_PASSWORD", alias: "AZURE_CLIENT_CERTIFICATE_PASSWORD" },
  clientSecret: { env: "AZURE_CLIENT_SECRET" },
  clientSecretFile: { env: "AZURE_CLIENT_SECRET_FILE" },
  federatedTokenFile: { env: "AZURE_FEDERATED_TOKEN_FILE" },
  sendCertificateChain: { env: "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN", fallback: "false" },
  shutdownTimeout: { env: "SHUTDOWN_TIMEOUT", fallback: "25" },
  callerKeys: { env: "PROXY_API_KEYS" },
  callerKeysFile: { env: "PROXY_API_KEYS_FILE" },
  adminPort: { env: "ADMIN_PORT", flag: "--admin-port" },
  adminHost: { env: "ADMIN_HOST", flag: "--admin-host", fallback: "0.0.0.0" },
  connectTimeout: { env: "AUTH_PROXY_CONNECT_TIMEOUT", fallback: "10" },
} as const satisfies Record<string, { env: string; alias?: string; flag?: string; fallback?: string }>;

type SettingName = keyof typeof SETTINGS;
/** What each mode cannot work without (client-secret: AZURE_CLIENT_SECRET or its _FILE form). */
const REQUIRED_SETTINGS: Record<AuthMode, SettingName[]> = {
  certificate: ["clientId", "tenantId", "certificatePath", "apiBaseUrl"],
  "client-secret": ["clientId", "tenantId", "clientSecret", "apiBaseUrl"],
  "workload-identity": ["clientId", "tenantId", "federatedTokenFile", "apiBaseUrl"],
  "managed-identity": ["apiBaseUrl"],
};
export type Flags = { [flag: string]: string | boolean | string[] | undefined };
type Environment = Record<string, string | undefined>;

interface RawSetting {
  value: string | undefined;
  /** `AZURE_CLIENT_ID` or `--client-id`: what to name in an error. */
  source: string;
}

function readSetting(name: SettingName, env: Environment, flags: Flags): RawSetting {
  const setting: { env: string; alias?: string; flag?: string; fallback?: string } = SETTINGS[name];
  const fromFlag = setting.flag === undefined ? undefined : flags[setting.flag];
  if (typeof fromFlag === "string") return { value: fromFlag.trim(), source: setting.flag! };
  for (const variable of [setting.env, setting.alias]) {
    const value = variable === undefined ? undefined : env[variable]?.trim();
    if (value) return { value, source: variable! };
  }
  return { value: setting.fallback, source: setting.env };
}

const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const TENANT_DOMAIN = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$/i;
const BOOLEAN_WORDS: Record<string, boolean> = { true: true, "1": true, yes: true, false: false, "0": false, no: false };

function parseHttpUrl(raw: RawSetting, errors: string[], httpsOnly: boolean): URL | undefined {
  let url: URL;
  try {
    url = new URL(raw.value!);
  } catch {
    errors.push(`${raw.source}=${raw.value} is not a URL (expected e.g. https://my-resource.openai.azure.com)`);
    return undefined;
  }
  const schemes = httpsOnly ? ["https:"] : ["https:", "http:"];
  if (!schemes.includes(url.protocol)) {
    errors.push(`${raw.source}=${raw.value} must start with ${httpsOnly ? "https://" : "https:// or http://"}`);
  } else if (url.username || url.password) {
    errors.push(`${raw.source} must not carry credentials in the URL`);
  } else if (url.search || url.hash) {
    errors.push(`${raw.source}=${raw.value} must not have a query or fragment (the client's query is forwarded as sent)`);
  } else {
    return url;
  }
  return undefined;
}

/** Two listeners on one port collide when their hosts are equal or either is a wildcard (Bun would even share the port). */
function sameOrWildcardHost(a: string, b: string): boolean {
  const wildcard = (host: string) => host === "0.0.0.0" || host === "::" || host === "[::]";
  return a === b || wildcard(a) || wildcard(b);
}

const DEFAULT_MODE_REASON = "no credential is configured; certificate is the default";

/**
 * The contract's order: AZURE_AUTH_MODE when set, else the first credential
 * configured (certificate, client secret, federated token file). Managed
 * identity only when asked for: off Azure its endpoint never answers, so
 * guessing it would turn a forgotten variable into a silent hang.
 */
export function chooseAuthMode(env: Environment, flags: Flags = {}): { mode: AuthMode; reason: string } | { error: string } {
  const explicit = readSetting("authMode", env, flags);
  if (explicit.value) {
    const mode = explicit.value.toLowerCase();
    if (!(AUTH_MODES as readonly string[]).includes(mode)) {
      return { error: `${explicit.source}=${explicit.value} is not an identity mode; use one of ${AUTH_MODES.join(", ")}` };
    }
    return { mode: mode as AuthMode, reason: `${explicit.source}=${mode}` };
  }
  const configured = (
    [
      ["certificate", "certificatePath"],
      ["client-secret", "clientSecret"],
      ["client-secret", "clientSecretFile"],
      ["workload-identity", "federatedTokenFile"],
    ] as const
  )
    .map(([mode, name]) => ({ mode, setting: readSetting(name, env, flags) }))
    .filter(({ setting }) => setting.value);
  const [chosen, ...others] = configured;
  if (!chosen) return { mode: "certificate", reason: DEFAULT_MODE_REASON };
  const passedOver = others.filter(({ mode }) => mode !== chosen.mode).map(({ setting }) => setting.source);
  const precedence = passedOver.length === 0 ? "" : `; it comes before ${passedOver.join(" and ")} (set AZURE_AUTH_MODE to choose another)`;
  return { mode: chosen.mode, reason: `${chosen.setting.source} is set${precedence}` };
}

/**
 * Reads the configuration from flags (which win) and the environment, and
 * reports every fault at once: a user fixing a manifest should not have to
 * restart once per missing variable.
 */
export function loadConfig(env: Environment, flags: Flags = {}): { config?: Config; errors: string[] } {
  const raw = Object.fromEntries(
    (Object.keys(SETTINGS) as SettingName[]).map((name) => [name, readSetting(name, env, flags)]),
  ) as Record<SettingName, RawSetting>;
  const errors: string[] = [];

  const choice = chooseAuthMode(env, flags);
  if ("error" in choice) errors.push(choice.error);
  const { mode, reason } = "error" in choice ? { mode: undefined, reason: "" } : choice;
  if (mode !== undefined) {
    const missing = REQUIRED_SETTINGS[mode]
      .filter((name) => !raw[name].value && !(name === "clientSecret" && raw.clientSecretFile.value) && !(name === "apiBaseUrl" && raw.routesFile.value))
      .map((name) => (name === "clientSecret" ? "AZURE_CLIENT_SECRET (or AZURE_CLIENT_SECRET_FILE)" : SETTINGS[name].env));
    const why = reason === DEFAULT_MODE_REASON ? "" : ` (${mode} mode: ${reason})`;
    // On AKS nobody sets these by hand: their absence means the webhook did not mutate the pod.
    const webhook =
      mode === "workload-identity" && missing.some((name) => name !== "API_BASE_URL")
        ? `; the workload identity webhook injects AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE into pods labelled azure.workload.identity/use: "true" whose ServiceAccount has the azure.workload.identity/client-id annotation`
        : "";
    if (missing.length > 0) errors.push(`Missing required Azure AD configuration: ${missing.join(", ")}${why}${webhook}`);
  }
  if (mode === "client-secret" && raw.clientSecret.value && raw.clientSecretFile.value) {
    errors.push("set AZURE_CLIENT_SECRET or AZURE_CLIENT_SECRET_FILE, not both");
  }

  const { clientId, tenantId } = raw;
  if (clientId.value && !GUID.test(clientId.value)) {
    const what = mode === "managed-identity" ? "a user-assigned managed identity's client ID" : "an application (client) ID";
    errors.push(`${clientId.source}=${clientId.value} is not ${what}; expected a GUID like 00000000-0000-0000-0000-000000000000`);
  }
  if (tenantId.value && mode !== "managed-identity") {
    if (["common", "organizations", "consumers"].includes(tenantId.value.toLowerCase())) {
      errors.push(`${tenantId.source}=${tenantId.value} cannot be used with client credentials; set your tenant's ID (a GUID) or domain`);
    } else if (!GUID.test(tenantId.value) && !TENANT_DOMAIN.test(tenantId.value)) {
      errors.push(`${tenantId.source}=${tenantId.value} is not a tenant ID (a GUID) or tenant domain (contoso.onmicrosoft.com)`);
    }
  }

  const apiBases = raw.apiBaseUrl.value ? apiBaseUrls(raw.apiBaseUrl, errors) : undefined;
  const authority = parseHttpUrl(raw.authorityHost, errors, true);
  if (authority && authority.pathname !== "/") {
    errors.push(`${raw.authorityHost.source}=${raw.authorityHost.value} must be a host only, e.g. https://login.microsoftonline.us (the tenant is added from AZURE_TENANT_ID)`);
  }

  const port = Number(raw.port.value);
  if (!/^\d+$/.test(raw.port.value!) || port > 65535) {
    errors.push(`${raw.port.source}=${raw.port.value} is not a TCP port (0-65535)`);
  }
  if (!raw.host.value) errors.push(`${raw.host.source} is empty`);

  if (!isDefaultScope(raw.scope.value)) {
    errors.push(`${raw.scope.source}=${raw.scope.value} must be one resource's /.default scope (client credentials cannot ask for individual permissions), e.g. https://cognitiveservices.azure.com/.default`);
  }
  const connectTimeoutMs = connectTimeout(raw.connectTimeout.value, raw.connectTimeout.source, errors) ?? DEFAULT_CONNECT_TIMEOUT_MS;
  let routes: RouteConfig[] = [];
  if (raw.routesFile.value && raw.apiBaseUrl.value) {
    errors.push(`set ${raw.apiBaseUrl.source} or ${raw.routesFile.source}, not both: the routes file names every backend`);
  } else if (raw.routesFile.value) {
    routes = readRoutesFile(raw.routesFile, raw.scope.value!, connectTimeoutMs, errors);
  } else if (apiBases) {
    for (const backend of apiBases) backend.connectTimeoutMs = connectTimeoutMs;
    routes = [{ prefix: "/", stripPrefix: true, scope: raw.scope.value!, backends: apiBases }];
  }

  const logLevel = raw.logLevel.value!.toLowerCase();
  if (!(logLevel in LOG_LEVEL_RANK)) errors.push(`${raw.logLevel.source}=${raw.logLevel.value} must be one of debug, info, warn, error`);

  const sendChain = BOOLEAN_WORDS[raw.sendCertificateChain.value!.toLowerCase()];
  if (sendChain === undefined) errors.push(`${raw.sendCertificateChain.source}=${raw.sendCertificateChain.value} must be true or false`);

  const shutdownTimeout = Number(raw.shutdownTimeout.value);
  if (!Number.isFinite(shutdownTimeout) || shutdownTimeout < 0) {
    errors.push(`${raw.shutdownTimeout.source}=${raw.shutdownTimeout.value} must be a number of seconds, 0 or more`);
  }

  const callerKeys = loadCallerKeySource(raw.callerKeys, raw.callerKeysFile, errors);

  const adminPort = raw.adminPort.value ? Number(raw.adminPort.value) : undefined;
  if (raw.adminPort.value && (!/^\d+$/.test(raw.adminPort.value) || adminPort! > 65535)) {
    errors.push(`${raw.adminPort.source}=${raw.adminPort.value} is not a TCP port (0-65535)`);
  } else if (adminPort !== undefined && adminPort !== 0 && adminPort === port && sameOrWildcardHost(raw.adminHost.value!, raw.host.value!)) {
    errors.push(`${raw.adminPort.source}=${raw.adminPort.value} is the proxy's own port; the admin listener needs a port of its own`);
  }

  if (errors.length > 0) return { errors };
  return {
    errors,
    config: {
      authMode: mode!,
      authModeReason: reason,
      clientId: clientId.value,
      tenantId: tenantId.value ?? "",
      certificatePath: raw.certificatePath.value ?? "",
      certificatePathSource: raw.certificatePath.source,
      certificatePassword: raw.certificatePassword.value,
      clientSecret: raw.clientSecret.value,
      clientSecretFile: raw.clientSecretFile.value,
      federatedTokenFile: raw.federatedTokenFile.value ?? "",
      sendCertificateChain: sendChain!,
      routes,
      routesFile: raw.routesFile.value,
      host: raw.host.value!,
      port,
      scope: raw.scope.value!,
      authorityHost: authority!.origin,
      logLevel: logLevel as LogLevel,
      shutdownTimeoutMs: shutdownTimeout * 1000,
      callerKeys,
      adminPort,
      adminHost: raw.adminHost.value!,
    },
  };
}

/**
 * API_BASE_URL as backends: one URL, or several separated by commas, in
 * priority order (the first serves while it is available, the next takes
 * over while it rests). A host listed twice gets its place as a suffix, so
 * every backend keeps a label of its own.
 */
function apiBaseUrls(raw: RawSetting, errors: string[]): BackendConfig[] | undefined {
  const urls = raw.value!.split(",").map((value) => parseHttpUrl({ value: value.trim(), source: raw.source }, errors, false));
  if (urls.some((url) => url === undefined)) return undefined;
  if (urls.length > MAX_BACKENDS) errors.push(`${raw.source} lists ${urls.length} URLs; a route takes at most ${MAX_BACKENDS}`);
  return urls.map((url, index) => {
    const taken = urls.slice(0, index).some((other) => other!.host === url!.host);
    return backendConfig(url!, taken ? `${url!.host}-${index + 1}` : undefined, { priority: index + 1 });
  });
}

/** One key per line (blank lines and `#` comments skipped), or comma-separated in the variable. */
export function parseCallerKeys(text: string, separator: "," | "\n"): string[] {
  return text
    .split(separator)
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"));
}

export function readCallerKeysFile(file: string): string[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (error) {
    throw new Error(`PROXY_API_KEYS_FILE=${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? errorMessage(error)})`);
  }
  const keys = parseCallerKeys(text, "\n");
  if (keys.length === 0) throw new Error(`PROXY_API_KEYS_FILE=${file} holds no key (one per line)`);
  return keys;
}

function loadCallerKeySource(inline: RawSetting, file: RawSetting, errors: string[]): CallerKeySource | undefined {
  if (inline.value && file.value) {
    errors.push("set PROXY_API_KEYS or PROXY_API_KEYS_FILE, not both");
    return undefined;
  }
  if (inline.value) {
    const keys = parseCallerKeys(inline.value, ",");
    if (keys.length === 0) errors.push("PROXY_API_KEYS holds no key (comma-separated)");
    return { keys };
  }
  if (!file.value) return undefined;
  try {
    return { file: file.value, keys: readCallerKeysFile(file.value) };
  } catch (error) {
    errors.push(errorMessage(error));
    return undefined;
  }
}

// ---------------------------------------------------------------- configuration: the routes file

/** One backend of a route: where its requests go, and how it is chosen among the route's others. */
export interface BackendConfig {
  /** The URL without its trailing slash: the request's path (its route's prefix stripped) and query are appended. */
  url: string;
  origin: string;
  /** Its label in logs and metrics: the file's `name`, else the URL's host. */
  name: string;
  /** Lower serves first (1 unless set). */
  priority: number;
  /** Its share among backends of the same priority (1 unless set). */
  weight: number;
  /** `/openai/deployments/<from>/` renamed `<to>` for this backend. */
  deployments: Record<string, string>;
  /** A connect (TCP and TLS) not done within this is a connection failure: `connect_timeout`, else AUTH_PROXY_CONNECT_TIMEOUT (10 s). */
  connectTimeoutMs: number;
}

export interface RouteConfig {
  /** `/` or a path without trailing slash, e.g. `/search`: its label in logs and metrics. */
  prefix: string;
  /** Whether the prefix is cut from the path before it is appended to a backend's URL. */
  stripPrefix: boolean;
  scope: string;
  backends: BackendConfig[];
}

const ROUTE_KEYS = ["prefix", "scope", "strip_prefix", "backends"];
/** A request's tried backends are a bit mask. */
export const MAX_BACKENDS = 32;
const BACKEND_KEYS = ["url", "name", "priority", "weight", "deployments", "connect_timeout"];
/**
 * The kernel retries an unanswered SYN for about two minutes
 * (tcp_syn_retries=6) and Bun's fetch sets no bound of its own: a
 * black-holed region would hold every request that long.
 */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10 * SECOND;
/** Longer than the kernel would wait anyway. */
const MAX_CONNECT_TIMEOUT_S = 120;

/** A connect timeout in seconds (a fraction allowed) as milliseconds; undefined, with the fault, when it is none. */
function connectTimeout(value: unknown, place: string, faults: string[]): number | undefined {
  const seconds = typeof value === "string" && /^\d+(\.\d+)?$/.test(value) ? Number(value) : value;
  if (typeof seconds === "number" && seconds > 0 && seconds <= MAX_CONNECT_TIMEOUT_S) return Math.round(seconds * SECOND);
  faults.push(`${place}=${value} must be a number of seconds above 0 and at most ${MAX_CONNECT_TIMEOUT_S}`);
  return undefined;
}
/** Backend names are label values: the characters of an Azure deployment name, at most 64. */
const LABEL_VALUE = /^[A-Za-z0-9._-]{1,64}$/;

/** Client credentials can ask only for one resource's `/.default` scope: the resource's URI (`https://search.azure.com`, `api://<app id>`) before it. */
function isDefaultScope(scope: string | undefined): boolean {
  return scope !== undefined && /^[^\s/][^\s]*\/\.default$/.test(scope);
}

export function backendConfig(url: URL, name: string | undefined, options: Partial<Pick<BackendConfig, "priority" | "weight" | "deployments" | "connectTimeoutMs">> = {}): BackendConfig {
  return {
    url: url.origin + url.pathname.replace(/\/+$/, ""),
    origin: url.origin,
    name: name ?? url.host,
    priority: options.priority ?? 1,
    weight: options.weight ?? 1,
    deployments: options.deployments ?? {},
    connectTimeoutMs: options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS,
  };
}

/** The routes file read once at start: every fault reported, each naming the file and the place (`routes[1].backends[0].url`). */
function readRoutesFile(file: RawSetting, defaultScope: string, defaultConnectTimeoutMs: number, errors: string[]): RouteConfig[] {
  let text: string;
  try {
    text = readFileSync(file.value!, "utf8");
  } catch (error) {
    errors.push(`${file.source}=${file.value} cannot be read (${(error as NodeJS.ErrnoException).code ?? errorMessage(error)})`);
    return [];
  }
  const { routes, faults } = parseRoutes(text, defaultScope, defaultConnectTimeoutMs);
  for (const fault of faults) errors.push(`${file.source}=${file.value}: ${fault}`);
  return routes;
}

type Mapping = Record<string, unknown>;
const isMapping = (value: unknown): value is Mapping => typeof value === "object" && value !== null && !Array.isArray(value);

/** Routes from a YAML or JSON text (YAML is a superset of JSON; Bun parses it natively), and every fault found, by place. */
export function parseRoutes(text: string, defaultScope: string, defaultConnectTimeoutMs = DEFAULT_CONNECT_TIMEOUT_MS): { routes: RouteConfig[]; faults: string[] } {
  const faults: string[] = [];
  let document: unknown;
  try {
    document = Bun.YAML.parse(text);
  } catch (error) {
    return { routes: [], faults: [`is not YAML or JSON (${errorMessage(error)})`] };
  }
  if (!isMapping(document) || !Array.isArray(document.routes) || document.routes.length === 0) {
    return { routes: [], faults: ["must hold `routes:`, a list of routes, each with a prefix and its backends"] };
  }
  unknownKeys(document, ["routes"], "", faults);
  const routes: RouteConfig[] = [];
  const prefixes = new Map<string, number>();
  document.routes.forEach((entry: unknown, index: number) => {
    const place = `routes[${index}]`;
    if (!isMapping(entry)) return void faults.push(`${place} must be a mapping with prefix and backends`);
    unknownKeys(entry, ROUTE_KEYS, place, faults);
    const prefix = routePrefix(entry.prefix, `${place}.prefix`, faults);
    if (prefix !== undefined && prefixes.has(prefix)) faults.push(`${place}.prefix ${prefix} is routes[${prefixes.get(prefix)}]'s prefix too`);
    if (prefix !== undefined) prefixes.set(prefix, index);
    // A route without a scope has AZURE_SCOPE's, whose own fault is reported once, as AZURE_SCOPE's.
    const scope = entry.scope ?? defaultScope;
    if (entry.scope !== undefined && (typeof scope !== "string" || !isDefaultScope(scope))) {
      faults.push(`${place}.scope ${JSON.stringify(entry.scope)} must be one resource's /.default scope, e.g. https://search.azure.com/.default`);
    }
    const stripPrefix = entry.strip_prefix ?? true;
    if (typeof stripPrefix !== "boolean") faults.push(`${place}.strip_prefix must be true or false`);
    if (!Array.isArray(entry.backends) || entry.backends.length === 0 || entry.backends.length > MAX_BACKENDS) {
      return void faults.push(`${place}.backends must list one to ${MAX_BACKENDS} backends (- url: https://...)`);
    }
    const backends = entry.backends.map((backend: unknown, backendIndex: number) => parseBackend(backend, `${place}.backends[${backendIndex}]`, defaultConnectTimeoutMs, faults));
    // The place named is the backend's own in the file, whether or not an earlier one was malformed.
    const names = new Set<string>();
    for (const [backendIndex, backend] of backends.entries()) {
      if (backend === undefined) continue;
      if (names.has(backend.name)) faults.push(`${place}.backends[${backendIndex}] is named ${backend.name} like another backend of the route (set name:)`);
      names.add(backend.name);
    }
    if (prefix !== undefined && typeof scope === "string" && typeof stripPrefix === "boolean" && backends.every((backend) => backend !== undefined)) {
      routes.push({ prefix, stripPrefix, scope, backends: backends as BackendConfig[] });
    }
  });
  return { routes, faults };
}

function unknownKeys(mapping: Mapping, known: string[], place: string, faults: string[]): void {
  for (const key of Object.keys(mapping)) {
    if (!known.includes(key)) faults.push(`${place ? `${place}.` : ""}${key} is not a setting (known: ${known.join(", ")})`);
  }
}

/** A prefix is an absolute path of plain segments; its trailing slash is dropped (`/search/` is `/search`). */
function routePrefix(value: unknown, place: string, faults: string[]): string | undefined {
  if (typeof value !== "string" || !value.startsWith("/")) {
    faults.push(`${place} must be a path starting with /, e.g. /search (or / for every other path)`);
    return undefined;
  }
  // Only characters a client sends as they are: a prefix holding one it must percent-encode (`/café`, `/a"b`) would never match.
  if (!/^[A-Za-z0-9._~!$&()*+,;=:@\/-]+$/.test(value) || /\/\/|(^|\/)\.\.?(\/|$)/.test(value)) {
    faults.push(`${place} ${value} must be plain path segments: letters, digits and - . _ ~ ! $ & ( ) * + , ; = : @ (no query, percent-encoding, space, quote, non-ASCII letter, backslash, empty or dot segment)`);
    return undefined;
  }
  return value.length > 1 ? value.replace(/\/$/, "") : value;
}

function parseBackend(entry: unknown, place: string, defaultConnectTimeoutMs: number, faults: string[]): BackendConfig | undefined {
  if (!isMapping(entry)) {
    faults.push(`${place} must be a mapping with url`);
    return undefined;
  }
  unknownKeys(entry, BACKEND_KEYS, place, faults);
  const url = typeof entry.url === "string" ? parseHttpUrl({ value: entry.url, source: `${place}.url` }, faults, false) : undefined;
  if (typeof entry.url !== "string") faults.push(`${place}.url must be the backend's URL, e.g. https://my-resource.openai.azure.com`);
  const positive = (key: "priority" | "weight") => {
    const value = entry[key] ?? 1;
    if (Number.isInteger(value) && (value as number) >= 1) return value as number;
    faults.push(`${place}.${key} must be a positive integer`);
    return undefined;
  };
  const priority = positive("priority");
  const weight = positive("weight");
  const name = entry.name;
  if (name !== undefined && (typeof name !== "string" || !LABEL_VALUE.test(name))) faults.push(`${place}.name must be letters, digits, '.', '_' or '-', at most 64`);
  const deployments = entry.deployments ?? {};
  const renames = isMapping(deployments) && Object.entries(deployments).every(([from, to]) => LABEL_VALUE.test(from) && typeof to === "string" && LABEL_VALUE.test(to));
  if (!renames) faults.push(`${place}.deployments must map deployment names to deployment names, e.g. { gpt-4o: gpt-4o-eastus2 }`);
  const connectTimeoutMs = entry.connect_timeout === undefined ? defaultConnectTimeoutMs : connectTimeout(entry.connect_timeout, `${place}.connect_timeout`, faults);
  if (url === undefined || priority === undefined || weight === undefined || !renames || connectTimeoutMs === undefined || (name !== undefined && typeof name !== "string")) return undefined;
  return backendConfig(url, name as string | undefined, { priority, weight, deployments: deployments as Record<string, string>, connectTimeoutMs });
}

// ---------------------------------------------------------------- credential (certificate mode)

export interface Credential {
  /** PKCS#8 PEM, decrypted: what MSAL signs the client assertion with. */
  privateKeyPem: string;
  /** Hex SHA-256 of the leaf certificate's DER: the `x5t#S256` Entra matches against the uploaded certificate. */
  thumbprintSha256: string;
  /** Uppercase hex SHA-1 of the leaf: what the Azure portal shows under Certificates & secrets. */
  thumbprintSha1: string;
  /** Leaf first, then the chain, as PEM: sent as x5c when AZURE_CLIENT_SEND_CERTIFICATE_CHAIN is on. */
  certificateChainPem: string;
  subject: string;
  notAfter: Date;
}

/** A fault in the certificate file, phrased for the person who must fix it. */
export class CredentialError extends Error {}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;

/** How Entra ID and the Azure portal name a certificate: hex SHA-256 thumbprint and one-line subject. */
function certificateThumbprint(certificate: X509Certificate): string {
  return certificate.fingerprint256.replace(/:/g, "");
}

function certificateSubject(certificate: X509Certificate): string {
  return certificate.subject.replace(/\n/g, ", ");
}

function spki(key: KeyObject): string {
  return key.export({ type: "spki", format: "der" }).toString("base64");
}

/**
 * Parses a PEM holding the certificate (optionally followed by its chain)
 * and its private key, in any order. The key may be PKCS#8, PKCS#1 or
 * encrypted PKCS#8 (then `password` decrypts it).
 */
export function parseCredential(pem: string, password: string | undefined, file: string): Credential {
  const certificates: X509Certificate[] = [];
  const keyBlocks: { label: string; text: string }[] = [];
  for (const [text, label = ""] of pem.matchAll(PEM_BLOCK)) {
    if (label === "CERTIFICATE") {
      try {
        certificates.push(new X509Certificate(text));
      } catch (error) {
        throw new CredentialError(`${file} holds a certificate block that cannot be parsed (${errorMessage(error)})`);
      }
    } else if (label.endsWith("PRIVATE KEY")) {
      keyBlocks.push({ label, text });
    }
  }
  if (certificates.length === 0) {
    throw new CredentialError(`${file} holds no certificate (expected a -----BEGIN CERTIFICATE----- block)`);
  }
  if (keyBlocks.length === 0) {
    throw new CredentialError(`${file} holds no private key (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or ENCRYPTED PRIVATE KEY)`);
  }
  if (keyBlocks.length > 1) throw new CredentialError(`${file} holds ${keyBlocks.length} private keys; keep only the certificate's own`);

  const { label, text } = keyBlocks[0]!;
  const encrypted = label === "ENCRYPTED PRIVATE KEY" || /Proc-Type: 4,ENCRYPTED/.test(text);
  if (encrypted && !password) {
    throw new CredentialError(`${file} holds an encrypted private key; set AZURE_CERTIFICATE_PASSWORD`);
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(encrypted ? { key: text, format: "pem", passphrase: password } : { key: text, format: "pem" });
  } catch (error) {
    throw new CredentialError(
      encrypted
        ? `AZURE_CERTIFICATE_PASSWORD does not decrypt the private key in ${file}`
        : `${file} holds a private key that cannot be parsed (${errorMessage(error)})`,
    );
  }
  // Entra ID signs in apps only with RSA certificates (PS256/RS256 assertions).
  if (privateKey.asymmetricKeyType !== "rsa") {
    throw new CredentialError(`${file} holds a ${privateKey.asymmetricKeyType?.toUpperCase()} key; Entra ID accepts only RSA certificates`);
  }

  const publicKey = spki(createPublicKey(privateKey));
  const leaf = certificates.find((certificate) => spki(certificate.publicKey) === publicKey);
  if (!leaf) {
    const [first] = certificates;
    throw new CredentialError(
      `the private key in ${file} does not belong to its certificate (${certificateSubject(first!)}, SHA-256 ${certificateThumbprint(first!)})`,
    );
  }
  const chain = [leaf, ...certificates.filter((certificate) => certificate !== leaf)];
  return {
    privateKeyPem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    thumbprintSha256: certificateThumbprint(leaf),
    thumbprintSha1: leaf.fingerprint.replace(/:/g, "").toUpperCase(),
    certificateChainPem: chain.map((certificate) => certificate.toString()).join(""),
    subject: certificateSubject(leaf),
    notAfter: new Date(leaf.validTo),
  };
}

/** Reads the file afresh each time: Kubernetes rotates a mounted Secret by swapping a symlink. */
export function readCredential(config: Pick<Config, "certificatePath" | "certificatePathSource" | "certificatePassword">): Credential {
  const pem = readCredentialFile(config.certificatePathSource, config.certificatePath);
  return parseCredential(pem, config.certificatePassword, `${config.certificatePathSource}=${config.certificatePath}`);
}

/** A credential file's text, or a CredentialError naming the variable, the file and why in words. */
function readCredentialFile(variable: string, file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const reason = code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied" : code === "EISDIR" ? "is a directory" : errorMessage(error);
    throw new CredentialError(`${variable}=${file} cannot be read (${reason})`);
  }
}

// ---------------------------------------------------------------- identity

/**
 * One way of proving who the proxy is. Every mode answers the token manager
 * the same way, so refresh, backoff, /health, logs and the secret rules are
 * the same for all of them.
 */
export interface Identity {
  /** A fresh token for `scope` from the identity provider, never from a cache, with the credential read afresh. */
  requestToken(scope: string): Promise<HeldToken>;
  /** Names the credential in use, for log lines and --check: thumbprints, file names, issuer and subject; never a secret. */
  describe(): Record<string, string | undefined>;
  /** A sentence a user can act on, for failures whose own message names no cause. */
  hint(error: unknown, aadsts: string | undefined): string | undefined;
  /** certificate mode: the certificate in use (the last good one read), for expiry warnings, /health and /metrics. */
  readonly certificate: Credential | undefined;
}

/** The audience Entra ID requires of every federated assertion (workload identity). */
export const FEDERATED_TOKEN_AUDIENCE = "api://AzureADTokenExchange";

/** Reads what the mode needs once, at startup: a bad file stops the proxy with one clear line instead of a retry loop. */
export function createIdentity(config: Config): Identity {
  switch (config.authMode) {
    case "certificate":
      return certificateIdentity(config, readCredential(config));
    case "client-secret":
      readClientSecret(config);
      return clientSecretIdentity(config);
    case "workload-identity":
      return workloadIdentity(config, federatedTokenClaims(readFederatedToken(config.federatedTokenFile), config.federatedTokenFile));
    case "managed-identity":
      return managedIdentity(config);
  }
}

function certificateIdentity(config: Config, initial: Credential): Identity {
  let credential = initial;
  return {
    get certificate() {
      return credential;
    },
    describe: () => ({ certificate_thumbprint: credential.thumbprintSha256, certificate_thumbprint_sha1: credential.thumbprintSha1 }),
    hint: (_error, aadsts) => (aadsts === "AADSTS700027" ? certificateMismatchHint(credential) : undefined),
    requestToken: (scope) => {
      credential = reloadCredential(config, credential);
      return confidentialClientToken(config, scope, {
        clientCertificate: {
          thumbprintSha256: credential.thumbprintSha256,
          privateKey: credential.privateKeyPem,
          x5c: config.sendCertificateChain ? credential.certificateChainPem : undefined,
        },
      });
    },
  };
}

/** A rotated file is used at once; a broken one is reported and the last good credential kept. */
function reloadCredential(config: Config, current: Credential): Credential {
  try {
    const fresh = readCredential(config);
    if (fresh.thumbprintSha256 !== current.thumbprintSha256) {
      log("info", "certificate changed", { certificate_thumbprint: fresh.thumbprintSha256, not_after: fresh.notAfter.toISOString() });
    }
    return fresh;
  } catch (error) {
    log("error", "certificate file unusable; keeping the last good certificate", {
      error: errorMessage(error),
      certificate_thumbprint: current.thumbprintSha256,
    });
    return current;
  }
}

/** A certificate this close to its end is warned about at startup and daily: rotation takes people time. */
export const CERTIFICATE_EXPIRY_WARNING_MS = 30 * 24 * 60 * MINUTE;
const CERTIFICATE_EXPIRY_CHECK_MS = 24 * 60 * MINUTE;

export function warnIfCertificateExpiring(credential: Credential, nowMs: number): void {
  const left = credential.notAfter.getTime() - nowMs;
  const fields = {
    not_after: credential.notAfter.toISOString(),
    certificate_thumbprint: credential.thumbprintSha256,
    certificate_thumbprint_sha1: credential.thumbprintSha1,
  };
  if (left <= 0) log("error", "the certificate has expired; Entra ID will reject it", fields);
  else if (left < CERTIFICATE_EXPIRY_WARNING_MS) log("warn", "the certificate expires soon; upload and mount a new one", { ...fields, days_left: Math.floor(left / (24 * 60 * MINUTE)) });
}

/** certificate mode: the warning at startup and daily while the certificate nears its end (whatever the number of scopes). */
function watchCertificateExpiry(identity: Identity): ReturnType<typeof setInterval> | undefined {
  if (identity.certificate === undefined) return undefined;
  const warnIfExpiring = () => warnIfCertificateExpiring(identity.certificate!, Date.now());
  warnIfExpiring();
  const timer = setInterval(warnIfExpiring, CERTIFICATE_EXPIRY_CHECK_MS);
  timer.unref();
  return timer;
}

/** AADSTS700027 names no cause a user can act on; this sentence does. */
export function certificateMismatchHint(credential: Credential): string {
  return (
    `Entra ID does not accept this certificate: the one uploaded to the app registration differs from the file, or it has expired (not after ${credential.notAfter.toISOString()}). ` +
    `Compare the portal's thumbprint under Certificates & secrets with SHA-1 ${credential.thumbprintSha1}.`
  );
}

function clientSecretIdentity(config: Config): Identity {
  return {
    certificate: undefined,
    describe: () => ({ client_secret: config.clientSecretFile === undefined ? "AZURE_CLIENT_SECRET" : `AZURE_CLIENT_SECRET_FILE=${config.clientSecretFile}` }),
    hint: (_error, aadsts) =>
      aadsts === "AADSTS7000215"
        ? "Entra ID rejects the client secret: it is wrong, expired or deleted, or it is the secret's ID instead of its value (the portal shows the value once, when the secret is created)."
        : undefined,
    requestToken: (scope) => confidentialClientToken(config, scope, { clientSecret: readClientSecret(config) }),
  };
}

/** The secret, from the variable or from the file afresh (a Kubernetes Secret is rotated by swapping a symlink). */
export function readClientSecret(config: Pick<Config, "clientSecret" | "clientSecretFile">): string {
  if (config.clientSecretFile === undefined) return config.clientSecret!;
  const secret = readCredentialFile("AZURE_CLIENT_SECRET_FILE", config.clientSecretFile).trim();
  if (!secret) throw new CredentialError(`AZURE_CLIENT_SECRET_FILE=${config.clientSecretFile} is empty`);
  return secret;
}

/** What a federated token says about itself: enough to match it against the app's federated credentials by eye. */
export interface FederatedTokenClaims {
  issuer: string;
  subject: string;
  audience: string;
  expiresAt: string;
}

/**
 * The projected service account token, read afresh: the kubelet replaces it
 * at 80 % of its life, and a token read once fails an hour later with
 * AADSTS700024.
 */
export function readFederatedToken(file: string): string {
  const token = readCredentialFile("AZURE_FEDERATED_TOKEN_FILE", file).trim();
  if (!token) throw new CredentialError(`AZURE_FEDERATED_TOKEN_FILE=${file} is empty`);
  return token;
}

/** Decodes (does not verify: Entra ID does) the token's claims; a file that is no JWT is a fault worth naming. */
export function federatedTokenClaims(token: string, file: string): FederatedTokenClaims {
  let claims: { iss?: unknown; sub?: unknown; aud?: unknown; exp?: unknown };
  try {
    claims = JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString("utf8"));
  } catch {
    throw new CredentialError(`AZURE_FEDERATED_TOKEN_FILE=${file} does not hold a JWT (expected the projected service account token)`);
  }
  const audience = Array.isArray(claims.aud) ? claims.aud.join(" ") : String(claims.aud ?? "");
  return {
    issuer: String(claims.iss ?? ""),
    subject: String(claims.sub ?? ""),
    audience,
    expiresAt: typeof claims.exp === "number" ? new Date(claims.exp * SECOND).toISOString() : "",
  };
}

function workloadIdentity(config: Config, initial: FederatedTokenClaims): Identity {
  let claims = initial;
  const file = config.federatedTokenFile;
  const readAssertion = async () => {
    const token = readFederatedToken(file);
    claims = federatedTokenClaims(token, file);
    return token;
  };
  return {
    certificate: undefined,
    describe: () => ({
      federated_token_file: file,
      federated_token_issuer: claims.issuer,
      federated_token_subject: claims.subject,
      federated_token_expires_on: claims.expiresAt || undefined,
    }),
    hint: (_error, aadsts) => federatedCredentialHint(aadsts, claims, config.clientId!, file),
    // The callback, not a string: MSAL calls it for every token request, so each reads the file as the kubelet left it.
    requestToken: (scope) => confidentialClientToken(config, scope, { clientAssertion: readAssertion }),
  };
}

/** Entra's messages for a federated assertion it rejects say what did not match, not what to change. */
export function federatedCredentialHint(aadsts: string | undefined, claims: FederatedTokenClaims, clientId: string, file: string): string | undefined {
  const presented = `issuer ${claims.issuer}, subject ${claims.subject}, audience ${claims.audience}`;
  switch (aadsts) {
    case "AADSTS700211":
      return `No federated credential on app ${clientId} has this token's issuer: add one whose issuer is exactly ${claims.issuer} (the cluster's OIDC issuer URL). The token presents ${presented}.`;
    // Entra answers a subject or audience mismatch with AADSTS70021, or lately with the narrower 700213 (subject) and 700212 (audience).
    case "AADSTS70021":
    case "AADSTS700212":
    case "AADSTS700213":
      return `No federated credential on app ${clientId} matches this token: its subject must be system:serviceaccount:<namespace>:<service account> of this pod and its audience ${FEDERATED_TOKEN_AUDIENCE}. The token presents ${presented}.`;
    case "AADSTS700024":
      return `The token in ${file} has expired (exp ${claims.expiresAt || "missing"}): the kubelet should have replaced it; check the pod's projected service account token volume.`;
    default:
      return undefined;
  }
}

function managedIdentity(config: Config): Identity {
  let application: import("@azure/msal-node").ManagedIdentityApplication | undefined;
  let source: string | undefined;
  return {
    certificate: undefined,
    describe: () => ({
      managed_identity: config.clientId === undefined ? "system-assigned" : `user-assigned ${config.clientId}`,
      managed_identity_source: source,
    }),
    hint: (error) => {
      if ((error as { errorCode?: string })?.errorCode === UNREACHABLE) {
        return `the managed identity endpoint (${source ?? "IMDS"}) did not answer: off Azure, or on a host without a managed identity, this mode cannot get a token; use certificate, workload-identity or client-secret there.`;
      }
      if (/identity not found/i.test(describeTokenError(error).message)) {
        return config.clientId === undefined
          ? "this host has no system-assigned managed identity: turn it on (Identity, System assigned), or attach a user-assigned one and set AZURE_CLIENT_ID to its client ID."
          : `no user-assigned managed identity with client ID ${config.clientId} is attached to this host: attach it (Identity, User assigned), or correct AZURE_CLIENT_ID.`;
      }
      return undefined;
    },
    requestToken: async (scope) => {
      const msal = await loadMsal();
      application ??= new msal.ManagedIdentityApplication({
        managedIdentityIdParams: config.clientId === undefined ? undefined : { userAssignedClientId: config.clientId },
        // The token manager retries with its own backoff; MSAL's inner retries would hide minutes inside one attempt.
        system: { networkClient: managedIdentityNetworkClient, loggerOptions: QUIET_MSAL_LOGGER, disableInternalRetries: true },
      });
      const found = application.getManagedIdentitySource();
      source = found === "DefaultToImds" ? "IMDS" : found;
      const obtainedAtMs = Date.now();
      // MSAL turns the scope into the resource these endpoints want (…/.default dropped).
      return heldToken(await application.acquireToken({ resource: scope, forceRefresh: true }), obtainedAtMs);
    },
  };
}

/** Entra ID answers within a second or two; a token POST that hangs must not stall the refresh loop. */
const TOKEN_REQUEST_TIMEOUT_MS = 10 * SECOND;
/** A token response is a few KB; a misbehaving endpoint must not make the proxy buffer without bound. */
const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024;

/**
 * MSAL's own client sets no timeout on the token POST (msal-js#6527); this
 * one does, and uses fetch so token traffic follows the same
 * HTTPS_PROXY/NO_PROXY and NODE_EXTRA_CA_CERTS as the forwarded traffic.
 */
const tokenNetworkClient: INetworkModule = {
  sendGetRequestAsync: (url, options, timeout) => sendTokenRequest("GET", url, options, timeout),
  sendPostRequestAsync: (url, options) => sendTokenRequest("POST", url, options),
};

async function sendTokenRequest<T>(
  method: string,
  url: string,
  options: { headers?: Record<string, string>; body?: string } | undefined,
  timeoutMs = TOKEN_REQUEST_TIMEOUT_MS,
): Promise<NetworkResponse<T>> {
  const signal = AbortSignal.timeout(timeoutMs);
  let response: Response;
  try {
    response = await fetch(url, {
      method,
      headers: options?.headers,
      body: method === "POST" ? (options?.body ?? "") : undefined,
      signal,
      // A token endpoint that redirects is misconfigured or hijacked: the client assertion goes nowhere else.
      redirect: "manual",
    });
  } catch (error) {
    const reason = (error as Error).name === "TimeoutError" ? `no answer within ${timeoutMs / SECOND} s` : errorMessage(error);
    // Through an outbound proxy, a refusal or a timeout may be the proxy's own: name it.
    const proxy = outboundProxyFor(url, process.env);
    const via = proxy === undefined ? "" : ` through the outbound proxy ${proxyAddress(proxy)}`;
    throw await networkError(`token request to ${new URL(url).origin}${via} failed: ${reason}`, UNREACHABLE);
  }
  const origin = new URL(url).origin;
  if (response.status >= 300 && response.status < 400) {
    void response.body?.cancel();
    throw await networkError(`token endpoint ${origin} answered with a redirect (HTTP ${response.status}); AZURE_AUTHORITY_HOST must be the identity provider itself`);
  }
  let text: string | undefined;
  try {
    text = (await readBounded(response, MAX_TOKEN_RESPONSE_BYTES))?.toString("utf8");
  } catch (error) {
    // The timeout covers the body too: an endpoint that stalls after its headers is named as plainly as one that never answers.
    const reason = signal.aborted ? `no complete answer within ${timeoutMs / SECOND} s (HTTP ${response.status}, the body stalled)` : errorMessage(error);
    throw await networkError(`token request to ${origin} failed: ${reason}`, UNREACHABLE);
  }
  if (text === undefined) {
    throw await networkError(`token endpoint ${origin} answered HTTP ${response.status} with a body over ${MAX_TOKEN_RESPONSE_BYTES / 1024 / 1024} MiB`);
  }
  try {
    return { status: response.status, headers: Object.fromEntries(response.headers), body: JSON.parse(text) as T };
  } catch {
    throw await networkError(`token endpoint ${origin} answered HTTP ${response.status} with a body that is not JSON`);
  }
}

/** The body's bytes, or undefined (and the rest cancelled) once it passes `limit` bytes. */
async function readBounded(response: Response, limit: number): Promise<Buffer | undefined> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of response.body ?? []) {
    size += chunk.byteLength;
    if (size > limit) {
      void response.body?.cancel().catch(() => {});
      return undefined;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/** MSAL passes its own AuthError through unchanged but replaces any other with a bare "network_error". */
async function networkError(message: string, code = "network_error"): Promise<Error> {
  const { AuthError } = await loadMsal();
  return new AuthError(code, message);
}

/** The error code of a token request that got no HTTP answer at all (refused, reset, timed out). */
const UNREACHABLE = "endpoint_unreachable";

type Msal = typeof import("@azure/msal-node");
let msalModule: Promise<Msal> | undefined;

/** MSAL is loaded on first use, after the listener is up, so `/live` answers sooner. */
function loadMsal(): Promise<Msal> {
  return (msalModule ??= import("@azure/msal-node"));
}

/** The token endpoint Entra ID publishes for every cloud, so no discovery round-trip is needed. */
export function tokenEndpoint(config: Pick<Config, "authorityHost" | "tenantId">): string {
  return `${config.authorityHost}/${config.tenantId}/oauth2/v2.0/token`;
}

/** The same bounded client, for endpoints that live on the host itself (IMDS, App Service, Arc): never through a proxy. */
const managedIdentityNetworkClient: INetworkModule = {
  sendGetRequestAsync: (url, options, timeout) => sendTokenRequest("GET", bypassProxyFor(url), options, timeout),
  sendPostRequestAsync: (url, options) => sendTokenRequest("POST", bypassProxyFor(url), options),
};

/**
 * Bun's fetch sends even link-local and loopback URLs through HTTP_PROXY,
 * and reads NO_PROXY at every request (both measured on 1.4.5): a metadata
 * endpoint no proxy can reach is added to NO_PROXY before it is asked.
 */
function bypassProxyFor(url: string): string {
  const host = new URL(url).hostname;
  const entries = [process.env.NO_PROXY, process.env.no_proxy].flatMap((list) => (list ?? "").split(",")).map((entry) => entry.trim()).filter(Boolean);
  if (!entries.includes(host)) process.env.NO_PROXY = [...new Set(entries), host].join(",");
  return url;
}

const QUIET_MSAL_LOGGER = { piiLoggingEnabled: false, logLevel: 0 /* Error */, loggerCallback: () => {} };

type ApplicationCredential =
  | { clientCertificate: { thumbprintSha256: string; privateKey: string; x5c: string | undefined } }
  | { clientSecret: string }
  | { clientAssertion: () => Promise<string> };

/** One client-credentials token from Entra ID with an app credential, never from a cache: every call is a real refresh. */
async function confidentialClientToken(config: Config, scope: string, credential: ApplicationCredential): Promise<HeldToken> {
  const msal = await loadMsal();
  const authority = `${config.authorityHost}/${config.tenantId}`;
  const application = new msal.ConfidentialClientApplication({
    auth: {
      clientId: config.clientId!,
      authority,
      // A non-default host (sovereign cloud, test fake) is trusted as given.
      knownAuthorities: [new URL(config.authorityHost).host],
      authorityMetadata: JSON.stringify({
        token_endpoint: tokenEndpoint(config),
        authorization_endpoint: `${authority}/oauth2/v2.0/authorize`,
        issuer: `${authority}/v2.0`,
        jwks_uri: `${authority}/discovery/v2.0/keys`,
      }),
      ...credential,
    },
    system: { networkClient: tokenNetworkClient, loggerOptions: QUIET_MSAL_LOGGER },
  });
  const obtainedAtMs = Date.now();
  return heldToken(await application.acquireTokenByClientCredential({ scopes: [scope], skipCache: true }), obtainedAtMs);
}

function heldToken(result: AuthenticationResult | null, obtainedAtMs: number): HeldToken {
  if (!result?.accessToken) throw new Error("the identity provider answered without an access token");
  return {
    authorization: `Bearer ${result.accessToken}`,
    expiresOnMs: result.expiresOn?.getTime() ?? Number.NaN,
    refreshOnMs: result.refreshOn?.getTime(),
    obtainedAtMs,
  };
}

// ---------------------------------------------------------------- token manager

/** What the hot path reads: plain data, replaced whole when a new token arrives. */
export interface HeldToken {
  /** `Bearer <token>`, built once per token rather than once per request. */
  authorization: string;
  expiresOnMs: number;
  /** Entra's `refresh_in`, when it sent one. */
  refreshOnMs: number | undefined;
  obtainedAtMs: number;
}

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

/** The part of an MSAL or network error a user can act on: the AADSTS code and its first sentence. */
export function describeTokenError(error: unknown): { message: string; aadsts: string | undefined } {
  const details = error as { errorMessage?: string; errorCode?: string; message?: string };
  const text = details?.errorMessage || details?.message || String(error);
  const [firstLine] = text.split(/\r?\n/);
  const message = (firstLine || details?.errorCode || "unknown error").replace(/\s*Trace ID:.*$/, "").trim();
  return { message, aadsts: /AADSTS\d+/.exec(text)?.[0] };
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
        serving: tokenStillValid ? "current token still valid" : "no valid token: requests get 503",
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

// ---------------------------------------------------------------- metrics

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
const DEPLOYMENT_PREFIX = "/openai/deployments/";
/** Azure deployment names: letters, digits, `-`, `_`, `.`, at most 64. Anything else is `other`. */
const DEPLOYMENT_NAME = /^[A-Za-z0-9._-]{1,64}$/;
/** Distinct model names kept as label values, bounded as deployments are. */
export const MAX_MODEL_LABELS = 50;
/** Model names as answers give them (`gpt-4o-2024-08-06`, `ft:gpt-4o-mini:org::id`), at most 128 characters. */
const MODEL_NAME = /^[A-Za-z0-9._:\/@+-]{1,128}$/;

/**
 * Every build counts. `make bench` alone compiles one with `--define
 * AUTH_PROXY_BENCH_UNCOUNTED=true`, the same code with the per-request
 * counting folded away, to measure what metrics and access lines cost
 * together (issue 8: at most 5 % of throughput).
 */
declare const AUTH_PROXY_BENCH_UNCOUNTED: boolean;
const COUNTED = typeof AUTH_PROXY_BENCH_UNCOUNTED === "undefined";

export type UpstreamErrorReason = "connect" | "tls" | "reset" | "client_abort" | "other";

interface Histogram {
  /** Per bucket, not cumulative; the last one is +Inf. */
  counts: Float64Array;
  sum: number;
  count: number;
}

/** One method and deployment: its status codes and its three timings. */
interface RequestSeries {
  method: string;
  deployment: string;
  codes: Map<number, number>;
  upstreamHeaders: Histogram;
  responseEnd: Histogram;
  firstByte: Histogram;
}

/** One deployment and model: the tokens its answers reported, by type (TOKEN_TYPES' order). */
interface TokenSeries {
  deployment: string;
  model: string;
  tokens: Float64Array;
}

/** The `type` label's values, in the order of TokenSeries.tokens and Usage's fields. */
const TOKEN_TYPES = ["input", "output", "cached_input", "reasoning"] as const;

export interface Metrics {
  /** deployment -> series per method index. */
  series: Map<string, (RequestSeries | undefined)[]>;
  /** The deployment names kept as label values, at most MAX_DEPLOYMENT_LABELS. */
  deployments: Set<string>;
  /** The deployment of the last request that named a kept one, checked first. */
  lastDeployment: string;
  /** `deployment` NUL `model` -> its token counts. */
  tokenSeries: Map<string, TokenSeries>;
  /** The model names kept as label values, at most MAX_MODEL_LABELS. */
  models: Set<string>;
  /** The series the last counted answer went to (its model kept as a label), checked first. */
  lastTokenSeries: TokenSeries | undefined;
  requestsInFlight: number;
  requestBytes: number;
  responseBytes: number;
  upstreamErrors: Record<UpstreamErrorReason, number>;
  websocketSessionsTotal: { completed: number; refused: number; failed: number };
  rateLimitRemainingRequests: number | undefined;
  rateLimitRemainingTokens: number | undefined;
  startTimeSeconds: number;
}

export function newMetrics(): Metrics {
  return {
    series: new Map(),
    deployments: new Set(),
    lastDeployment: "",
    tokenSeries: new Map(),
    models: new Set(),
    lastTokenSeries: undefined,
    requestsInFlight: 0,
    requestBytes: 0,
    responseBytes: 0,
    upstreamErrors: { connect: 0, tls: 0, reset: 0, client_abort: 0, other: 0 },
    websocketSessionsTotal: { completed: 0, refused: 0, failed: 0 },
    rateLimitRemainingRequests: undefined,
    rateLimitRemainingTokens: undefined,
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
function boundedLabel(kept: Set<string>, name: string, pattern: RegExp, max: number): string {
  if (kept.has(name)) return name;
  if (!pattern.test(name) || kept.size >= max) return "other";
  kept.add(name);
  return name;
}

/** Whether a path segment ends at `index`: a slash, the query, or the end of the target. */
function endsPathSegment(target: string, index: number): boolean {
  const code = target.charCodeAt(index);
  return code === 47 /* "/" */ || code === 63 /* "?" */ || index === target.length;
}

function newHistogram(): Histogram {
  return { counts: new Float64Array(DURATION_BUCKETS_SECONDS.length + 1), sum: 0, count: 0 };
}

/** The series every request shares in the benchmark's uncounted build. */
const UNCOUNTED_SERIES: RequestSeries = { method: "other", deployment: "", codes: new Map(), upstreamHeaders: newHistogram(), responseEnd: newHistogram(), firstByte: newHistogram() };

export function requestSeries(metrics: Metrics, method: string, deployment: string): RequestSeries {
  let byMethod = metrics.series.get(deployment);
  if (byMethod === undefined) {
    byMethod = new Array(METRIC_METHODS.length);
    metrics.series.set(deployment, byMethod);
  }
  const index = methodIndex(method);
  return (byMethod[index] ??= {
    method: METRIC_METHODS[index]!,
    deployment,
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

/** The rate-limit headers Azure OpenAI sends, kept as last seen. */
export function noteRateLimits(metrics: Metrics, headers: Headers): void {
  const requests = headers.get("x-ratelimit-remaining-requests");
  if (requests !== null) metrics.rateLimitRemainingRequests = Number(requests);
  const tokens = headers.get("x-ratelimit-remaining-tokens");
  if (tokens !== null) metrics.rateLimitRemainingTokens = Number(tokens);
}

const escapeLabel = (value: string) => value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");

function family(lines: string[], name: string, type: "counter" | "gauge" | "histogram", help: string): void {
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
function backendLines(lines: string[], routes: Route[]): void {
  if (routes.length === 0) return;
  const now = Date.now();
  const labels = (route: Route, backend: Backend) => `route="${escapeLabel(route.prefix)}",backend="${escapeLabel(backend.name)}"`;
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
  lines.push(`auth_proxy_held_request_body_bytes ${heldBodyBytes}`);
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

interface MetricsSources {
  metrics: Metrics;
  /** With a routes file or a pool: each backend's state and answers, each route's failovers. */
  routes: Route[];
  /** One per scope; with a routes file each carries a `scope` label. */
  tokens: TokenManager[];
  certificate: Credential | undefined;
  websocketSessionsOpen: number;
}

/** The whole exposition, families in a fixed order, each with HELP and TYPE. */
export function renderMetrics({ metrics, routes, tokens, certificate, websocketSessionsOpen }: MetricsSources): string {
  const lines: string[] = [];
  family(lines, "auth_proxy_build_info", "gauge", "auth-proxy's version and the Bun it runs on; always 1.");
  lines.push(`auth_proxy_build_info{version="${escapeLabel(VERSION)}",bun_version="${escapeLabel(Bun.version)}"} 1`);

  const allSeries = [...metrics.series.values()].flatMap((byMethod) => byMethod.filter((series) => series !== undefined));
  const labelsOf = (series: RequestSeries) => `method="${series.method}",deployment="${escapeLabel(series.deployment)}"`;
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
  const scoped = (manager: TokenManager, more = "") => (manager.labelled ? `{scope="${escapeLabel(manager.scope)}"${more ? `,${more}` : ""}}` : more ? `{${more}}` : "");
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
  family(lines, "auth_proxy_upstream_ratelimit_remaining", "gauge", "The upstream's x-ratelimit-remaining-requests and -tokens, as last seen.");
  if (metrics.rateLimitRemainingRequests !== undefined) lines.push(`auth_proxy_upstream_ratelimit_remaining{kind="requests"} ${metrics.rateLimitRemainingRequests}`);
  if (metrics.rateLimitRemainingTokens !== undefined) lines.push(`auth_proxy_upstream_ratelimit_remaining{kind="tokens"} ${metrics.rateLimitRemainingTokens}`);

  family(lines, "auth_proxy_model_tokens_total", "counter", "Tokens the answers' usage reported, by deployment, model and type (cached_input is part of input, reasoning part of output).");
  for (const series of metrics.tokenSeries.values()) {
    const labels = `deployment="${escapeLabel(series.deployment)}",model="${escapeLabel(series.model)}"`;
    for (let type = 0; type < TOKEN_TYPES.length; type += 1) lines.push(`auth_proxy_model_tokens_total{${labels},type="${TOKEN_TYPES[type]}"} ${series.tokens[type]}`);
  }

  backendLines(lines, routes.filter((route) => route.named || route.pooled));

  family(lines, "auth_proxy_log_lines_dropped_total", "counter", "Log lines dropped because stdout was closed or not read fast enough.");
  lines.push(`auth_proxy_log_lines_dropped_total ${logLinesDropped}`);

  processLines(lines, metrics);
  return `${lines.join("\n")}\n`;
}

// ---------------------------------------------------------------- caller keys

/**
 * Credentials a WebSocket client may carry where a browser lets it: the
 * openai SDK's browser client sends `api-key` (or `Authorization`) as a
 * query parameter and OpenAI keys as an `openai-insecure-api-key.<key>`
 * subprotocol. The proxy's bearer token replaces them; they never reach the upstream.
 */
const CREDENTIAL_QUERY_PARAMETERS = ["api-key", "authorization"];
const INSECURE_KEY_SUBPROTOCOL = "openai-insecure-api-key.";
/** Kubernetes updates a mounted Secret within a minute or two; a second's polling costs one stat. */
const CALLER_KEYS_FILE_POLL_MS = SECOND;

/**
 * The keys callers must present, kept as SHA-256 digests: comparing digests
 * of one length with timingSafeEqual, against every key without stopping at
 * a match, takes the same time whatever was presented.
 */
export class CallerKeys {
  private digests: Buffer[];
  private fileStamp: string;

  constructor(private readonly source: CallerKeySource) {
    this.digests = source.keys.map(digestOf);
    this.fileStamp = "file" in source ? fileStampOf(source.file) : "";
  }

  accepts(presented: string | undefined): boolean {
    const digest = digestOf(presented ?? "");
    let match = false;
    for (const known of this.digests) match = timingSafeEqual(digest, known) || match;
    return match && presented !== undefined && presented !== "";
  }

  /** A changed file (a Secret update swaps a symlink: new inode) is re-read; a broken one is logged and the last keys kept. */
  reloadIfChanged(): void {
    if (!("file" in this.source)) return;
    const stamp = fileStampOf(this.source.file);
    if (stamp === this.fileStamp) return;
    this.fileStamp = stamp;
    try {
      const keys = readCallerKeysFile(this.source.file);
      this.digests = keys.map(digestOf);
      log("info", "caller keys reloaded", { file: this.source.file, keys: keys.length });
    } catch (error) {
      log("error", "caller keys file unusable; keeping the last good keys", { error: errorMessage(error), keys: this.digests.length });
    }
  }
}

function digestOf(key: string): Buffer {
  return createHash("sha256").update(key).digest();
}

function fileStampOf(file: string): string {
  try {
    const stat = statSync(file);
    return `${stat.ino}:${stat.size}:${stat.mtimeMs}`;
  } catch {
    return "missing";
  }
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

// ---------------------------------------------------------------- routes

/**
 * A route as the hot path reads it, resolved once at start from its
 * RouteConfig: which targets it takes, its scope's token manager and its
 * backend. API_BASE_URL is the one route `/` with one backend.
 */
export interface Route {
  /** As configured (`/`, `/search`): the route's name in logs. */
  prefix: string;
  /** What a target starts with to be this route's: the prefix, or "" for `/`. */
  match: string;
  /** How many characters of the target are cut before it is appended to the backend's URL (strip_prefix). */
  stripLength: number;
  tokens: TokenManager;
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
export function buildRoutes(config: Pick<Config, "routes" | "routesFile">, identity: Identity, metrics: Metrics, env: Environment): Route[] {
  const managers = new Map<string, TokenManager>();
  const named = config.routesFile !== undefined;
  return config.routes
    .map((route) => {
      const tokens = managers.get(route.scope) ?? new TokenManager(identity, route.scope, named);
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

// ---------------------------------------------------------------- backend pools

export type FailoverReason = "throttled" | "server_error" | "unreachable";
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
let heldBodyBytes = 0;
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
function noteBackendAnswer(route: Route, backend: Backend, status: number | undefined, headers: Headers | undefined, nowMs: number): void {
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
function rest(route: Route, backend: Backend, reason: FailoverReason, ms: number, nowMs: number): void {
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

/** Where a connect check connects: the backend's host and port (with its TLS handshake), or the outbound proxy's. */
export interface ConnectAddress {
  hostname: string;
  port: number;
  tls: boolean;
}

export type ConnectCheck = "connected" | "timed_out" | "failed";

/**
 * A backend heard from within this long is taken as reachable; a request to
 * one that was not (new, idle, or gone dark) goes out while a connect check
 * runs beside it, and moves on if the check has not connected within the
 * backend's connect_timeout. Bun's fetch has no connect timeout and does
 * not say when its connection is made, so this is how a SYN-dropping
 * address is told from a model that thinks for minutes: under steady
 * traffic no check runs and the hot path pays one comparison.
 */
const REACHED_RECENTLY_MS = 5 * SECOND;

export function connectAddress(url: string, outboundProxy: string | undefined): ConnectAddress {
  const target = new URL(outboundProxy ?? url);
  const https = target.protocol === "https:";
  return { hostname: target.hostname.replace(/^\[|\]$/g, ""), port: Number(target.port) || (https ? 443 : 80), tls: https && outboundProxy === undefined };
}

/** The backend's connect check: one at a time, which every request sent to it meanwhile waits on. */
function checkConnect(backend: Backend): Promise<ConnectCheck> {
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
function connectTimedOut(backend: Backend): Error {
  return Object.assign(new Error(`no connection within ${backend.connectTimeoutMs / SECOND} s (connect_timeout)`), { code: "ConnectionTimeout" });
}

/** The path as this backend gets it: `/openai/deployments/<from>/` renamed `<to>` where its `deployments` say so. */
function backendPath(backend: Backend, path: string): string {
  if (backend.deployments === undefined || !path.startsWith(DEPLOYMENT_PREFIX)) return path;
  let end = DEPLOYMENT_PREFIX.length;
  while (end < path.length && !endsPathSegment(path, end)) end += 1;
  const renamed = backend.deployments.get(path.slice(DEPLOYMENT_PREFIX.length, end));
  return renamed === undefined ? path : DEPLOYMENT_PREFIX + renamed + path.slice(end);
}

/**
 * Every backend of the route rests, so nothing is forwarded: 429
 * `backends_throttled` while a throttled one is among them, else 503
 * `backends_unavailable`, each saying when the first backend, of any kind,
 * returns (Retry-After in whole seconds, rounded up, and `retry-after-ms`
 * as Azure writes it): a client told to wait for the throttled one would
 * wait past an unreachable one that came back.
 */
function restingAnswer(route: Route, nowMs: number): Response {
  const throttled = route.backends.filter((backend) => backend.restReason === "throttled" && backend.restsUntil > nowMs);
  const returns = Math.min(...route.backends.map((backend) => backend.restsUntil)) - nowMs;
  const headers = { "retry-after": String(Math.max(1, Math.ceil(returns / SECOND))), "retry-after-ms": String(Math.max(0, Math.ceil(returns))) };
  return throttled.length > 0
    ? proxyError(429, "backends_throttled", `every backend of route ${route.prefix} is throttled; the first returns in ${headers["retry-after"]} s`, headers)
    : proxyError(503, "backends_unavailable", `every backend of route ${route.prefix} is resting after failures; the first returns in ${headers["retry-after"]} s`, { "retry-after": headers["retry-after"] });
}

/** The distinct token managers of a route table, in the order of their first route. */
function tokenManagers(routes: Route[]): TokenManager[] {
  return [...new Set(routes.map((route) => route.tokens))];
}

// ---------------------------------------------------------------- token usage

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
const TOKENS_COUNTED = COUNTED && typeof AUTH_PROXY_BENCH_TOKENS_UNCOUNTED === "undefined";

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
function carry(scan: UsageScan, bytes: Uint8Array, from: number): void {
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
  scanUsageBytes(startUsageScan(wholeBodyScan, events), bytes);
  return scannedUsage(wholeBodyScan);
}

/** Server-sent events (`text/event-stream`) or JSON carry usage; undefined for other bodies (audio, images, files), which are not looked at. */
function usageEvents(headers: Headers): boolean | undefined {
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
function usageScanFor(headers: Headers): UsageScan | undefined {
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
function scanUsageChunk(scan: UsageScan, chunk: Uint8Array): void {
  if (scan.decoder === undefined) return scanUsageBytes(scan, chunk);
  scan.encodedBytes += chunk.byteLength;
  if (!scan.decoder.destroyed) scan.decoder.write(chunk.slice());
}

/** Resolves once a compressed body's decoder has scanned its last output (at once for a plain body). */
function usageScanned(scan: UsageScan): Promise<void> | undefined {
  const decoder = scan.decoder;
  if (decoder === undefined || decoder.destroyed) return undefined;
  return new Promise((resolve) => {
    decoder.once("end", resolve).once("error", resolve).once("close", resolve);
    decoder.end();
  });
}

/** The usage a finished scan found, with its model; a decoder still open is closed. */
function scannedUsage(scan: UsageScan): Usage | undefined {
  if (scan.decoder !== undefined && !scan.decoder.destroyed) scan.decoder.destroy();
  return scan.usage === undefined ? undefined : { model: scan.model, tokens: scan.usage };
}

/** Adds an answer's usage to `auth_proxy_model_tokens_total{deployment,model,type}`. */
export function countTokens(metrics: Metrics, deployment: string, usage: Usage): void {
  // An app mostly calls one deployment and model: the last series is checked before the key is built.
  let series = metrics.lastTokenSeries;
  if (series === undefined || series.model !== usage.model || series.deployment !== deployment) {
    const model = usage.model === "" ? "" : boundedLabel(metrics.models, usage.model, MODEL_NAME, MAX_MODEL_LABELS);
    const key = `${deployment}\0${model}`;
    series = metrics.tokenSeries.get(key);
    if (series === undefined) metrics.tokenSeries.set(key, (series = { deployment, model, tokens: new Float64Array(TOKEN_TYPES.length) }));
    if (model === usage.model) metrics.lastTokenSeries = series;
  }
  for (let type = 0; type < TOKEN_TYPES.length; type += 1) if (usage.tokens[type]! > 0) series.tokens[type]! += usage.tokens[type]!;
}

// ---------------------------------------------------------------- forwarding

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
 * Bun.serve closes a request that has not finished within its idle timeout
 * (10 s by default, oven-sh/bun#13392), however busy its response: writes
 * do not reset the timer (measured). This value reaps idle keep-alive
 * connections and is longer than client pools keep theirs (httpx 5 s, Node
 * agents 4-15 s) so a client never reuses a socket the proxy is closing.
 */
export const KEEP_ALIVE_IDLE_SECONDS = 75;
/**
 * A forwarded request still waiting after this has the timer lifted
 * (`server.timeout(req, 0)`), well before it would fire. Lifting every
 * request at once would cost nothing more, but the lift stays on the
 * socket after the response (measured: such connections were never
 * reaped), so it is undone when the body ends, which costs a body relay.
 */
const LIFT_IDLE_TIMER_AFTER_MS = 30 * SECOND;
/** A body this small with a Content-Length is taken whole (`smallBodyAnswered`): it needs neither the lift nor the relay. */
const SMALL_BODY_BYTES = 64 * 1024;

function liftIdleTimer(server: ProxyServer, req: Request): void {
  server.timeout(req, 0);
}

/** Whether the lift may have fired for a request started at `startedAt`: a second's margin covers a timer that ran late. */
function idleTimerLifted(startedAt: number, nowMs: number): boolean {
  return nowMs - startedAt >= LIFT_IDLE_TIMER_AFTER_MS - SECOND;
}

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

/** The target as its route's backend gets it: the prefix cut unless strip_prefix is false; the rest byte for byte. */
function forwardedPath(route: Route, target: string): string {
  return route.stripLength === 0 ? target : target.slice(route.stripLength);
}

/** What a request's attempts came to. */
interface Attempts {
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
function idempotent(method: string): boolean {
  return method === "GET" || method === "HEAD" || method === "PUT" || method === "DELETE" || method === "OPTIONS";
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
        const aborted = req.signal.aborted;
        const reason = upstreamErrorReason(error, aborted);
        route.metrics.upstreamErrors[reason] += 1;
        if (!aborted) {
          log("warn", "upstream unreachable", { upstream: backend.origin, error: errorMessage(error) });
          noteBackendAnswer(route, backend, undefined, undefined, Date.now());
        }
        last = { response: undefined, error, backend, count: last.count + 1, tried: names };
        movingOn = aborted ? undefined : reason === "connect" || reason === "tls" || idempotent(method) ? "unreachable" : undefined;
      }
      if (movingOn === undefined || !replayable) return attemptsOutcome(last, throttled);
    }
  } finally {
    if (held instanceof Uint8Array) heldBodyBytes -= held.byteLength;
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
    const response = await fetch(url, {
      method,
      headers: req.headers,
      body,
      // A disconnected client aborts the upstream request (oven-sh/bun#25919).
      signal: connectDeadline === undefined ? req.signal : AbortSignal.any([req.signal, connectDeadline.signal]),
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
    answered = true;
    return response;
  } catch (error) {
    throw connectDeadline?.signal.aborted && !req.signal.aborted ? connectTimedOut(backend) : error;
  }
}

/**
 * What the client gets when the attempts end: the last answer, unless it is
 * a reason to move on (or none) and a backend answered 429 before it; then
 * that 429, the backend that returns first, with every attempt counted.
 */
function attemptsOutcome(last: Attempts, throttled: Attempts | undefined): Attempts {
  if (throttled === undefined || throttled === last) return last;
  if (last.response !== undefined && failoverReason(last.response.status) === undefined) {
    void throttled.response!.body?.cancel().catch(() => {});
    return last;
  }
  void last.response?.body?.cancel().catch(() => {});
  return { ...throttled, count: last.count, tried: last.tried };
}

/** A pooled request's body: `null` for none, bytes held to be sent again, a stream for one backend (undefined: the request's own), or STALLED. */
type HeldBody = Uint8Array | null | ReadableStream<Uint8Array> | undefined | typeof STALLED;
const STALLED = Symbol("stalled");
type BodyReader = Pick<ReadableStreamDefaultReader<Uint8Array>, "read" | "cancel">;

/**
 * The body as bytes to send to each backend asked, when it may be held:
 * none, or a Content-Length within MAX_REPLAY_BODY_BYTES while the budget
 * has room; undefined (or a stream) for a body that goes to one backend.
 * An upload that sends nothing for the keep-alive idle time is STALLED:
 * its hold is released and it is answered 408.
 */
async function holdBody(req: Request, bytesIn: number): Promise<HeldBody> {
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

/** No answer to pass on: the client left (499), every backend rests (429/503), or the last one could not be reached (502). */
function unanswered(req: Request, method: string, target: string, route: Route, attempts: Attempts, startedAt: number, series: RequestSeries | undefined, server: ProxyServer): Response {
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
function stalledUpload(method: string, target: string, route: Route, startedAt: number, series: RequestSeries): Response {
  answered(route.metrics, method, target, 408, startedAt, series, route);
  return proxyError(408, "request_body_stalled", `the request body sent nothing for ${KEEP_ALIVE_IDLE_SECONDS} s`, { connection: "close" });
}

/** One forwarded request, the whole hot path: rewrite headers, send to the route's backends, strip the response's hop-by-hop headers, count, relay. */
async function forward(req: Request, method: string, target: string, authorization: string, route: Route, server: ProxyServer): Promise<Response> {
  const startedAt = performance.now();
  const metrics = route.metrics;
  const path = forwardedPath(route, target);
  // Taken now, while the target's characters are fresh: read after the fetch, the first touch alone cost 160-200 ns (measured in place).
  const series = COUNTED ? requestSeries(metrics, method, deploymentLabel(metrics, path)) : UNCOUNTED_SERIES;
  const lift = setTimeout(liftIdleTimer, LIFT_IDLE_TIMER_AFTER_MS, server, req);
  // Counted as declared: measuring a chunked upload would mean relaying every request body through JavaScript.
  const bytesIn = Number(req.headers.get("content-length")) || 0;
  const clientRequestId = accessLogEnabled ? req.headers.get("x-ms-client-request-id") : null;
  rewriteRequestHeaders(req.headers, authorization);
  collectOnBurst((metrics.requestsInFlight += 1));
  const held = route.pooled ? await holdBody(req, bytesIn) : undefined;
  if (held === STALLED) {
    clearTimeout(lift);
    metrics.requestsInFlight -= 1;
    return stalledUpload(method, target, route, startedAt, series);
  }
  const attempts = await sendToBackends(req, method, path, route, held);
  const response = attempts.response;
  if (response === undefined) {
    clearTimeout(lift);
    metrics.requestsInFlight -= 1;
    return unanswered(req, method, target, route, attempts, startedAt, series, server);
  }
  clearTimeout(lift);
  const headersAt = performance.now();
  if (response.status === 401) route.tokens.refreshAfterUnauthorized();
  const headers = response.headers;
  removeHopByHopHeaders(headers);
  if (COUNTED) noteRateLimits(metrics, headers);
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

type ProxyServer = import("bun").Server<RelaySession>;

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
  if (TOKENS_COUNTED) {
    if (exchange.usageScan !== undefined) exchange.usage = scannedUsage(exchange.usageScan);
    if (exchange.usage !== undefined) countTokens(metrics, series.deployment, exchange.usage);
  }
  if (!accessLogEnabled) return;
  exchange.status = status;
  exchange.end = how;
  endedExchanges.push(exchange);
  scheduleFlush();
}

/** Encodes the access lines waiting in `endedExchanges`, in the order their exchanges ended. */
function writeAccessLines(): void {
  for (let i = 0; i < endedExchanges.length; i += 1) writeAccessLine(endedExchanges[i]!);
  endedExchanges.length = 0;
}

function writeAccessLine(exchange: Exchange): void {
  const { method, target, route, backend, startedAt, endedAt, status, series, requestId, clientRequestId, usage, end: how } = exchange;
  const textLength = method.length + target.length + route.prefix.length + exchange.tried.length + (requestId?.length ?? 0) + (clientRequestId?.length ?? 0) + (usage?.model.length ?? 0);
  if (!reserveLog(ACCESS_LINE_BYTES + 6 * textLength)) return;
  putAccessLineHead(method, target, status, startedAt, endedAt);
  putRouteFields(route, backend.name, exchange.attempts, exchange.tried);
  putMillisField(UPSTREAM_MS, exchange.headersAt - startedAt);
  if (exchange.firstByteAt !== 0) putMillisField(TTFB_MS, exchange.firstByteAt - startedAt);
  putIntegerField(BYTES_IN, exchange.bytesIn);
  putIntegerField(BYTES_OUT, exchange.bytesOut);
  if (series.deployment !== "") putStringField(DEPLOYMENT, series.deployment);
  if (usage !== undefined) putUsageFields(usage);
  if (requestId !== null) putStringField(REQUEST_ID, requestId);
  if (clientRequestId !== null) putStringField(CLIENT_REQUEST_ID, clientRequestId);
  putBytes(how === "aborted" ? ABORTED_END : how === "truncated" ? TRUNCATED_END : LINE_END);
}


/** The path without its query: queries can carry data the operator did not mean to log. */
function pathOf(target: string): string {
  return target.slice(0, pathEnd(target));
}

/** Where the target's path ends: at its query, if it has one. */
function pathEnd(target: string): number {
  const queryStart = target.indexOf("?");
  return queryStart === -1 ? target.length : queryStart;
}

let accessLogEnabled = true;

/**
 * A request the proxy answered itself (401, 405, 499, 502, 503...): counted
 * and given its access line at once; one that reached a route names it, and
 * the backends it tried.
 */
function answered(metrics: Metrics, method: string, target: string, status: number, startedAt: number, series = requestSeries(metrics, method, deploymentLabel(metrics, target)), route?: Route, attempts?: Attempts): void {
  countStatus(series, status);
  if (!accessLogEnabled) return;
  const tried = attempts?.tried ?? "";
  if (!reserveLine(ACCESS_LINE_BYTES + 6 * (method.length + target.length + (route?.prefix.length ?? 0) + tried.length))) return;
  putAccessLineHead(method, target, status, startedAt, performance.now());
  if (route !== undefined) putRouteFields(route, attempts?.backend?.name, attempts?.count ?? 0, tried);
  putBytes(LINE_END);
}

/**
 * With a routes file or a pool: the route, the backend whose answer the
 * client got (when one did), the attempts, and when there were several
 * (or none answered), the backends tried in order.
 */
function putRouteFields(route: Route, backend: string | undefined, attempts: number, tried: string): void {
  if (!route.named && !route.pooled) return;
  if (route.named) putStringField(ROUTE, route.prefix);
  if (backend !== undefined) putStringField(BACKEND, backend);
  putIntegerField(ATTEMPTS, attempts);
  if (attempts > 1 || (backend === undefined && attempts > 0)) putStringField(TRIED, tried);
}

/** An access line's fixed fields, numbers, time and deployment at their longest (under 500 bytes); each other text field adds six bytes a character at most. */
const ACCESS_LINE_BYTES = 640;
const LINE_START = asciiBytes('{"time":');
const LINE_METHOD = asciiBytes(',"level":"info","msg":"request","method":');
const LINE_PATH = asciiBytes(',"path":');
const LINE_STATUS = asciiBytes(',"status":');
const DURATION_MS = asciiBytes(',"duration_ms":');
const UPSTREAM_MS = asciiBytes(',"upstream_ms":');
const TTFB_MS = asciiBytes(',"ttfb_ms":');
const BYTES_IN = asciiBytes(',"bytes_in":');
const BYTES_OUT = asciiBytes(',"bytes_out":');
const DEPLOYMENT = asciiBytes(',"deployment":');
const ROUTE = asciiBytes(',"route":');
const BACKEND = asciiBytes(',"backend":');
const ATTEMPTS = asciiBytes(',"attempts":');
const TRIED = asciiBytes(',"tried":');
const REQUEST_ID = asciiBytes(',"request_id":');
const CLIENT_REQUEST_ID = asciiBytes(',"client_request_id":');
const USAGE_FIELDS = [',"input_tokens":', ',"output_tokens":', ',"cached_input_tokens":', ',"reasoning_tokens":'].map(asciiBytes);
const MODEL = asciiBytes(',"model":');
const LINE_END = asciiBytes("}\n");
const ABORTED_END = asciiBytes(',"aborted":true}\n');
const TRUNCATED_END = asciiBytes(',"truncated":true}\n');

/** The answer's model and the token counts its usage gave. */
function putUsageFields(usage: Usage): void {
  if (usage.model !== "") putStringField(MODEL, usage.model);
  for (let type = 0; type < USAGE_FIELDS.length; type += 1) if (usage.tokens[type]! >= 0) putIntegerField(USAGE_FIELDS[type]!, usage.tokens[type]!);
}

/**
 * The fields every access line starts with (room reserved by the caller).
 * The path goes without its query: queries can carry data the operator did
 * not mean to log.
 */
function putAccessLineHead(method: string, target: string, status: number, startedAt: number, endedAt: number): void {
  putStringField(LINE_START, isoNow(endedAt));
  putStringField(LINE_METHOD, method);
  putStringField(LINE_PATH, target, pathEnd(target));
  putIntegerField(LINE_STATUS, status);
  putMillisField(DURATION_MS, endedAt - startedAt);
}

// ---------------------------------------------------------------- WebSocket relay

/**
 * Handshake headers that belong to each hop (RFC 6455 section 4): the
 * proxy's own client negotiates its key, version and extensions with the
 * upstream, and the subprotocols go through the client's `protocols`.
 */
const WEBSOCKET_HANDSHAKE_HEADERS = ["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol", "sec-websocket-accept"];

/** A client frame larger than this closes its session with 1009; realtime audio frames are far smaller. */
const MAX_WEBSOCKET_FRAME_BYTES = 64 * 1024 * 1024;
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

/** `ws:`/`wss:` from API_BASE_URL's scheme, with the same prefix rule as HTTP forwarding. */
export function websocketBaseUrl(apiBaseUrl: string): string {
  return apiBaseUrl.startsWith("https:") ? `wss:${apiBaseUrl.slice(6)}` : `ws:${apiBaseUrl.slice(5)}`;
}

/**
 * fetch follows HTTPS_PROXY/HTTP_PROXY and NO_PROXY, but Bun's WebSocket
 * client ignores them (measured on 1.4.5), so the relay is given the same
 * choice explicitly: curl's rules, with NO_PROXY entries matching the host
 * or a domain suffix, an optional port, and `*` for every host.
 */
export function outboundProxyFor(apiBaseUrl: string, env: Environment): string | undefined {
  const url = new URL(apiBaseUrl);
  const proxy = url.protocol === "https:" ? env.HTTPS_PROXY || env.https_proxy : env.HTTP_PROXY || env.http_proxy;
  if (!proxy) return undefined;
  const host = url.hostname.replace(/^\[|\]$/g, "").toLowerCase();
  const port = url.port || (url.protocol === "https:" ? "443" : "80");
  for (const raw of (env.NO_PROXY || env.no_proxy || "").split(",")) {
    const entry = raw.trim().toLowerCase();
    if (entry === "*") return undefined;
    const [, name = "", entryPort] = /^\[?([^\]]*?)\]?(?::(\d+))?$/.exec(entry) ?? [];
    if (!name || (entryPort && entryPort !== port)) continue;
    const domain = name.replace(/^\*?\./, "");
    if (host === domain || host.endsWith(`.${domain}`)) return undefined;
  }
  return proxy;
}

/** An outbound proxy as logs may name it: host and port, never its credentials. */
export function proxyAddress(proxy: string): string {
  try {
    return new URL(proxy).host;
  } catch {
    return "(unparsable proxy URL)";
  }
}

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
  /** The deployment label its tokens are counted under, from the path or the `deployment` query parameter. */
  deployment: string;
  /** The model `session.created` named, and the tokens of the session's responses so far (-1: none said). */
  model: string;
  tokens: Usage["tokens"];
}

type ServerWebSocket<T> = import("bun").ServerWebSocket<T>;

interface Relay {
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
async function relayWebSocket(
  req: Request,
  server: ProxyServer,
  target: string,
  authorization: string,
  route: Route,
  relay: Relay,
): Promise<Response | undefined> {
  const startedAt = performance.now();
  const protocols = upstreamSubprotocols(req.headers.get("sec-websocket-protocol"));
  const fault = handshakeFault(req, protocols);
  if (fault !== undefined) return badHandshake(req, target, fault, startedAt, route);
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
    if (backend === undefined && refused !== undefined) return refusedHandshake(req, target, refused.handshake, refused.failure, startedAt, route);
    if (backend === undefined) return unanswered(req, req.method, target, route, { response: undefined, error: undefined, backend: undefined, count: 0, tried: "" }, startedAt, undefined, server);
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
      return badHandshake(req, target, errorMessage(error), startedAt, route);
    }
    session = newSession(socket, target, deployment, startedAt, relay);
    const failure = await upstreamHandshake(socket, req.signal);
    if (failure === undefined) break;
    const status = refusalStatus(failure);
    if (!req.signal.aborted) noteBackendAnswer(route, backend, status, new Headers(), Date.now());
    refused = { handshake: { url, headers, origin: backend.origin }, failure, reason: status === undefined ? "unreachable" : failoverReason(status) };
    if (refused.reason === undefined || !route.pooled) return refusedHandshake(req, target, refused.handshake, failure, startedAt, route);
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
  countTokens(session.metrics, session.deployment, { model: session.model, tokens });
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
function newSession(socket: WebSocket, target: string, deployment: string, startedAt: number, relay: Relay): RelaySession {
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
    deployment,
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

function badHandshake(req: Request, target: string, fault: string, startedAt: number, route: Route): Response {
  answered(route.metrics, req.method, target, 400, startedAt);
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
async function refusedHandshake(req: Request, target: string, handshake: UpstreamHandshake, failure: string, startedAt: number, route: Route): Promise<Response> {
  const metrics = route.metrics;
  if (req.signal.aborted) {
    answered(metrics, req.method, target, 499, startedAt);
    return new Response(null, { status: 499 });
  }
  const status = refusalStatus(failure);
  if (status !== undefined) {
    if (status === 401) route.tokens.refreshAfterUnauthorized();
    metrics.websocketSessionsTotal.refused += 1;
    const refusal = (await upstreamRefusal(handshake, status, req.signal)) ??
      proxyError(status, "upstream_refused_websocket", `the upstream refused the WebSocket handshake with HTTP ${status}`);
    answered(metrics, req.method, target, status, startedAt);
    return refusal;
  }
  const reason = failure.replace(/^WebSocket connection to '[^']*' failed: /, "");
  log("warn", "upstream unreachable", { upstream: handshake.origin, error: reason });
  metrics.websocketSessionsTotal.failed += 1;
  metrics.upstreamErrors[upstreamErrorReason({ message: reason }, false)] += 1;
  answered(metrics, req.method, target, 502, startedAt);
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

function clientOpened(client: ServerWebSocket<RelaySession>): void {
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

function clientDrained(client: ServerWebSocket<RelaySession>): void {
  client.data.upstream.resume();
}

/**
 * Client to upstream. Bun's client WebSocket has no drain event, so when
 * its unsent bytes pass the high mark the client is paused and the buffer
 * polled until it falls below the low mark.
 */
function relayToUpstream(client: ServerWebSocket<RelaySession>, frame: Frame): void {
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

function clientClosed(client: ServerWebSocket<RelaySession>, code: number, reason: string, relay: Relay): void {
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
function closeBoth(session: RelaySession, code: number, reason: string): void {
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

// ---------------------------------------------------------------- server and lifecycle

const FORCED_STOP_GRACE_MS = 1000;
const JSON_HEADERS = { "content-type": "application/json" };

const METRICS_HEADERS = { "content-type": "text/plain; version=0.0.4; charset=utf-8" };

export interface RunningProxy {
  server: ReturnType<typeof Bun.serve>;
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

export function startProxy(config: Config, identity: Identity): RunningProxy {
  const metrics = newMetrics();
  const routes = buildRoutes(config, identity, metrics, process.env);
  const tokens = tokenManagers(routes);
  const relay: Relay = { sessions: new Set(), metrics, onIdle: undefined };
  const callerKeys = config.callerKeys === undefined ? undefined : new CallerKeys(config.callerKeys);
  const callerKeysPoll = callerKeys === undefined ? undefined : setInterval(() => callerKeys.reloadIfChanged(), CALLER_KEYS_FILE_POLL_MS);
  callerKeysPoll?.unref();
  let draining = false;

  /** Why a scope has no token; with several scopes, which one it is. */
  function tokenUnavailableReason(manager: TokenManager): string {
    return tokens.length > 1 ? `no token for ${manager.scope}: ${manager.unavailableReason()}` : manager.unavailableReason();
  }

  /** Ready only while every scope's token is held: each route without one would answer 503. */
  function health(method: string): Response {
    const now = Date.now();
    const missing = tokens.filter((manager) => manager.usable(now) === undefined);
    const reason = draining ? "shutting down" : missing.length === 0 ? undefined : missing.map(tokenUnavailableReason).join("; ");
    const body = reason === undefined ? '{"status":"ok"}' : JSON.stringify({ status: "unavailable", reason });
    return new Response(method === "HEAD" ? null : body, { status: reason === undefined ? 200 : 503, headers: JSON_HEADERS });
  }

  function live(method: string): Response {
    return new Response(method === "HEAD" ? null : '{"status":"ok"}', { headers: JSON_HEADERS });
  }

  function metricsPage(method: string): Response {
    const text = renderMetrics({ metrics, routes, tokens, certificate: identity.certificate, websocketSessionsOpen: relay.sessions.size });
    return new Response(method === "HEAD" ? null : text, { headers: METRICS_HEADERS });
  }

  /** /health, /live and /metrics, exact paths, GET or HEAD: the proxy's own, on both listeners. */
  function ownEndpoint(method: string, target: string): Response | undefined {
    if (target.length > 8 || (method !== "GET" && method !== "HEAD")) return undefined;
    if (target === "/health") return health(method);
    if (target === "/live") return live(method);
    if (target === "/metrics") return metricsPage(method);
    return undefined;
  }

  const server = listen(`${config.host}:${config.port}`, () => Bun.serve<RelaySession>({
    hostname: config.host,
    port: config.port,
    idleTimeout: KEEP_ALIVE_IDLE_SECONDS,
    // Bun refuses bodies over 128 MB by default; the upstream decides what it accepts.
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    development: false,
    fetch(req, server) {
      const method = req.method;
      const target = requestTarget(req.url);
      const own = ownEndpoint(method, target);
      if (own !== undefined) return own;
      // A reverse proxy, not a tunnel: CONNECT would ask it to open a socket to any host, TRACE echoes the request (and its keys).
      if (method === "CONNECT" || method === "TRACE") {
        answered(metrics, method, target, 405, performance.now());
        return proxyError(405, "method_not_allowed", `auth-proxy is a reverse proxy; it does not forward ${method}`, {
          allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
          connection: "close",
        });
      }
      if (draining) {
        answered(metrics, method, target, 503, performance.now());
        return proxyError(503, "shutting_down", "auth-proxy is shutting down", { connection: "close", "retry-after": "1" });
      }
      if (callerKeys !== undefined && !callerKeys.accepts(presentedCallerKey(req.headers, target))) {
        answered(metrics, method, target, 401, performance.now());
        return proxyError(401, "invalid_api_key", "auth-proxy requires a valid caller key (PROXY_API_KEYS) in the api-key header or as Authorization: Bearer <key>", {
          "www-authenticate": 'Bearer realm="auth-proxy"',
        });
      }
      const route = matchRoute(routes, target);
      if (route === undefined) {
        answered(metrics, method, target, 404, performance.now());
        return proxyError(404, "no_route", `no route of ${config.routesFile} takes ${pathOf(target)}`);
      }
      const now = Date.now();
      const token = route.tokens.usable(now);
      if (token === undefined) {
        answered(metrics, method, target, 503, performance.now());
        return proxyError(503, "token_unavailable", `auth-proxy holds no valid Azure AD token: ${tokenUnavailableReason(route.tokens)}`, {
          "retry-after": String(route.tokens.retryAfterSeconds(now)),
        });
      }
      if (isWebSocketUpgrade(req.headers)) return relayWebSocket(req, server, target, token.authorization, route, relay);
      return forward(req, method, target, token.authorization, route, server);
    },
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
  }));

  // kubelet's httpGet probes and Prometheus reach the pod IP while the proxy itself stays on 127.0.0.1.
  const admin =
    config.adminPort === undefined
      ? undefined
      : listen(`ADMIN_HOST:ADMIN_PORT ${config.adminHost}:${config.adminPort}`, () =>
          Bun.serve({
            hostname: config.adminHost,
            port: config.adminPort,
            idleTimeout: KEEP_ALIVE_IDLE_SECONDS,
            development: false,
            fetch(req) {
              return ownEndpoint(req.method, requestTarget(req.url)) ?? proxyError(404, "not_found", "the admin listener serves only /health, /live and /metrics");
            },
          }),
        );

  let stopped: Promise<void> | undefined;

  /**
   * A second signal during the drain (kubelet's preStop and its own
   * SIGTERM, a Ctrl-C reaching a wrapper and the proxy) is ignored: it gets
   * the first drain's promise, so the deadline still holds.
   */
  function shutdown(signal: string): Promise<void> {
    if (stopped !== undefined) {
      log("info", "signal ignored: already shutting down", { signal });
      return stopped;
    }
    return (stopped = drain(signal));
  }

  async function drain(signal: string): Promise<void> {
    draining = true;
    log("info", "shutting down", { signal, shutdown_timeout_s: config.shutdownTimeoutMs / SECOND });
    for (const manager of tokens) manager.stop();
    clearInterval(certificateWatch);
    clearInterval(callerKeysPoll);
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
    admin?.stop(true);
    log("info", "stopped", { drained: clean });
  }

  for (const manager of tokens) manager.start();
  const certificateWatch = watchCertificateExpiry(identity);
  return { server, admin, shutdown };
}

// ---------------------------------------------------------------- main

const HELP = `auth-proxy ${VERSION}
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
  --admin-port <n>          ADMIN_PORT               second listener for /health, /live, /metrics only (none)
  --admin-host <addr>       ADMIN_HOST               its address (0.0.0.0)
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
  NODE_EXTRA_CA_CERTS, HTTPS_PROXY, NO_PROXY  as usual

Endpoints: /health (200 with a valid token, else 503), /live, /metrics (Prometheus); everything else is forwarded,
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

/** With a routes file: each route's prefix, scope and backends' origins, for the startup line and --check. */
function routesSummary(config: Config): Record<string, unknown> {
  if (config.routesFile === undefined) {
    const backends = config.routes[0]!.backends;
    return { upstream: backends[0]!.origin, backends: backends.length > 1 ? backends.map((backend) => backend.url) : undefined };
  }
  return {
    routes_file: config.routesFile,
    routes: config.routes.map((route) => ({ prefix: route.prefix, scope: route.scope, backends: route.backends.map((backend) => backend.origin) })),
  };
}

/** One token for every distinct scope, in the order of their first route: all must come, as /health requires. */
async function check(config: Config, identity: Identity): Promise<never> {
  const scopes = [...new Set(config.routes.map((route) => route.scope))];
  let scope = scopes[0]!;
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
  logThreshold = LOG_LEVEL_RANK[config.logLevel];
  accessLogEnabled = logThreshold <= LOG_LEVEL_RANK.info;

  // Before the credential is read: the process that replaces this one reads it again.
  if (!flags["--check"]) reexecWithFetchConcurrencyLimit();
  let identity: Identity;
  try {
    identity = createIdentity(config);
  } catch (error) {
    fail([errorMessage(error)]);
  }
  if (flags["--check"]) return check(config, identity);
  openLogOutput();

  let proxy: RunningProxy;
  try {
    proxy = startProxy(config, identity);
  } catch (error) {
    fail([errorMessage(error)]);
  }
  // As PID 1 in a container a process without handlers ignores SIGTERM: install them as soon as there is something to drain.
  for (const signal of ["SIGTERM", "SIGINT"] as const) {
    process.on(signal, () => void proxy.shutdown(signal).then(() => process.exit(0)));
  }
  log("info", "auth-proxy started", {
    version: VERSION,
    listen: `${config.host}:${proxy.server.port}`,
    ...routesSummary(config),
    ...identitySummary(config, identity),
    ...outboundProxySummary(config),
    admin_listen: proxy.admin === undefined ? undefined : `${config.adminHost}:${proxy.admin.port}`,
    caller_keys: config.callerKeys === undefined ? "off" : "file" in config.callerKeys ? "PROXY_API_KEYS_FILE" : "PROXY_API_KEYS",
  });
  for (const backend of config.routes.flatMap((route) => route.backends)) {
    if (backend.url.startsWith("http:") && !/^http:\/\/(localhost|127\.|\[::1\])/.test(backend.url)) {
      log("warn", `${config.routesFile === undefined ? "API_BASE_URL" : `backend ${backend.origin}`} is plain http: the bearer token crosses the network unencrypted`);
    }
  }
}

if (import.meta.main) void main(process.argv.slice(2));
