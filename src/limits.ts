/**
 * Limits per caller: tokens and requests per minute (sliding), tokens per
 * day and month (calendar, UTC). A request reserves its likely cost before
 * it is forwarded and is admitted only if that fits every window; when its
 * answer ends the reservation becomes the answer's usage. The counts live
 * in a store: memory here (exact for one replica), Redis in
 * src/limits-redis.ts (shared by every replica), with this one as the
 * fallback while Redis is away.
 *
 * Imports: log, metrics, usage, stream-usage.
 */
import { log, SECOND } from "./log.ts";
import { escapeLabel, family } from "./metrics.ts";
import { type Usage } from "./usage.ts";
import { streamsUsageOnRequest, takesStreamOptions, withIncludeUsage } from "./stream-usage.ts";

const LIMIT_NAMES = ["tokens_per_minute", "requests_per_minute", "tokens_per_day", "tokens_per_month"] as const;
export type LimitName = (typeof LIMIT_NAMES)[number];

/** A caller's limits as the callers file gives them; 0: none. */
export type CallerLimits = Record<LimitName, number>;

/** The sliding minute is counted in one-second slots: the 61 that any 60 s touches, so no 60 s ever holds more than the limit. */
const WINDOW_SLOTS = 61;

/**
 * The output a request reserves when it names no cap (`max_tokens`,
 * `max_completion_tokens`, `max_output_tokens`): most chat answers are far
 * below it, and the settlement gives back what was not used.
 */
export const DEFAULT_OUTPUT_RESERVATION = 4096;

/** An image, audio or file sent inline (a data URL or base64) is reserved as this many tokens, not its bytes / 4 (a 1 MB image would be 250,000). */
export const INLINE_MEDIA_RESERVATION = 1500;

/** Every store call's deadline (the 250 ms): a store slower than that is away for this request. */
const STORE_DEADLINE_MS = 250;

/** After a store call fails, requests use the local counts for this long before asking the store again (no request waits more than a deadline). */
const STORE_RETRY_MS = SECOND;

/** The `limits:` mapping of a callers entry: positive integers, each optional; every fault by place. */
export function parseLimits(value: unknown, place: string, faults: string[]): CallerLimits | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "object" || value === null || Array.isArray(value)) return void faults.push(`${place} must be a mapping of ${LIMIT_NAMES.join(", ")}`);
  const limits: CallerLimits = { tokens_per_minute: 0, requests_per_minute: 0, tokens_per_day: 0, tokens_per_month: 0 };
  for (const [key, given] of Object.entries(value)) {
    if (!(LIMIT_NAMES as readonly string[]).includes(key)) faults.push(`${place}.${key} is not a limit (${LIMIT_NAMES.join(", ")})`);
    else if (!Number.isSafeInteger(given) || (given as number) < 1) faults.push(`${place}.${key} must be a whole number above 0, not ${JSON.stringify(given)}`);
    else limits[key as LimitName] = given as number;
  }
  return limits;
}

function hasTokenLimits(limits: CallerLimits): boolean {
  return limits.tokens_per_minute > 0 || limits.tokens_per_day > 0 || limits.tokens_per_month > 0;
}

// ---------------------------------------------------------------- what a request reserves

const utf8 = new TextDecoder();

/** A request's reservation and the body to send (the client's, or with include_usage written in). */
export interface Reservation {
  tokens: number;
  body: Uint8Array | ReadableStream<Uint8Array> | null | undefined;
  /** The body asks for a stream with include_usage added: its answer must be stripped of it. */
  injected: boolean;
}

/**
 * Input estimated as the body's bytes / 4 (OpenAI's rule of thumb for
 * English text; JSON's keys and quotes make it an over-estimate for chat,
 * which a reservation should be), inline media as
 * INLINE_MEDIA_RESERVATION each; plus the output cap, times `n`, for the
 * paths that generate. A body not held (chunked, or too large to hold) is
 * estimated from its Content-Length.
 */
