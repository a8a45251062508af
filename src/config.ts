/**
 * Configuration: the settings table (each variable, its flag, alias and
 * default), the environment and flags read into a Config with every fault
 * reported at once, the identity mode chosen, API_BASE_URL and the routes
 * file parsed and validated (RouteConfig, BackendConfig), caller key
 * sources, the outbound proxy (HTTPS_PROXY/NO_PROXY) a URL takes.
 *
 * Imports: log.
 */
import { readFileSync, statSync } from "node:fs";
import packageJson from "../package.json" with { type: "json" };
import { errorMessage, LOG_LEVEL_RANK, type LogLevel, SECOND, unreadableReason } from "./log.ts";

/** Set by `make build` (bun build --define); absent under `bun proxy.ts`. */
declare const AUTH_PROXY_COMMIT: string | undefined;

export const VERSION =
  packageJson.version + (typeof AUTH_PROXY_COMMIT === "string" && AUTH_PROXY_COMMIT ? `+${AUTH_PROXY_COMMIT}` : "");

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
  /** What named the routes and callers files (`AUTH_PROXY_ROUTES` or `--routes`...), for messages. */
  routesFileSource: string;
  callersFileSource: string;
  /** AUTH_PROXY_CONNECT_TIMEOUT: the connect bound of a backend that names none (a reloaded routes file's too). */
  defaultConnectTimeoutMs: number;
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
  /** AUTH_PROXY_CALLERS: the named callers' file (src/callers.ts reads it). */
  callersFile: string | undefined;
  /** AUTH_PROXY_AUDIENCE: the `aud` Entra callers' tokens must carry. */
  audience: string | undefined;
  /** AUTH_PROXY_CALLER: the one app behind a sidecar, named without a credential. */
  callerName: string | undefined;
  /** ADMIN_PORT: a second listener for /health, /ready, /live and /metrics only (kubelet and Prometheus reach the pod IP). */
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
  callersFile: { env: "AUTH_PROXY_CALLERS", flag: "--callers" },
  audience: { env: "AUTH_PROXY_AUDIENCE", flag: "--audience" },
  callerName: { env: "AUTH_PROXY_CALLER", flag: "--caller" },
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

export type Environment = Record<string, string | undefined>;

interface RawSetting {
  value: string | undefined;
  /** `AZURE_CLIENT_ID` or `--client-id`: what to name in an error. */
  source: string;
}

export function readSetting(name: SettingName, env: Environment, flags: Flags): RawSetting {
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
  identityFaults(raw, mode, reason, errors);
  const { clientId, tenantId } = raw;
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
  const routes = routeSettings(raw, apiBases, errors);

  const logLevel = raw.logLevel.value!.toLowerCase();
  if (!(logLevel in LOG_LEVEL_RANK)) errors.push(`${raw.logLevel.source}=${raw.logLevel.value} must be one of debug, info, warn, error`);

  const sendChain = BOOLEAN_WORDS[raw.sendCertificateChain.value!.toLowerCase()];
  if (sendChain === undefined) errors.push(`${raw.sendCertificateChain.source}=${raw.sendCertificateChain.value} must be true or false`);

  const shutdownTimeout = Number(raw.shutdownTimeout.value);
  if (!Number.isFinite(shutdownTimeout) || shutdownTimeout < 0) {
    errors.push(`${raw.shutdownTimeout.source}=${raw.shutdownTimeout.value} must be a number of seconds, 0 or more`);
  }

  const callerKeys = loadCallerKeySource(raw.callerKeys, raw.callerKeysFile, errors);
  if (raw.callersFile.value && (raw.callerKeys.value || raw.callerKeysFile.value)) {
    errors.push(`set ${raw.callersFile.source} or ${raw.callerKeys.value ? "PROXY_API_KEYS" : "PROXY_API_KEYS_FILE"}, not both: the callers file names every caller and its keys`);
  }
  const adminPort = adminPortSetting(raw, port, errors);

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
      routesFileSource: raw.routesFile.source,
      callersFileSource: raw.callersFile.source,
      defaultConnectTimeoutMs: connectTimeout(raw.connectTimeout.value, raw.connectTimeout.source, []) ?? DEFAULT_CONNECT_TIMEOUT_MS,
      host: raw.host.value!,
      port,
      scope: raw.scope.value!,
      authorityHost: authority!.origin,
      logLevel: logLevel as LogLevel,
      shutdownTimeoutMs: shutdownTimeout * 1000,
      callerKeys,
      callersFile: raw.callersFile.value,
      audience: raw.audience.value,
      callerName: raw.callerName.value,
      adminPort,
      adminHost: raw.adminHost.value!,
    },
  };
}

