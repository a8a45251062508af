/**
 * The shared store of limits: Redis, through Bun's built-in RedisClient.
 * One round trip admits (an atomic Lua script, EVALSHA, EVAL after
 * NOSCRIPT); settlements go out pipelined and are not awaited by the
 * request. Every key carries a TTL and the caller's hash tag. Azure
 * Managed Redis with Entra ID: the identity's object ID and a token for
 * https://redis.azure.com/.default, a fresh connection before it expires.
 *
 * Imports: log, config, limits.
 */
import { RedisClient } from "bun";
import { readFileSync } from "node:fs";
import { errorMessage, log, SECOND } from "./log.ts";
import { type Environment } from "./config.ts";
import { calendarKeys, type CallerLimits, LIMIT_NAMES, type LimitName, type Limiter, MemoryStore, type Store, type StoreFailureMode, type Verdict } from "./limits.ts";

/** The scope Azure Managed Redis takes Entra ID tokens for. */
export const REDIS_ENTRA_SCOPE = "https://redis.azure.com/.default";

/** A day's count outlives its day by one (settlements of requests that crossed midnight); a month's by a day. */
const DAY_TTL_SECONDS = 2 * 86_400;
const MONTH_TTL_SECONDS = 32 * 86_400;
/** The minute's hash is read whole on every admission; its fields older than 61 s are deleted there. */
const MINUTE_TTL_SECONDS = 120;
/** A store's generation: a random value set once; a restarted Redis (no persistence) gets a new one, and settlements of the old one are dropped. */
const GENERATION_TTL_SECONDS = 40 * 86_400;

/**
 * KEYS: minute hash, day, month, generation. ARGV: tokens, tokens/min,
 * requests/min, tokens/day, tokens/month (0: none), day TTL, month TTL, a
 * generation to set when none. The same rules as MemoryStore.admit, on
 * Redis's clock (one clock for every replica).
 */
const ADMIT = `
local t = redis.call('TIME')
local now = tonumber(t[1])
local nowMs = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local need, tpm, rpm, tpd, tpmo = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local gen = redis.call('GET', KEYS[4])
if not gen then gen = ARGV[8]; redis.call('SET', KEYS[4], gen, 'EX', ${GENERATION_TTL_SECONDS}) end
local tokens, requests, tslots, rslots = 0, 0, {}, {}
if tpm > 0 or rpm > 0 then
  local h = redis.call('HGETALL', KEYS[1])
  for i = 1, #h, 2 do
    local sec = tonumber(string.sub(h[i], 2))
    local v = tonumber(h[i + 1])
    if sec <= now - 61 then redis.call('HDEL', KEYS[1], h[i])
    elseif string.sub(h[i], 1, 1) == 't' then tokens = tokens + v; tslots[#tslots + 1] = {sec, v}
    else requests = requests + v; rslots[#rslots + 1] = {sec, v} end
  end
end
local day = 0
local month = 0
if tpd > 0 then day = tonumber(redis.call('GET', KEYS[2]) or '0') end
if tpmo > 0 then month = tonumber(redis.call('GET', KEYS[3]) or '0') end
local function wait(slots, used, more, limit)
  table.sort(slots, function(a, b) return a[1] < b[1] end)
  local over = used + more - limit
  for _, s in ipairs(slots) do
    over = over - s[2]
    if over <= 0 then return math.max(1, (s[1] + 61) * 1000 - nowMs) end
  end
  return -1
end
if tpd > 0 and day + need > tpd then return {'tokens_per_day', day, -1} end
if tpmo > 0 and month + need > tpmo then return {'tokens_per_month', month, -1} end
if rpm > 0 and requests + 1 > rpm then return {'requests_per_minute', requests, wait(rslots, requests, 1, rpm)} end
if tpm > 0 and tokens + need > tpm then return {'tokens_per_minute', tokens, wait(tslots, tokens, need, tpm)} end
if tpm > 0 or rpm > 0 then
  if tpm > 0 then redis.call('HINCRBY', KEYS[1], 't' .. now, need) end
  if rpm > 0 then redis.call('HINCRBY', KEYS[1], 'r' .. now, 1) end
  redis.call('EXPIRE', KEYS[1], ${MINUTE_TTL_SECONDS})
end
if tpd > 0 then redis.call('INCRBY', KEYS[2], need); redis.call('EXPIRE', KEYS[2], ARGV[6]) end
if tpmo > 0 then redis.call('INCRBY', KEYS[3], need); redis.call('EXPIRE', KEYS[3], ARGV[7]) end
return {'', gen, now, tpm - tokens - need, rpm - requests - 1, tpd - day - need, tpmo - month - need}
`;

/**
 * KEYS as ADMIT's. ARGV: tokens (negative gives back), the admission's
 * second (0: now), its generation ('': any), minute/day/month counted (1/0),
 * day TTL, month TTL. A settlement for a Redis that restarted since is dropped.
 */