export function reservationFor(path: string, target: string, body: Uint8Array | ReadableStream<Uint8Array> | null | undefined, bytesIn: number, limits: CallerLimits): Reservation {
  const generates = streamsUsageOnRequest(path) || /\/responses(\?|$)/.test(path);
  if (!(body instanceof Uint8Array)) return { tokens: Math.ceil(bytesIn / 4) + (generates ? DEFAULT_OUTPUT_RESERVATION : 0), body, injected: false };
  let document: Record<string, unknown> | undefined;
  let text = "";
  if (body.byteLength > 0 && (body[0] === 0x7b || body[0] === 0x20 || body[0] === 0x0a)) {
    try {
      text = utf8.decode(body);
      const parsed = JSON.parse(text);
      if (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)) document = parsed;
    } catch {
      document = undefined;
    }
  }
  if (document === undefined) return { tokens: Math.ceil(body.byteLength / 4) + (generates ? DEFAULT_OUTPUT_RESERVATION : 0), body, injected: false };
  const media = { count: 0, bytes: 0 };
  inlineMedia(document, media, 0);
  const input = Math.ceil((body.byteLength - media.bytes) / 4) + media.count * INLINE_MEDIA_RESERVATION;
  const output = generates ? outputCap(document) : 0;
  const inject = hasTokenLimits(limits) && document.stream === true && streamsUsageOnRequest(path) && !asksForUsage(document) && takesStreamOptions(target);
  return { tokens: input + output, body: inject ? withIncludeUsage(text, document) : body, injected: inject };
}

function outputCap(document: Record<string, unknown>): number {
  const cap = document.max_completion_tokens ?? document.max_tokens ?? document.max_output_tokens;
  const each = Number.isSafeInteger(cap) && (cap as number) > 0 ? (cap as number) : DEFAULT_OUTPUT_RESERVATION;
  const choices = Number.isSafeInteger(document.n) && (document.n as number) > 1 ? (document.n as number) : 1;
  return each * choices;
}

function asksForUsage(document: Record<string, unknown>): boolean {
  const options = document.stream_options as { include_usage?: unknown } | undefined;
  return typeof options === "object" && options !== null && options.include_usage === true;
}

/** Strings that are inline media: a data URL, or a long run of base64 (input_audio.data, file_data). */
function inlineMedia(value: unknown, media: { count: number; bytes: number }, depth: number): void {
  if (depth > 32) return;
  if (typeof value === "string") {
    if (value.length >= 1024 && (value.startsWith("data:") || /^[A-Za-z0-9+/]{1024}/.test(value))) {
      media.count += 1;
      media.bytes += value.length;
    }
  } else if (Array.isArray(value)) {
    for (const item of value) inlineMedia(item, media, depth + 1);
  } else if (typeof value === "object" && value !== null) {
    for (const item of Object.values(value)) inlineMedia(item, media, depth + 1);
  }
}

/** Input + output, as Azure counts a deployment's tokens-per-minute quota; undefined when the usage gave neither. */
function usageTotal(usage: Usage | undefined): number | undefined {
  if (usage === undefined || (usage.tokens[0] < 0 && usage.tokens[1] < 0)) return undefined;
  return Math.max(0, usage.tokens[0]) + Math.max(0, usage.tokens[1]);
}

// ---------------------------------------------------------------- admission

/** What a store answers to a reservation: admitted, with what remains, or refused by one limit. */
export type Verdict =
  | { admitted: true; generation: string; second: number; remaining: CallerLimits }
  | { admitted: false; limit: LimitName; used: number; retryAfterMs: number };

/** Where a caller's counts live. Both stores keep the same windows by the same rules. */
export interface Store {
  readonly kind: "memory" | "redis";
  admit(caller: string, limits: CallerLimits, tokens: number, nowMs: number): Verdict | Promise<Verdict>;
  /** Adds `tokens` (negative to give back) to the counts of an admission at `second` (0: now), if the store still holds that generation. */
  adjust(caller: string, limits: CallerLimits, tokens: number, second: number, generation: string, nowMs: number): void;
}

/** UTC calendar keys: the day (YYYYMMDD) and month (YYYYMM) a time falls in. */
export function calendarKeys(nowMs: number): { day: string; month: string } {
  const iso = new Date(nowMs).toISOString();
  return { day: iso.slice(0, 4) + iso.slice(5, 7) + iso.slice(8, 10), month: iso.slice(0, 4) + iso.slice(5, 7) };
}

/** When a calendar quota starts again: the next UTC midnight, or the first of next month. */
export function quotaResetsAt(limit: "tokens_per_day" | "tokens_per_month", nowMs: number): Date {
  const now = new Date(nowMs);
  return limit === "tokens_per_day" ? new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate() + 1)) : new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
}