/**
 * Azure services whose tokens are for a resource of their own: a route in
 * front of one with another scope gets a token the service refuses (401 on
 * every request). Public cloud hosts; a backend's own origin as the
 * resource is accepted too (Storage takes `https://<account>.blob.core.windows.net/.default`).
 */
const AZURE_SERVICE_SCOPES: { host: RegExp; service: string; scopes: string[] }[] = [
  { host: /\.search\.windows\.net$/, service: "Azure AI Search", scopes: ["https://search.azure.com/.default"] },
  { host: /\.(blob|queue|table|file|dfs)\.core\.windows\.net$/, service: "Azure Storage", scopes: ["https://storage.azure.com/.default"] },
  { host: /\.vault\.azure\.net$/, service: "Azure Key Vault", scopes: ["https://vault.azure.net/.default"] },
  { host: /^management\.azure\.com$/, service: "Azure Resource Manager", scopes: ["https://management.azure.com/.default", "https://management.core.windows.net/.default"] },
  { host: /^graph\.microsoft\.com$/, service: "Microsoft Graph", scopes: ["https://graph.microsoft.com/.default"] },
  { host: /\.(openai|cognitiveservices|services\.ai)\.azure\.com$/, service: "Azure OpenAI (Azure AI Foundry)", scopes: ["https://cognitiveservices.azure.com/.default", "https://ai.azure.com/.default"] },
];

/**
 * What is allowed but almost surely wrong, as warn lines for the start and
 * --check: a scope the backend's service refuses, a base URL that doubles
 * /openai, a private key every user can read, a token sent in plain http.
 */
export function configurationWarnings(config: Pick<Config, "routes" | "routesFile" | "authMode" | "certificatePath" | "certificatePathSource">): string[] {
  const warnings: string[] = [];
  config.routes.forEach((route, index) => {
    const where = config.routesFile === undefined ? "API_BASE_URL" : `routes[${index}] (${route.prefix})`;
    const setScope = (scope: string) => (config.routesFile === undefined ? `set AZURE_SCOPE=${scope}` : `set scope: ${scope} on the route`);
    for (const backend of route.backends) {
      const host = new URL(backend.url).hostname.toLowerCase();
      const service = AZURE_SERVICE_SCOPES.find((known) => known.host.test(host));
      const scope = route.scope.toLowerCase();
      if (service !== undefined && !service.scopes.includes(scope) && scope !== `${backend.origin.toLowerCase()}/.default`) {
        warnings.push(`${where} sends ${route.scope} tokens to ${host}, ${service.service}, which accepts ${service.scopes[0]}: ${setScope(service.scopes[0]!)}, or every request gets 401`);
      }
      // The SDKs and LiteLLM add /openai to the base URL themselves; cut after a route's own /openai prefix it is wanted.
      const basePath = new URL(backend.url).pathname;
      if (/\/openai$/i.test(basePath) && !(route.stripPrefix && /\/openai$/i.test(route.prefix))) {
        const asked = `${route.prefix === "/" ? "" : route.prefix}${/\/openai$/i.test(route.prefix) ? "" : "/openai"}/deployments/gpt-4o/chat/completions`;
        const forwarded = backend.url + (route.stripPrefix ? asked.slice(route.prefix === "/" ? 0 : route.prefix.length) : asked);
        warnings.push(`${where}'s backend ${backend.url} ends in /openai: a request to ${asked} reaches ${forwarded}; the OpenAI SDKs and LiteLLM add /openai themselves, so give the resource's URL without it (${backend.origin})`);
      }
      if (backend.url.startsWith("http:") && !/^http:\/\/(localhost|127\.|\[::1\])/.test(backend.url)) {
        warnings.push(`${config.routesFile === undefined ? "API_BASE_URL" : `backend ${backend.url}`} is plain http: the bearer token crosses the network unencrypted`);
      }
    }
  });
  if (config.authMode === "certificate") {
    try {
      const mode = statSync(config.certificatePath).mode;
      if ((mode & 0o004) !== 0) {
        warnings.push(`${config.certificatePathSource}=${config.certificatePath} is readable by every user (mode 0${(mode & 0o777).toString(8)}): it holds the private key; make it 0600 for the proxy's user, or 0640 with a group of its own`);
      }
    } catch {}
  }
  return warnings;
}