const ADJUST = `
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[3] then return 0 end
local now = tonumber(redis.call('TIME')[1])
local sec = tonumber(ARGV[2])
if sec == 0 then sec = now end
local d = tonumber(ARGV[1])
if ARGV[4] == '1' and sec > now - 61 then redis.call('HINCRBY', KEYS[1], 't' .. sec, d); redis.call('EXPIRE', KEYS[1], ${MINUTE_TTL_SECONDS}) end
if ARGV[5] == '1' then redis.call('INCRBY', KEYS[2], d); redis.call('EXPIRE', KEYS[2], ARGV[7]) end
if ARGV[6] == '1' then redis.call('INCRBY', KEYS[3], d); redis.call('EXPIRE', KEYS[3], ARGV[8]) end
return 1
`;

/** The store's settings: AUTH_PROXY_REDIS_URL and how it authenticates, AUTH_PROXY_LIMITS_ON_STORE_FAILURE. */
export interface StoreSettings {
  redisUrl: string | undefined;
  passwordFile: string | undefined;
  /** Azure Managed Redis: the proxy's own identity signs in (a *.redis.azure.net host with no password, or AUTH_PROXY_REDIS_AUTH=entra). */
  entra: boolean;
  onFailure: StoreFailureMode;
}

/** The settings, or every fault in them (said at start and by --check). */
export function storeSettings(env: Environment): { settings: StoreSettings } | { errors: string[] } {
  const errors: string[] = [];
  const redisUrl = env.AUTH_PROXY_REDIS_URL || undefined;
  const passwordFile = env.AUTH_PROXY_REDIS_PASSWORD_FILE || undefined;
  const onFailure = env.AUTH_PROXY_LIMITS_ON_STORE_FAILURE || "open";
  if (onFailure !== "open" && onFailure !== "closed") errors.push(`AUTH_PROXY_LIMITS_ON_STORE_FAILURE must be open or closed, not ${JSON.stringify(onFailure)}`);
  let entra = false;
  if (redisUrl !== undefined) {
    let url: URL | undefined;
    try {
      url = new URL(redisUrl);
    } catch {
      errors.push("AUTH_PROXY_REDIS_URL is not a URL (redis://host:6379 or rediss://host:6380)");
    }
    if (url !== undefined && url.protocol !== "redis:" && url.protocol !== "rediss:") errors.push(`AUTH_PROXY_REDIS_URL must start with redis:// or rediss://, not ${url.protocol}//`);
    const auth = env.AUTH_PROXY_REDIS_AUTH || undefined;
    if (auth !== undefined && auth !== "entra" && auth !== "password") errors.push(`AUTH_PROXY_REDIS_AUTH must be entra or password, not ${JSON.stringify(auth)}`);
    entra = auth === "entra" || (auth === undefined && url !== undefined && url.password === "" && passwordFile === undefined && url.hostname.endsWith(".redis.azure.net"));
    if (entra && (url?.password || passwordFile)) errors.push("AUTH_PROXY_REDIS_AUTH=entra signs in with the proxy's identity: drop the password from AUTH_PROXY_REDIS_URL and AUTH_PROXY_REDIS_PASSWORD_FILE");
  } else if (passwordFile !== undefined) {
    errors.push("AUTH_PROXY_REDIS_PASSWORD_FILE is set without AUTH_PROXY_REDIS_URL");
  }
  if (passwordFile !== undefined) {
    try {
      readFileSync(passwordFile, "utf8");
    } catch (error) {
      errors.push(`AUTH_PROXY_REDIS_PASSWORD_FILE ${passwordFile}: ${(error as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : errorMessage(error)}`);
    }
  }
  return errors.length > 0 ? { errors } : { settings: { redisUrl, passwordFile, entra, onFailure: onFailure as StoreFailureMode } };
}

/** The URL without its password, for log lines. */
export function redactedUrl(url: string): string {
  const parsed = new URL(url);
  if (parsed.password !== "") parsed.password = "***";
  return parsed.toString();
}

/** Entra ID sign-in: the current token for REDIS_ENTRA_SCOPE, or undefined while there is none. */
export type RedisToken = () => string | undefined;

export class RedisStore implements Store {
  readonly kind = "redis";
  private client: RedisClient;
  private readonly sha = new Map<string, string>();
  private signedInWith: string | undefined;
  private readonly timer: Timer;
  /** Set once the limiter exists, to count settlements that fail. */
  limiter: Limiter | undefined;

  constructor(
    private readonly settings: StoreSettings,
    private readonly token: RedisToken | undefined,
  ) {
    this.client = this.newClient();
    // A client that gave up reconnecting is asked again; with Entra ID, a new token means a new connection signed in with it.
    this.timer = setInterval(() => this.tend(), SECOND);
    this.timer.unref();
  }

