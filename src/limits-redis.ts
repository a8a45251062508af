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
import { calendarKeys, type CallerLimits, type LimitName, Limiter, MemoryStore, type Store, type StoreFailureMode, type Verdict } from "./limits.ts";

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
 * KEYS: minute hash, day, month, generation. ARGV: "tokens,tokens/min,
 * requests/min,tokens/day,tokens/month" (0: none) and a generation to set
 * when there is none, unique to the call and echoed last in the reply (a
 * reply that is not this call's is refused: oven-sh/bun#27861 matched
 * replies to the wrong command after a reconnect). The same rules as MemoryStore.admit, on Redis's
 * clock (one clock for every replica). The minute hash holds a slot per
 * second (`t<second>`, `r<second>`) and their running sums (`T`, `R`); `c`
 * is the last second whose slots are taken out of the sums. An admission
 * reads three fields and takes out the seconds that left the window since
 * the last one, never the whole hash (that only to say when to retry): 8
 * calls where reading every slot took 15, 20 µs of Redis CPU (measured).
 */
const ADMIT = `
local a = {}
for n in string.gmatch(ARGV[1], '[^,]+') do a[#a + 1] = tonumber(n) end
local need, tpm, rpm, tpd, tpmo = a[1], a[2], a[3], a[4], a[5]
local t = redis.call('TIME')
local now = tonumber(t[1])
local gen = redis.call('GET', KEYS[4])
if not gen then gen = ARGV[2]; redis.call('SET', KEYS[4], gen, 'EX', ${GENERATION_TTL_SECONDS}) end
local day, month = 0, 0
local function undo()
  if tpd > 0 then redis.call('DECRBY', KEYS[2], need) end
  if tpmo > 0 then redis.call('DECRBY', KEYS[3], need) end
end
-- The calendar counts are added first and taken back on a refusal: one call each instead of a read and a write.
if tpd > 0 then
  day = redis.call('INCRBY', KEYS[2], need)
  if day == need then redis.call('EXPIRE', KEYS[2], ${DAY_TTL_SECONDS}) end
end
if tpmo > 0 then
  month = redis.call('INCRBY', KEYS[3], need)
  if month == need then redis.call('EXPIRE', KEYS[3], ${MONTH_TTL_SECONDS}) end
end
if tpd > 0 and day > tpd then undo(); return {'tokens_per_day', day - need, -1, ARGV[2]} end
if tpmo > 0 and month > tpmo then undo(); return {'tokens_per_month', month - need, -1, ARGV[2]} end
if tpm == 0 and rpm == 0 then return {'', gen, now, 0, 0, tpd - day, tpmo - month, ARGV[2]} end
local m = redis.call('HMGET', KEYS[1], 'T', 'R', 'c')
local cleaned = tonumber(m[3])
local tokens, requests = 0, 0
if cleaned and cleaned > now - 122 then
  tokens, requests = tonumber(m[1]) or 0, tonumber(m[2]) or 0
  for sec = cleaned + 1, now - 61 do
    local v = redis.call('HMGET', KEYS[1], 't' .. sec, 'r' .. sec)
    if v[1] or v[2] then
      tokens = tokens - (tonumber(v[1]) or 0)
      requests = requests - (tonumber(v[2]) or 0)
      redis.call('HDEL', KEYS[1], 't' .. sec, 'r' .. sec)
    end
  end
elseif cleaned then
  redis.call('DEL', KEYS[1])
end
local moved = cleaned == nil or cleaned < now - 61
local function wait(kind, used, more, limit)
  local h = redis.call('HGETALL', KEYS[1])
  local slots = {}
  for i = 1, #h, 2 do
    local sec = tonumber(string.sub(h[i], 2))
    if string.sub(h[i], 1, 1) == kind and sec and sec > now - 61 then slots[#slots + 1] = {sec, tonumber(h[i + 1])} end
  end
  table.sort(slots, function(x, y) return x[1] < y[1] end)
  local over = used + more - limit
  local nowMs = now * 1000 + math.floor(tonumber(t[2]) / 1000)
  for _, s in ipairs(slots) do
    over = over - s[2]
    if over <= 0 then return math.max(1, (s[1] + 61) * 1000 - nowMs) end
  end
  return -1
end
local refused
if rpm > 0 and requests + 1 > rpm then refused = {'requests_per_minute', requests, wait('r', requests, 1, rpm), ARGV[2]}
elseif tpm > 0 and tokens + need > tpm then refused = {'tokens_per_minute', tokens, wait('t', tokens, need, tpm), ARGV[2]} end
if refused then
  undo()
  if moved then redis.call('HSET', KEYS[1], 'T', tokens, 'R', requests, 'c', now - 61) end
  return refused
end
if tpm > 0 then redis.call('HINCRBY', KEYS[1], 't' .. now, need) end
if rpm > 0 then redis.call('HINCRBY', KEYS[1], 'r' .. now, 1) end
if moved then
  redis.call('HSET', KEYS[1], 'T', tokens + need, 'R', requests + 1, 'c', now - 61)
  -- Once a second at most: a hash in use never expires, one idle for two minutes does.
  redis.call('EXPIRE', KEYS[1], ${MINUTE_TTL_SECONDS})
else
  redis.call('HSET', KEYS[1], 'T', tokens + need, 'R', requests + 1)
end
return {'', gen, now, tpm - tokens - need, rpm - requests - 1, tpd - day, tpmo - month, ARGV[2]}
`;

