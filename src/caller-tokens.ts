/**
 * Entra ID caller tokens: a caller proves who it is with its own access
 * token for the proxy (audience AUTH_PROXY_AUDIENCE), verified as Entra ID
 * documents it: RS256 against the tenant's published signing keys, the
 * tenant's issuer, the audience, the lifetime within 5 minutes of skew,
 * and the calling app (`appid`/`azp`) or principal (`oid`). node:crypto
 * verifies; a verified token is kept by its signature until it expires, so
 * a caller's token is verified once, not per request.
 *
 * Imports: log.
 */
import { createPublicKey, type KeyObject, verify } from "node:crypto";
import { errorMessage, log, MINUTE, SECOND } from "./log.ts";

/** Entra ID's own allowance for clocks that differ (Microsoft.IdentityModel's default ClockSkew). */
const CLOCK_SKEW_MS = 5 * MINUTE;

/** A token naming an unknown key refreshes the tenant's keys, at most this often: forged kids cannot make the proxy hammer Entra ID. */
const KEYS_REFRESH_INTERVAL_MS = 10 * SECOND;

const KEYS_FETCH_TIMEOUT_MS = 10 * SECOND;

/** Verified tokens kept; past this the cache starts over (tokens live an hour; a gateway sees far fewer callers). */
const MAX_VERIFIED_TOKENS = 10_000;

/** A compact JWS: three base64url parts, the first a JSON header. */
const JWT_SHAPE = /^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

export function looksLikeJwt(credential: string): boolean {
  return JWT_SHAPE.test(credential);
}

/** Who may present a token: a tenant, and the apps (appid/azp) or principals (oid) it lists. */
export interface EntraCallerRule<Caller> {
  tenant: string;
  appIds: string[];
  objectIds: string[];
  caller: Caller;
}

export type TokenVerdict<Caller> = { caller: Caller } | { refused: string };

interface TenantKeys {
  tenant: string;
  /** v2 tokens' issuer, from the OpenID configuration (until fetched: the authority host's form). */
  issuerV2: string;
  /** v1 tokens' issuer: Entra ID writes it with sts.windows.net whatever the cloud's login host. */
  issuerV1: string;
  keys: Map<string, KeyObject>;
  lastFetchAt: number;
  fetching: Promise<void> | undefined;
}

/**
 * The Entra callers' tokens: their tenants' signing keys, fetched at start
 * and on an unknown `kid`, and the tokens already verified.
 */
export class CallerTokens<Caller> {
  private readonly tenants = new Map<string, TenantKeys>();
  private readonly byIssuer = new Map<string, TenantKeys>();
  private readonly verified = new Map<string, { caller: Caller; expiresAtMs: number; notBeforeMs: number }>();

  constructor(
    private readonly rules: EntraCallerRule<Caller>[],
    readonly audience: string,
    private readonly authorityHost: string,
  ) {
    for (const rule of rules) {
      const tenant = rule.tenant.toLowerCase();
      if (this.tenants.has(tenant)) continue;
      const keys: TenantKeys = { tenant, issuerV2: `${authorityHost}/${tenant}/v2.0`, issuerV1: `https://sts.windows.net/${tenant}/`, keys: new Map(), lastFetchAt: -Infinity, fetching: undefined };
      this.tenants.set(tenant, keys);
      this.byIssuer.set(keys.issuerV2, keys);
      this.byIssuer.set(keys.issuerV1, keys);
    }
  }

  /** Fetches every tenant's keys in the background, so the first caller does not wait; it does not count against the 10 s. */
  start(): void {
    for (const tenant of this.tenants.values()) {
      void this.refreshKeys(tenant);
      tenant.lastFetchAt = -Infinity;
    }
  }