/** One sliding minute: 61 one-second slots, each stamped with its second. */
interface MinuteWindow {
  seconds: Float64Array;
  counts: Float64Array;
}

function newWindow(): MinuteWindow {
  return { seconds: new Float64Array(WINDOW_SLOTS).fill(-1), counts: new Float64Array(WINDOW_SLOTS) };
}

function windowTotal(window: MinuteWindow, now: number): number {
  let total = 0;
  for (let slot = 0; slot < WINDOW_SLOTS; slot += 1) if (window.seconds[slot]! > now - WINDOW_SLOTS) total += window.counts[slot]!;
  return total;
}

function windowAdd(window: MinuteWindow, second: number, count: number, now: number): void {
  if (second <= now - WINDOW_SLOTS) return;
  const slot = second % WINDOW_SLOTS;
  if (window.seconds[slot] !== second) {
    window.seconds[slot] = second;
    window.counts[slot] = 0;
  }
  window.counts[slot] = window.counts[slot]! + count;
}

/** How long until enough of the window has slid out for `need` more to fit: the oldest seconds leave first, 61 s after their own. */
function windowWaitMs(window: MinuteWindow, used: number, need: number, limit: number, nowMs: number): number {
  const now = Math.floor(nowMs / SECOND);
  let over = used + need - limit;
  const slots = [...window.seconds.keys()].filter((slot) => window.seconds[slot]! > now - WINDOW_SLOTS).sort((a, b) => window.seconds[a]! - window.seconds[b]!);
  for (const slot of slots) {
    over -= window.counts[slot]!;
    if (over <= 0) return Math.max(1, (window.seconds[slot]! + WINDOW_SLOTS) * SECOND - nowMs);
  }
  return -1;
}

interface CallerCounts {
  tokens: MinuteWindow;
  requests: MinuteWindow;
  day: string;
  dayTokens: number;
  month: string;
  monthTokens: number;
}

/** The counts of this process: exact for one replica, and each replica's own while a shared store is away. */
export class MemoryStore implements Store {
  readonly kind = "memory";
  private readonly callers = new Map<string, CallerCounts>();

  admit(caller: string, limits: CallerLimits, tokens: number, nowMs: number): Verdict {
    const counts = this.countsOf(caller, nowMs);
    const now = Math.floor(nowMs / SECOND);
    const minuteTokens = windowTotal(counts.tokens, now);
    const minuteRequests = windowTotal(counts.requests, now);
    if (limits.tokens_per_day > 0 && counts.dayTokens + tokens > limits.tokens_per_day) return { admitted: false, limit: "tokens_per_day", used: counts.dayTokens, retryAfterMs: -1 };
    if (limits.tokens_per_month > 0 && counts.monthTokens + tokens > limits.tokens_per_month) return { admitted: false, limit: "tokens_per_month", used: counts.monthTokens, retryAfterMs: -1 };
    if (limits.requests_per_minute > 0 && minuteRequests + 1 > limits.requests_per_minute) {
      return { admitted: false, limit: "requests_per_minute", used: minuteRequests, retryAfterMs: windowWaitMs(counts.requests, minuteRequests, 1, limits.requests_per_minute, nowMs) };
    }
    if (limits.tokens_per_minute > 0 && minuteTokens + tokens > limits.tokens_per_minute) {
      return { admitted: false, limit: "tokens_per_minute", used: minuteTokens, retryAfterMs: windowWaitMs(counts.tokens, minuteTokens, tokens, limits.tokens_per_minute, nowMs) };
    }
    windowAdd(counts.tokens, now, tokens, now);
    windowAdd(counts.requests, now, 1, now);
    counts.dayTokens += tokens;
    counts.monthTokens += tokens;
    return {
      admitted: true,
      generation: "",
      second: now,
      remaining: {
        tokens_per_minute: limits.tokens_per_minute - minuteTokens - tokens,
        requests_per_minute: limits.requests_per_minute - minuteRequests - 1,
        tokens_per_day: limits.tokens_per_day - counts.dayTokens,
        tokens_per_month: limits.tokens_per_month - counts.monthTokens,
      },
    };
  }

