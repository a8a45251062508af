/**
 * Identities: certificate, client secret, workload identity and managed
 * identity, each one small implementation of Identity (what MSAL is given
 * to get a token for a scope), chosen once at start; the fetch-based
 * network client token requests go through (timeouts, proxy, bounded
 * bodies), and how an MSAL or Entra error is told to a user.
 *
 * Imports: log, config, certificate.
 */
import type { AuthenticationResult, INetworkModule, NetworkResponse } from "@azure/msal-node";
import { errorMessage, log, MINUTE, SECOND } from "./log.ts";
import { type Config, outboundProxyFor, proxyAddress } from "./config.ts";
import { type Credential, CredentialError, readCredential, readCredentialFile } from "./certificate.ts";

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
export function watchCertificateExpiry(identity: Identity): ReturnType<typeof setInterval> | undefined {
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
export async function readBounded(response: Response, limit: number): Promise<Buffer | undefined> {
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
export function bypassProxyFor(url: string): string {
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

/** What the hot path reads: plain data, replaced whole when a new token arrives. */
export interface HeldToken {
  /** `Bearer <token>`, built once per token rather than once per request. */
  authorization: string;
  expiresOnMs: number;
  /** Entra's `refresh_in`, when it sent one. */
  refreshOnMs: number | undefined;
  obtainedAtMs: number;
}

/** The part of an MSAL or network error a user can act on: the AADSTS code and its first sentence. */
export function describeTokenError(error: unknown): { message: string; aadsts: string | undefined } {
  const details = error as { errorMessage?: string; errorCode?: string; message?: string };
  const text = details?.errorMessage || details?.message || String(error);
  const [firstLine] = text.split(/\r?\n/);
  const message = (firstLine || details?.errorCode || "unknown error").replace(/\s*Trace ID:.*$/, "").trim();
  return { message, aadsts: /AADSTS\d+/.exec(text)?.[0] };
}