  /** Connected at start (Bun's client fails commands until then); a store that is down at start is the same as one that goes down later. */
  async start(): Promise<void> {
    try {
      await this.client.connect();
      log("info", "limits store connected", { store: redactedUrl(this.settings.redisUrl!) });
    } catch (error) {
      log("warn", "limits store unreachable at start", { store: redactedUrl(this.settings.redisUrl!), error: errorMessage(error) });
    }
  }

  stop(): void {
    clearInterval(this.timer);
    this.client.close();
  }

  admit(caller: string, limits: CallerLimits, tokens: number, nowMs: number): Promise<Verdict> {
    const { day, month } = calendarKeys(nowMs);
    const args = [String(tokens), ...LIMIT_NAMES.map((name) => String(limits[name])), String(DAY_TTL_SECONDS), String(MONTH_TTL_SECONDS), crypto.randomUUID()];
    return this.run(ADMIT, keysOf(caller, day, month), args).then((reply) => verdictOf(reply as (string | number)[]));
  }

  adjust(caller: string, limits: CallerLimits, tokens: number, second: number, generation: string, nowMs: number): void {
    const { day, month } = calendarKeys(second === 0 ? nowMs : second * SECOND);
    const counted = [limits.tokens_per_minute > 0, limits.tokens_per_day > 0, limits.tokens_per_month > 0].map((on) => (on ? "1" : "0"));
    const args = [String(tokens), String(second), generation, ...counted, String(DAY_TTL_SECONDS), String(MONTH_TTL_SECONDS)];
    void this.run(ADJUST, keysOf(caller, day, month), args).catch((error) => this.limiter?.storeFailed(error));
  }

  /** EVALSHA; after NOSCRIPT (a restarted or flushed Redis) EVAL, which loads the script again. */
  private async run(script: string, keys: string[], args: string[]): Promise<unknown> {
    let sha = this.sha.get(script);
    if (sha === undefined) {
      sha = new Bun.CryptoHasher("sha1").update(script).digest("hex");
      this.sha.set(script, sha);
    }
    try {
      return await this.client.send("EVALSHA", [sha, String(keys.length), ...keys, ...args]);
    } catch (error) {
      if (!/NOSCRIPT/.test(errorMessage(error))) throw error;
      return this.client.send("EVAL", [script, String(keys.length), ...keys, ...args]);
    }
  }

  private newClient(): RedisClient {
    const url = new URL(this.settings.redisUrl!);
    if (this.settings.passwordFile !== undefined) url.password = encodeURIComponent(readFileSync(this.settings.passwordFile, "utf8").trim());
    if (this.token !== undefined) {
      const token = this.token();
      this.signedInWith = token;
      if (token !== undefined) {
        url.username = objectIdOf(token);
        url.password = token;
      }
    }
    // Without the offline queue a command fails at once while disconnected instead of waiting in a queue (BUN-NOTES).
    return new RedisClient(url.toString(), { enableOfflineQueue: false, connectionTimeout: 2 * SECOND, autoReconnect: true });
  }

  private tend(): void {
    const token = this.token?.();
    if (this.token !== undefined && token !== undefined && token !== this.signedInWith) {
      const before = this.client;
      this.client = this.newClient();
      void this.client.connect().then(
        () => setTimeout(() => before.close(), 5 * SECOND).unref(),
        (error) => log("warn", "limits store refused the new Entra ID token", { error: errorMessage(error) }),
      );
      return;
    }
    if (!this.client.connected) void this.client.connect().catch(() => {});
  }
}

/** The caller's keys, hash-tagged by caller so a cluster keeps them on one slot. */
function keysOf(caller: string, day: string, month: string): string[] {
  const tag = `auth-proxy:{${caller}}`;
  return [`${tag}:minute`, `${tag}:day:${day}`, `${tag}:month:${month}`, `${tag}:generation`];
}

function verdictOf(reply: (string | number)[]): Verdict {
  const refusedBy = String(reply[0]);
  if (refusedBy !== "") return { admitted: false, limit: refusedBy as LimitName, used: Number(reply[1]), retryAfterMs: Number(reply[2]) };
  const [, generation, second, tokensPerMinute, requestsPerMinute, tokensPerDay, tokensPerMonth] = reply;
  return {
    admitted: true,
    generation: String(generation),
    second: Number(second),
    remaining: { tokens_per_minute: Number(tokensPerMinute), requests_per_minute: Number(requestsPerMinute), tokens_per_day: Number(tokensPerDay), tokens_per_month: Number(tokensPerMonth) },
  };
}

/** Azure Managed Redis names an Entra ID user by the identity's object ID: the token's own `oid`. */
export function objectIdOf(token: string): string {
  try {
    const claims = JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString("utf8")) as { oid?: unknown };
    return typeof claims.oid === "string" ? claims.oid : "";
  } catch {
    return "";
  }
}

/** The store for these settings: Redis when a URL is set, else this process's memory. */
export function storeFor(settings: StoreSettings, token: RedisToken | undefined): Store {
  return settings.redisUrl === undefined ? new MemoryStore() : new RedisStore(settings, settings.entra ? token : undefined);
}