  adjust(caller: string, _limits: CallerLimits, tokens: number, second: number, _generation: string, nowMs: number): void {
    const counts = this.countsOf(caller, nowMs);
    const now = Math.floor(nowMs / SECOND);
    windowAdd(counts.tokens, second === 0 ? now : second, tokens, now);
    // An admission of yesterday settled today changes yesterday's count, which is gone: the day's count is today's.
    if (second === 0 || calendarKeys(second * SECOND).day === counts.day) counts.dayTokens += tokens;
    if (second === 0 || calendarKeys(second * SECOND).month === counts.month) counts.monthTokens += tokens;
  }

  private countsOf(caller: string, nowMs: number): CallerCounts {
    let counts = this.callers.get(caller);
    if (counts === undefined) {
      counts = { tokens: newWindow(), requests: newWindow(), day: "", dayTokens: 0, month: "", monthTokens: 0 };
      this.callers.set(caller, counts);
    }
    const { day, month } = calendarKeys(nowMs);
    if (counts.day !== day) {
      counts.day = day;
      counts.dayTokens = 0;
    }
    if (counts.month !== month) {
      counts.month = month;
      counts.monthTokens = 0;
    }
    return counts;
  }
}

// ---------------------------------------------------------------- the limiter: admission, settlement, answers, figures

/** An admitted request's reservation, settled once when its answer ends. */
export interface Admission {
  caller: LimitedCaller;
  store: Store;
  tokens: number;
  second: number;
  generation: string;
  remaining: CallerLimits;
  settled: boolean;
}

/** A refusal the proxy answers for the caller: 429 (wait), 403 (quota), 503 (store away, fail closed). */
export interface LimitRefusal {
  status: 429 | 403 | 503;
  code: "caller_rate_limited" | "caller_quota_exceeded" | "limits_unavailable";
  message: string;
  headers: Record<string, string>;
}

/** A caller with limits, as requests meet it. */
export interface LimitedCaller {
  name: string;
  limits: CallerLimits;
  limiter: Limiter;
}

export type StoreFailureMode = "open" | "closed";

/** Store round trips in seconds: a loopback Redis answers in tens of microseconds, a remote one in a millisecond or two. */
const STORE_BUCKETS_SECONDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];

/** The counts' one owner: asks the store, falls back to local counts (open) or refuses (closed) while it is away, and keeps the figures. */
export class Limiter {
  readonly local: MemoryStore;
  private awayUntil = 0;
  private storeErrors = 0;
  private readonly latency = { counts: new Float64Array(STORE_BUCKETS_SECONDS.length + 1), sum: 0, count: 0 };
  private readonly rejections = new Map<string, number>();
  private readonly remaining = new Map<string, CallerLimits>();
  private readonly configured = new Map<string, CallerLimits>();

  constructor(
    readonly store: Store,
    readonly onFailure: StoreFailureMode,
  ) {
    this.local = store instanceof MemoryStore ? store : new MemoryStore();
  }

  /** A new callers file: its limits replace the last one's (the counts, under each name, go on). */
  forgetLimits(): void {
    this.configured.clear();
  }

  callerFor(name: string, limits: CallerLimits): LimitedCaller {
    this.configured.set(name, limits);
    return { name, limits, limiter: this };
  }

  /**
   * One round trip at most: the store's verdict within its deadline, else
   * the local one (open) or a 503 (closed). In memory it is no promise at
   * all: the request goes on in the same turn.
   */
  admit(caller: LimitedCaller, tokens: number): Admission | LimitRefusal | Promise<Admission | LimitRefusal> {
    const nowMs = Date.now();
    if (this.store === this.local) return this.decided(caller, tokens, nowMs, undefined, this.local);
    if (nowMs < this.awayUntil) return this.storeAway(caller, tokens, nowMs);
    return this.asked(caller, tokens, nowMs);
  }

  private async asked(caller: LimitedCaller, tokens: number, nowMs: number): Promise<Admission | LimitRefusal> {
    const askedAt = performance.now();
    try {
      const verdict = await withDeadline(this.store.admit(caller.name, caller.limits, tokens, nowMs));
      this.observeLatency((performance.now() - askedAt) / SECOND);
      return this.decided(caller, tokens, nowMs, verdict, this.store);
    } catch (error) {
      this.storeFailed(error);
    }
    return this.storeAway(caller, tokens, nowMs);
  }

