/**
 * Inbound caller keys (PROXY_API_KEYS, PROXY_API_KEYS_FILE re-read when it
 * changes), compared in constant time, and where a caller presents one.
 *
 * Imports: log, config.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { statSync } from "node:fs";
import { errorMessage, log, SECOND } from "./log.ts";
import { type CallerKeySource, readCallerKeysFile } from "./config.ts";

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
