/**
 * The log: one JSON object a line on stdout, encoded into one buffer and
 * written once an event-loop turn, never blocking the proxy (a pipe nobody
 * reads drops lines, counted); levels; the access line's fields and their
 * encoders; forwarded requests' lines deferred to the turn's write.
 *
 * Imports: nothing (every other room may import it).
 */
import { constants as fsConstants, fstatSync, openSync, writeSync } from "node:fs";

export const SECOND = 1000;

export const MINUTE = 60 * SECOND;

export type LogLevel = "debug" | "info" | "warn" | "error";

export const LOG_LEVEL_RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

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

/** stdout, or its pipe reopened without blocking (`openLogOutput`). */
let logFd = 1;

/** False once stdout is closed (EPIPE): every line from then on is dropped. */
let logWritable = true;

/** The pipe is full: writes wait for `retryLogWrite` instead of failing once a turn. */
let logWaitingForReader = false;

/** Lines dropped since the start, and since the last warn line that said so. */
export let logLinesDropped = 0;

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
/**
 * The forwarded requests that ended this turn, their access lines encoded
 * together when the turn's log is written: the turn's responses go out
 * before any line is made, and the lines are made back to back (in place
 * 0.41-0.64 µs a line, against 0.51-0.70 one at a time; bench/RESULTS.md).
 * What an entry is and how its line is encoded is the caller's.
 */
const deferred: unknown[] = [];

let encodeDeferred: (entry: unknown) => void = () => {};

/** Lines encoded by `encode` at the turn's write, in the order they were deferred: the function that defers one. */
export function deferredLines<Entry>(encode: (entry: Entry) => void): (entry: Entry) => void {
  encodeDeferred = encode as (entry: unknown) => void;
  return (entry) => {
    deferred.push(entry);
    scheduleFlush();
  };
}

function writeDeferredLines(): void {
  for (let i = 0; i < deferred.length; i += 1) encodeDeferred(deferred[i]);
  deferred.length = 0;
}

function scheduleFlush(): void {
  if (flushScheduled) return;
  flushScheduled = true;
  setImmediate(flushLog);
}

/** Room for `bytes` more, or false (the line dropped and counted) when stdout is closed or its reader is behind by a whole buffer. */
export function reserveLog(bytes: number): boolean {
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
export function reserveLine(bytes: number): boolean {
  if (deferred.length !== 0) writeDeferredLines();
  return reserveLog(bytes);
}

function writeLine(line: string): void {
  // UTF-8 takes at most three bytes per UTF-16 code unit.
  if (reserveLine(line.length * 3)) logLength += logBuffer.write(line, logLength);
}

/** Everything logged so far, access lines waiting for the turn's end included, written now (as far as the reader takes it). */
export function flushLog(): void {
  writeDeferredLines();
  writeLog();
  flushScheduled = false;
}

/** At exit: the last lines, waiting a bounded time for a slow reader. */
export function flushLogAtExit(): void {
  writeDeferredLines();
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
export function putBytes(bytes: Uint8Array): void {
  logLength = encodeBytes(logBuffer, logLength, bytes);
}

export function putIntegerField(name: Uint8Array, value: number): void {
  logLength = encodeInteger(logBuffer, encodeBytes(logBuffer, logLength, name), value);
}

export function putMillisField(name: Uint8Array, ms: number): void {
  logLength = encodeMillis(logBuffer, encodeBytes(logBuffer, logLength, name), ms);
}

export function putStringField(name: Uint8Array, text: string, end = text.length): void {
  logLength = encodeJsonString(logBuffer, encodeBytes(logBuffer, logLength, name), text, end);
}

/** One JSON object per line on stdout, so any log shipper can parse it. Never pass a secret in `fields`. */
export function log(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
  if (LOG_LEVEL_RANK[level] < logThreshold) return;
  writeLine(JSON.stringify({ time: isoNow(), level, msg, ...fields }) + "\n");
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Why a file could not be read, in the same words for every file the proxy reads. */
export function unreadableReason(error: unknown): string {
  const code = (error as NodeJS.ErrnoException).code;
  return code === "ENOENT" ? "no such file" : code === "EACCES" ? "permission denied" : code === "EISDIR" ? "is a directory" : (code ?? errorMessage(error));
}

/** The path without its query: queries can carry data the operator did not mean to log. */
export function pathOf(target: string): string {
  return target.slice(0, pathEnd(target));
}

/** Where the target's path ends: at its query, if it has one. */
export function pathEnd(target: string): number {
  const queryStart = target.indexOf("?");
  return queryStart === -1 ? target.length : queryStart;
}

export let accessLogEnabled = true;

/** LOG_LEVEL: lines below it are dropped; access lines are info lines. */
export function setLogLevel(level: LogLevel): void {
  logThreshold = LOG_LEVEL_RANK[level];
  accessLogEnabled = logThreshold <= LOG_LEVEL_RANK.info;
}

/** An access line's fixed fields, numbers, time and deployment at their longest (under 500 bytes); each other text field adds six bytes a character at most. */
export const ACCESS_LINE_BYTES = 640;

const LINE_START = asciiBytes('{"time":');

const LINE_METHOD = asciiBytes(',"level":"info","msg":"request","method":');

const LINE_PATH = asciiBytes(',"path":');

const LINE_STATUS = asciiBytes(',"status":');

const DURATION_MS = asciiBytes(',"duration_ms":');

export const UPSTREAM_MS = asciiBytes(',"upstream_ms":');

export const TTFB_MS = asciiBytes(',"ttfb_ms":');

export const BYTES_IN = asciiBytes(',"bytes_in":');

export const BYTES_OUT = asciiBytes(',"bytes_out":');

export const DEPLOYMENT = asciiBytes(',"deployment":');

export const ROUTE = asciiBytes(',"route":');

export const CALLER = asciiBytes(',"caller":');
export const LIMITS_STORE = asciiBytes(',"limits":');

export const BACKEND = asciiBytes(',"backend":');

export const ATTEMPTS = asciiBytes(',"attempts":');

export const TRIED = asciiBytes(',"tried":');

export const REQUEST_ID = asciiBytes(',"request_id":');

export const CLIENT_REQUEST_ID = asciiBytes(',"client_request_id":');

export const USAGE_FIELDS = [',"input_tokens":', ',"output_tokens":', ',"cached_input_tokens":', ',"reasoning_tokens":'].map(asciiBytes);

export const MODEL = asciiBytes(',"model":');

export const LINE_END = asciiBytes("}\n");

export const ABORTED_END = asciiBytes(',"aborted":true}\n');

export const TRUNCATED_END = asciiBytes(',"truncated":true}\n');

/**
 * The fields every access line starts with (room reserved by the caller).
 * The path goes without its query: queries can carry data the operator did
 * not mean to log.
 */
export function putAccessLineHead(method: string, target: string, status: number, startedAt: number, endedAt: number): void {
  putStringField(LINE_START, isoNow(endedAt));
  putStringField(LINE_METHOD, method);
  putStringField(LINE_PATH, target, pathEnd(target));
  putIntegerField(LINE_STATUS, status);
  putMillisField(DURATION_MS, endedAt - startedAt);
}