/**
 * KEYS as ADMIT's. ARGV: the admissions' generation ('': any), which
 * windows count ("minute,day,month" as 1/0), and "second,tokens;..." (a
 * second of 0: now; negative tokens give back). Settlements of a Redis
 * that restarted since their admission are dropped.
 */
const ADJUST = `
if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
local now = tonumber(redis.call('TIME')[1])
local minute, day, month = string.match(ARGV[2], '(%d),(%d),(%d)')
local cleaned = tonumber(redis.call('HGET', KEYS[1], 'c'))
if minute == '1' and not cleaned then
  cleaned = now - 61
  redis.call('HSET', KEYS[1], 'c', cleaned, 'T', 0, 'R', 0)
end
local total = 0
for sec, d in string.gmatch(ARGV[3], '(%d+),(-?%d+)') do
  sec = tonumber(sec)
  d = tonumber(d)
  if sec == 0 then sec = now end
  total = total + d
  if minute == '1' and sec > cleaned then
    redis.call('HINCRBY', KEYS[1], 't' .. sec, d)
    redis.call('HINCRBY', KEYS[1], 'T', d)
  end
end
if minute == '1' then redis.call('EXPIRE', KEYS[1], ${MINUTE_TTL_SECONDS}) end
if day == '1' then redis.call('INCRBY', KEYS[2], total); redis.call('EXPIRE', KEYS[2], ${DAY_TTL_SECONDS}) end
if month == '1' then redis.call('INCRBY', KEYS[3], total); redis.call('EXPIRE', KEYS[3], ${MONTH_TTL_SECONDS}) end
return 1
`;

/** Settlements wait this long to go out together, one script call per caller: a request's settlement costs no round trip of its own. */
const SETTLEMENT_BATCH_MS = 10;

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
type RedisToken = () => string | undefined;