  /** The store is away: local counts (open), or 503 (closed). */
  private storeAway(caller: LimitedCaller, tokens: number, nowMs: number): Admission | LimitRefusal {
    if (this.onFailure === "closed") return { status: 503, code: "limits_unavailable", message: `auth-proxy cannot reach its limits store (${this.store.kind}) and AUTH_PROXY_LIMITS_ON_STORE_FAILURE is closed`, headers: { "retry-after": "1" } };
    return this.decided(caller, tokens, nowMs, undefined, this.local);
  }

  private decided(caller: LimitedCaller, tokens: number, nowMs: number, given: Verdict | undefined, store: Store): Admission | LimitRefusal {
    const verdict = given ?? this.local.admit(caller.name, caller.limits, tokens, nowMs);
    if (!verdict.admitted) return this.refused(caller, verdict, tokens, nowMs);
    this.remaining.set(caller.name, verdict.remaining);
    return { caller, store, tokens, second: verdict.second, generation: verdict.generation, remaining: verdict.remaining, settled: false };
  }

  /** The answer ended: its usage replaces the reservation; a non-200 without usage gives it back; a 200 without usage keeps it. */
  settle(admission: Admission, status: number, usage: Usage | undefined): void {
    if (admission.settled) return;
    admission.settled = true;
    const used = usageTotal(usage);
    const tokens = used === undefined ? (status === 200 ? admission.tokens : 0) : used;
    if (tokens === admission.tokens) return;
    this.adjust(admission.store, admission.caller, tokens - admission.tokens, admission.second, admission.generation);
  }

  /** Tokens used with no reservation before them: a Realtime session's `response.done`. */
  charge(caller: LimitedCaller, usage: Usage | undefined): void {
    const tokens = usageTotal(usage);
    if (tokens === undefined || tokens === 0) return;
    this.adjust(Date.now() < this.awayUntil ? this.local : this.store, caller, tokens, 0, "");
  }

  private adjust(store: Store, caller: LimitedCaller, tokens: number, second: number, generation: string): void {
    try {
      store.adjust(caller.name, caller.limits, tokens, second, generation, Date.now());
    } catch (error) {
      this.storeFailed(error);
    }
  }

  /** A store call that failed or missed its deadline: counted, said once per outage, and the store left alone for a second. */
  storeFailed(error: unknown): void {
    this.storeErrors += 1;
    const nowMs = Date.now();
    if (nowMs >= this.awayUntil + STORE_RETRY_MS) {
      log("warn", "limits store unreachable", { store: this.store.kind, error: error instanceof Error ? error.message : String(error), mode: this.onFailure === "open" ? "each replica counts alone until it returns" : "limited callers answered 503 until it returns" });
    }
    this.awayUntil = nowMs + STORE_RETRY_MS;
  }

  private refused(caller: LimitedCaller, verdict: Extract<Verdict, { admitted: false }>, tokens: number, nowMs: number): LimitRefusal {
    const key = `${caller.name}\u0000${verdict.limit}`;
    this.rejections.set(key, (this.rejections.get(key) ?? 0) + 1);
    const limit = caller.limits[verdict.limit];
    const { limit: name, used } = verdict;
    const remaining = { ...(this.remaining.get(caller.name) ?? caller.limits), [name]: Math.max(0, limit - used) };
    this.remaining.set(caller.name, remaining);
    const headers = budgetHeaders(caller.limits, remaining);
    if (name === "tokens_per_day" || name === "tokens_per_month") {
      const resets = quotaResetsAt(name, nowMs).toISOString();
      return { status: 403, code: "caller_quota_exceeded", message: `caller ${caller.name} has used ${used} of its ${name} of ${limit}; this request reserves ${tokens}; the quota resets at ${resets}`, headers };
    }
    const what = name === "requests_per_minute" ? "1 request" : `${tokens} tokens (its input estimate plus its output cap)`;
    if (verdict.retryAfterMs < 0) {
      return { status: 429, code: "caller_rate_limited", message: `caller ${caller.name}: this request needs ${what}, more than its whole ${name} of ${limit}; lower max_tokens`, headers };
    }
    headers["retry-after"] = String(Math.ceil(verdict.retryAfterMs / SECOND));
    headers["retry-after-ms"] = String(verdict.retryAfterMs);
    return { status: 429, code: "caller_rate_limited", message: `caller ${caller.name} is over its ${name} of ${limit} (${used} used in the last minute; this request needs ${what}); retry after ${verdict.retryAfterMs} ms`, headers };
  }