/** What the identity mode needs, all of it missing named at once, and the client and tenant IDs' forms. */
function identityFaults(raw: Record<SettingName, RawSetting>, mode: AuthMode | undefined, reason: string, errors: string[]): void {
  if (mode !== undefined) {
    const missing = REQUIRED_SETTINGS[mode]
      .filter((name) => !raw[name].value && !(name === "clientSecret" && raw.clientSecretFile.value) && !(name === "apiBaseUrl" && raw.routesFile.value))
      .map((name) => (name === "clientSecret" ? "AZURE_CLIENT_SECRET (or AZURE_CLIENT_SECRET_FILE)" : name === "apiBaseUrl" ? "API_BASE_URL (or AUTH_PROXY_ROUTES)" : SETTINGS[name].env));
    const why = reason === DEFAULT_MODE_REASON ? "" : ` (${mode} mode: ${reason})`;
    // On AKS nobody sets these by hand: their absence means the webhook did not mutate the pod.
    const webhook =
      mode === "workload-identity" && missing.some((name) => !name.startsWith("API_BASE_URL"))
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
}

/** API_BASE_URL as the one route `/`, or the routes file's routes; AZURE_SCOPE and the connect timeout are their defaults. */
function routeSettings(raw: Record<SettingName, RawSetting>, apiBases: BackendConfig[] | undefined, errors: string[]): RouteConfig[] {
  if (!isDefaultScope(raw.scope.value)) {
    errors.push(`${raw.scope.source}=${raw.scope.value} must be one resource's /.default scope (client credentials cannot ask for individual permissions), e.g. https://cognitiveservices.azure.com/.default`);
  }
  const connectTimeoutMs = connectTimeout(raw.connectTimeout.value, raw.connectTimeout.source, errors) ?? DEFAULT_CONNECT_TIMEOUT_MS;
  if (raw.routesFile.value && raw.apiBaseUrl.value) {
    errors.push(`set ${raw.apiBaseUrl.source} or ${raw.routesFile.source}, not both: the routes file names every backend`);
    return [];
  }
  if (raw.routesFile.value) return readRoutesFile(raw.routesFile, raw.scope.value!, connectTimeoutMs, errors);
  if (apiBases === undefined) return [];
  for (const backend of apiBases) backend.connectTimeoutMs = connectTimeoutMs;
  return [{ prefix: "/", stripPrefix: true, scope: raw.scope.value!, backends: apiBases }];
}

/** ADMIN_PORT: a port of its own, never the proxy's. */
function adminPortSetting(raw: Record<SettingName, RawSetting>, port: number, errors: string[]): number | undefined {
  const adminPort = raw.adminPort.value ? Number(raw.adminPort.value) : undefined;
  if (raw.adminPort.value && (!/^\d+$/.test(raw.adminPort.value) || adminPort! > 65535)) {
    errors.push(`${raw.adminPort.source}=${raw.adminPort.value} is not a TCP port (0-65535)`);
  } else if (adminPort !== undefined && adminPort !== 0 && adminPort === port && sameOrWildcardHost(raw.adminHost.value!, raw.host.value!)) {
    errors.push(`${raw.adminPort.source}=${raw.adminPort.value} is the proxy's own port; the admin listener needs a port of its own`);
  }
  return adminPort;
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
  const read = readConfigFile(file, "PROXY_API_KEYS_FILE");
  if ("fault" in read) throw new Error(read.fault);
  const keys = parseCallerKeys(read.text, "\n");
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

/** A routes or callers file's text, or why it cannot be read, named by the variable or flag that set it. */
export function readConfigFile(path: string, source: string): { text: string } | { fault: string } {
  try {
    return { text: readFileSync(path, "utf8") };
  } catch (error) {
    return { fault: `${source}=${path} cannot be read (${unreadableReason(error)})` };
  }
}

/** The routes file read once at start: every fault reported, each naming the file and the place (`routes[1].backends[0].url`). */
function readRoutesFile(file: RawSetting, defaultScope: string, defaultConnectTimeoutMs: number, errors: string[]): RouteConfig[] {
  const read = readConfigFile(file.value!, file.source);
  if ("fault" in read) {
    errors.push(read.fault);
    return [];
  }
  const { routes, faults } = parseRoutes(read.text, defaultScope, defaultConnectTimeoutMs);
  for (const fault of faults) errors.push(`${file.source}=${file.value}: ${fault}`);
  return routes;
}

export type Mapping = Record<string, unknown>;

/**
 * Bun.YAML's errors give no position (Bun 1.4: "YAML Parse error:
 * Unexpected token"), so the line is found as the first whose addition
 * makes the text unparsable: block YAML cut after any whole line parses.
 * Its number only: a callers file's lines hold keys.
 */
function lineOfFirstFault(text: string): string {
  const lines = text.split("\n");
  for (let count = 1; count <= Math.min(lines.length, 5000); count += 1) {
    try {
      Bun.YAML.parse(lines.slice(0, count).join("\n"));
    } catch {
      return ` at line ${count}`;
    }
  }
  return "";
}

export const isMapping = (value: unknown): value is Mapping => typeof value === "object" && value !== null && !Array.isArray(value);

/** A routes or callers file's document (YAML is a superset of JSON; Bun parses it natively), or its syntax fault with the line. */
export function parseConfigText(text: string): { document: unknown } | { fault: string } {
  try {
    return { document: Bun.YAML.parse(text) };
  } catch (error) {
    return { fault: `is not YAML or JSON: ${errorMessage(error).replace(/^YAML Parse error: /, "")}${lineOfFirstFault(text)}` };
  }
}

/** Routes from a YAML or JSON text (YAML is a superset of JSON; Bun parses it natively), and every fault found, by place. */
export function parseRoutes(text: string, defaultScope: string, defaultConnectTimeoutMs = DEFAULT_CONNECT_TIMEOUT_MS): { routes: RouteConfig[]; faults: string[] } {
  const faults: string[] = [];
  const parsed = parseConfigText(text);
  if ("fault" in parsed) return { routes: [], faults: [parsed.fault] };
  const document = parsed.document;
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
    const names = new Map<string, number>();
    for (const [backendIndex, backend] of backends.entries()) {
      if (backend === undefined) continue;
      const twin = names.get(backend.name);
      if (twin !== undefined) {
        const unnamed = [twin, backendIndex].some((index) => (entry.backends as Mapping[])[index]?.name === undefined);
        const how = unnamed ? " (without name:, a backend is named after its URL's host: set a name on each)" : "";
        faults.push(`${place}.backends[${backendIndex}] is named ${backend.name} like ${place}.backends[${twin}]: the backends of a route need names of their own${how}`);
      } else names.set(backend.name, backendIndex);
    }
    if (prefix !== undefined && typeof scope === "string" && typeof stripPrefix === "boolean" && backends.every((backend) => backend !== undefined)) {
      routes.push({ prefix, stripPrefix, scope, backends: backends as BackendConfig[] });
    }
  });
  return { routes, faults };
}

export function unknownKeys(mapping: Mapping, known: string[], place: string, faults: string[]): void {
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

/**
 * Bun.serve closes a request that has not finished within its idle timeout
 * (10 s by default, oven-sh/bun#13392), however busy its response: writes
 * do not reset the timer (measured). This value reaps idle keep-alive
 * connections and is longer than client pools keep theirs (httpx 5 s, Node
 * agents 4-15 s) so a client never reuses a socket the proxy is closing.
 */
export const KEEP_ALIVE_IDLE_SECONDS = 75;

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