class RedisStore implements Store {
  readonly kind = "redis";
  private client: RedisClient;
  private readonly sha = new Map<string, string>();
  private signedInWith: string | undefined;
  private readonly timer: Timer;
  /** Set once the limiter exists, to count settlements that fail. */
  limiter: Limiter | undefined;
  /** This process's part of a generation it proposes; the time makes each proposal new. */
  private readonly candidate = crypto.randomUUID();
  private calls = 0;
  private readonly keys = new Map<string, { day: number; keys: string[] }>();
  private readonly settlements = new Map<string, { keys: string[]; generation: string; counted: string; entries: string }>();
  private flushTimer: Timer | undefined;

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
    // With Entra ID and no token yet, the first token's arrival connects (tend).
    if (this.token !== undefined && this.signedInWith === undefined) return;
    try {
      await this.client.connect();
      this.connected();
    } catch (error) {
      log("warn", "limits store unreachable at start", { store: redactedUrl(this.settings.redisUrl!), error: errorMessage(error) });
    }
  }

  private everConnected = false;

  private connected(): void {
    if (this.everConnected) return;
    this.everConnected = true;
    log("info", "limits store connected", { store: redactedUrl(this.settings.redisUrl!), auth: this.token === undefined ? (this.settings.passwordFile !== undefined || new URL(this.settings.redisUrl!).password !== "" ? "password" : "none") : "entra" });
  }

  stop(): void {
    clearInterval(this.timer);
    this.client.close();
  }

  /** Connects and asks PING: --check's question. */
  async ping(): Promise<unknown> {
    await this.client.connect();
    return this.client.send("PING", []);
  }

  admit(caller: string, limits: CallerLimits, tokens: number, nowMs: number): Promise<Verdict> {
    const args = `${tokens},${limits.tokens_per_minute},${limits.requests_per_minute},${limits.tokens_per_day},${limits.tokens_per_month}`;
    const nonce = `${this.candidate}:${(this.calls += 1)}`;
    return this.run(ADMIT, this.keysOf(caller, nowMs), [args, nonce]).then((reply) => verdictOf(reply, nonce));
  }

  adjust(caller: string, limits: CallerLimits, tokens: number, second: number, generation: string, nowMs: number): void {
    const keys = this.keysOf(caller, second === 0 ? nowMs : second * SECOND);
    const group = `${keys[1]}\u0000${generation}`;
    let batch = this.settlements.get(group);
    if (batch === undefined) {
      const counted = `${limits.tokens_per_minute > 0 ? 1 : 0},${limits.tokens_per_day > 0 ? 1 : 0},${limits.tokens_per_month > 0 ? 1 : 0}`;
      batch = { keys, generation, counted, entries: "" };
      this.settlements.set(group, batch);
    }
    batch.entries += `${second},${tokens};`;
    this.flushTimer ??= setTimeout(() => this.flush(), SETTLEMENT_BATCH_MS);
  }

  /** The settlements of the last few milliseconds, one script call per caller and day. */
  private flush(): void {
    this.flushTimer = undefined;
    const batches = [...this.settlements.values()];
    this.settlements.clear();
    for (const { keys, generation, counted, entries } of batches) {
      void this.run(ADJUST, keys, [generation, counted, entries]).catch((error) => this.limiter?.storeFailed(error));
    }
  }

  /** A caller's keys for the day a time falls in, made once a day. */
  private keysOf(caller: string, ms: number): string[] {
    const day = Math.floor(ms / 86_400_000);
    const cached = this.keys.get(caller);
    if (cached !== undefined && cached.day === day) return cached.keys;
    const { day: dayKey, month } = calendarKeys(ms);
    const keys = keysOf(caller, dayKey, month);
    // Only today's are kept: a settlement of yesterday's makes its own.
    if (day === Math.floor(Date.now() / 86_400_000)) this.keys.set(caller, { day, keys });
    return keys;
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
        () => {
          this.connected();
          setTimeout(() => before.close(), 5 * SECOND).unref();
        },
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

function verdictOf(answer: unknown, nonce: string): Verdict {
  const reply = answer as (string | number)[];
  if (!Array.isArray(answer) || reply.at(-1) !== nonce) {
    log("error", "limits store answered another command's call: not used", { got: Array.isArray(answer) ? String(reply.at(-1)).slice(0, 60) : typeof answer });
    throw new Error("the store's reply was not this call's");
  }
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
function objectIdOf(token: string): string {
  try {
    const claims = JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString("utf8")) as { oid?: unknown };
    return typeof claims.oid === "string" ? claims.oid : "";
  } catch {
    return "";
  }
}

/** No Redis: every replica's counts in its own memory. */
export const MEMORY_STORE: StoreSettings = { redisUrl: undefined, passwordFile: undefined, entra: false, onFailure: "open" };

/**
 * The limiter and its store: memory, or Redis signed in with a password or
 * (Azure Managed Redis) with a token of the proxy's own identity, kept
 * fresh by a token manager the core makes for REDIS_ENTRA_SCOPE.
 */
export function startLimiter(settings: StoreSettings, redisTokens: () => { start(): void; current: { authorization: string } | undefined }): Limiter {
  if (settings.redisUrl === undefined) return new Limiter(new MemoryStore(), settings.onFailure);
  const tokens = settings.entra ? redisTokens() : undefined;
  tokens?.start();
  const store = new RedisStore(settings, tokens === undefined ? undefined : () => tokens.current?.authorization.slice(7));
  const limiter = new Limiter(store, settings.onFailure);
  store.limiter = limiter;
  void store.start();
  return limiter;
}

/** --check: the store answers PING (signed in as the proxy would be), or what is wrong with it. */
export async function checkStore(settings: StoreSettings, identity: { requestToken(scope: string): Promise<{ authorization: string }> }): Promise<string | { store: string; round_trip_ms: number } | undefined> {
  if (settings.redisUrl === undefined) return undefined;
  const store = redactedUrl(settings.redisUrl);
  let token: string | undefined;
  try {
    if (settings.entra) token = (await identity.requestToken(REDIS_ENTRA_SCOPE)).authorization.slice(7);
  } catch (error) {
    return `limits store ${store}: no Entra ID token for ${REDIS_ENTRA_SCOPE}: ${errorMessage(error)}`;
  }
  const probe = new RedisStore(settings, settings.entra ? () => token : undefined);
  try {
    const startedAt = performance.now();
    const pong = await Promise.race([probe.ping(), Bun.sleep(2 * SECOND).then(() => "no answer within 2 s")]);
    if (pong !== "PONG") return `limits store ${store}: ${pong}`;
    return { store, round_trip_ms: Math.round((performance.now() - startedAt) * 10) / 10 };
  } catch (error) {
    return `limits store ${store}: ${errorMessage(error)}`;
  } finally {
    probe.stop();
  }
}