  private observeLatency(seconds: number): void {
    let bucket = 0;
    while (bucket < STORE_BUCKETS_SECONDS.length && seconds > STORE_BUCKETS_SECONDS[bucket]!) bucket += 1;
    this.latency.counts[bucket] = this.latency.counts[bucket]! + 1;
    this.latency.sum += seconds;
    this.latency.count += 1;
  }

  /** The limits' series for /metrics. */
  render(lines: string[]): void {
    family(lines, "auth_proxy_caller_limit", "gauge", "Each caller's configured limits, by limit.");
    for (const [caller, limits] of this.configured) for (const name of LIMIT_NAMES) if (limits[name] > 0) lines.push(`auth_proxy_caller_limit{caller="${escapeLabel(caller)}",limit="${name}"} ${limits[name]}`);
    family(lines, "auth_proxy_caller_limit_remaining", "gauge", "What each caller had left of each limit at its last admission or refusal (this replica's view of the shared counts).");
    for (const [caller, remaining] of this.remaining) {
      const limits = this.configured.get(caller);
      for (const name of LIMIT_NAMES) if (limits !== undefined && limits[name] > 0) lines.push(`auth_proxy_caller_limit_remaining{caller="${escapeLabel(caller)}",limit="${name}"} ${Math.max(0, remaining[name])}`);
    }
    family(lines, "auth_proxy_caller_limit_rejections_total", "counter", "Requests refused by a caller's limit, nothing forwarded.");
    for (const [key, count] of this.rejections) {
      const [caller, name] = key.split("\u0000");
      lines.push(`auth_proxy_caller_limit_rejections_total{caller="${escapeLabel(caller!)}",limit="${name}"} ${count}`);
    }
    family(lines, "auth_proxy_limits_store_errors_total", "counter", "Limits store calls that failed or missed their deadline (each answered from local counts, or 503 when closed).");
    lines.push(`auth_proxy_limits_store_errors_total{store="${this.store.kind}"} ${this.storeErrors}`);
    family(lines, "auth_proxy_limits_store_duration_seconds", "histogram", "Round trips to the limits store to admit a request.");
    let cumulative = 0;
    for (let bucket = 0; bucket < STORE_BUCKETS_SECONDS.length; bucket += 1) {
      cumulative += this.latency.counts[bucket]!;
      lines.push(`auth_proxy_limits_store_duration_seconds_bucket{store="${this.store.kind}",le="${STORE_BUCKETS_SECONDS[bucket]}"} ${cumulative}`);
    }
    lines.push(`auth_proxy_limits_store_duration_seconds_bucket{store="${this.store.kind}",le="+Inf"} ${this.latency.count}`);
    lines.push(`auth_proxy_limits_store_duration_seconds_sum{store="${this.store.kind}"} ${this.latency.sum}`, `auth_proxy_limits_store_duration_seconds_count{store="${this.store.kind}"} ${this.latency.count}`);
  }
}

/** The proxy's own budget headers on every answer to a limited caller (Azure's `x-ratelimit-*` pass as they came). */
const BUDGET_HEADERS: Record<LimitName, string> = {
  tokens_per_minute: "x-auth-proxy-remaining-tokens",
  requests_per_minute: "x-auth-proxy-remaining-requests",
  tokens_per_day: "x-auth-proxy-remaining-tokens-day",
  tokens_per_month: "x-auth-proxy-remaining-tokens-month",
};

function budgetHeaders(limits: CallerLimits, remaining: CallerLimits): Record<string, string> {
  const headers: Record<string, string> = {};
  for (const name of LIMIT_NAMES) if (limits[name] > 0) headers[BUDGET_HEADERS[name]] = String(Math.max(0, remaining[name]));
  return headers;
}

export function putBudgetHeaders(headers: Headers, admission: Admission): void {
  for (const name of LIMIT_NAMES) if (admission.caller.limits[name] > 0) headers.set(BUDGET_HEADERS[name], String(Math.max(0, admission.remaining[name])));
}

function withDeadline<T>(answer: T | Promise<T>): T | Promise<T> {
  if (!(answer instanceof Promise)) return answer;
  let timer: Timer | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${STORE_DEADLINE_MS} ms`)), STORE_DEADLINE_MS);
  });
  return Promise.race([answer, deadline]).finally(() => clearTimeout(timer));
}