  /** The caller a token proves, or why it is refused; a promise only when the signing keys must be fetched first. */
  verify(token: string, nowMs: number): TokenVerdict<Caller> | Promise<TokenVerdict<Caller>> {
    const signatureStart = token.lastIndexOf(".") + 1;
    const known = this.verified.get(token.slice(signatureStart));
    if (known !== undefined && known.expiresAtMs + CLOCK_SKEW_MS > nowMs && known.notBeforeMs - CLOCK_SKEW_MS <= nowMs) return { caller: known.caller };
    if (!looksLikeJwt(token)) return { refused: "malformed (not a JSON Web Token)" };
    let header: Record<string, unknown>;
    let claims: Record<string, unknown>;
    const [headerPart, claimsPart, signaturePart] = token.split(".") as [string, string, string];
    try {
      header = JSON.parse(Buffer.from(headerPart, "base64url").toString("utf8"));
      claims = JSON.parse(Buffer.from(claimsPart, "base64url").toString("utf8"));
    } catch {
      return { refused: "malformed (not a JSON Web Token)" };
    }
    if (header.alg !== "RS256") return { refused: `unsupported algorithm ${JSON.stringify(String(header.alg)).slice(0, 40)} (only RS256)` };
    if (typeof header.kid !== "string" || signaturePart === "") return { refused: "malformed (no key id or signature)" };
    const tenant = typeof claims.iss === "string" ? this.byIssuer.get(claims.iss) : undefined;
    if (tenant === undefined) return { refused: "issued by a tenant no caller names (wrong tenant)" };
    const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
    if (!audiences.includes(this.audience)) return { refused: `wrong audience (the proxy accepts ${this.audience})` };
    if (typeof claims.exp !== "number" || claims.exp * SECOND + CLOCK_SKEW_MS <= nowMs) return { refused: "expired" };
    if (typeof claims.nbf === "number" && claims.nbf * SECOND - CLOCK_SKEW_MS > nowMs) return { refused: "not yet valid (nbf)" };
    const app = typeof claims.appid === "string" ? claims.appid : typeof claims.azp === "string" ? claims.azp : "";
    const principal = typeof claims.oid === "string" ? claims.oid : "";
    const rule = this.rules.find((candidate) => candidate.tenant.toLowerCase() === tenant.tenant && (candidate.appIds.includes(app.toLowerCase()) || candidate.objectIds.includes(principal.toLowerCase())));
    if (rule === undefined) return { refused: "unknown app (no caller lists its appid/azp or oid)" };
    const signed = { data: Buffer.from(`${headerPart}.${claimsPart}`), signature: Buffer.from(signaturePart, "base64url") };
    const verdict = () => this.checkSignature(tenant, header.kid as string, signed, rule.caller, claims, token.slice(signatureStart));
    if (tenant.keys.has(header.kid)) return verdict();
    // An unknown key: Entra ID rolls its keys; a fetch at most every 10 s finds the new one.
    if (tenant.fetching === undefined && nowMs - tenant.lastFetchAt < KEYS_REFRESH_INTERVAL_MS) return { refused: "signed with a key the tenant does not publish (unknown kid)" };
    return this.refreshKeys(tenant).then(verdict);
  }

  private checkSignature(tenant: TenantKeys, kid: string, signed: { data: Buffer; signature: Buffer }, caller: Caller, claims: Record<string, unknown>, signature: string): TokenVerdict<Caller> {
    const key = tenant.keys.get(kid);
    if (key === undefined) return { refused: "signed with a key the tenant does not publish (unknown kid)" };
    let valid = false;
    try {
      valid = verify("RSA-SHA256", signed.data, key, signed.signature);
    } catch {}
    if (!valid) return { refused: "bad signature" };
    if (this.verified.size >= MAX_VERIFIED_TOKENS) this.verified.clear();
    this.verified.set(signature, { caller, expiresAtMs: (claims.exp as number) * SECOND, notBeforeMs: typeof claims.nbf === "number" ? claims.nbf * SECOND : 0 });
    return { caller };
  }

  /** The tenant's OpenID configuration (its issuer, its jwks_uri on the authority host) and keys; one fetch at a time. */
  private refreshKeys(tenant: TenantKeys): Promise<void> {
    tenant.lastFetchAt = Date.now();
    tenant.fetching ??= this.fetchKeys(tenant)
      .catch((error) => log("error", "caller token signing keys unavailable", { tenant: tenant.tenant, error: errorMessage(error), keys_held: tenant.keys.size }))
      .finally(() => (tenant.fetching = undefined));
    return tenant.fetching;
  }

  private async fetchKeys(tenant: TenantKeys): Promise<void> {
    const configuration = (await fetchJson(`${this.authorityHost}/${tenant.tenant}/v2.0/.well-known/openid-configuration`)) as { issuer?: unknown; jwks_uri?: unknown };
    const jwksUri = String(configuration.jwks_uri ?? "");
    // Keys only from the identity provider itself: a configuration pointing elsewhere would let that host sign callers in.
    if (new URL(jwksUri, this.authorityHost).origin !== new URL(this.authorityHost).origin) throw new Error(`jwks_uri ${jwksUri} is not on ${this.authorityHost}`);
    if (typeof configuration.issuer === "string" && configuration.issuer !== tenant.issuerV2) {
      this.byIssuer.delete(tenant.issuerV2);
      tenant.issuerV2 = configuration.issuer;
      this.byIssuer.set(tenant.issuerV2, tenant);
    }
    const jwks = (await fetchJson(jwksUri)) as { keys?: { kid?: unknown; kty?: unknown; n?: unknown; e?: unknown }[] };
    const keys = new Map<string, KeyObject>();
    for (const jwk of jwks.keys ?? []) {
      if (typeof jwk.kid !== "string" || jwk.kty !== "RSA" || typeof jwk.n !== "string" || typeof jwk.e !== "string") continue;
      keys.set(jwk.kid, createPublicKey({ key: { kty: "RSA", n: jwk.n, e: jwk.e }, format: "jwk" }));
    }
    if (keys.size === 0) throw new Error(`${jwksUri} lists no RSA signing key`);
    tenant.keys = keys;
    log("info", "caller token signing keys fetched", { tenant: tenant.tenant, keys: keys.size });
  }
}

async function fetchJson(url: string): Promise<unknown> {
  const response = await fetch(url, { signal: AbortSignal.timeout(KEYS_FETCH_TIMEOUT_MS), redirect: "manual" });
  if (response.status !== 200) {
    void response.body?.cancel();
    throw new Error(`${url} answered HTTP ${response.status}`);
  }
  return response.json();
}
