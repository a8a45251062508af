/**
 * Honest stand-ins for the two services auth-proxy talks to, served on
 * loopback with the same shape as the real ones. Used by the tests, the
 * demo and the benchmark; never by proxy.ts.
 */
import { constants, createHash, generateKeyPairSync, type KeyObject, randomBytes, sign, verify, X509Certificate } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { gzipSync } from "node:zlib";

const b64url = (buffer: Buffer) => buffer.toString("base64url");

function newSigningKey(): { kid: string; privateKey: KeyObject; publicKey: KeyObject } {
  const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  return { kid: b64url(randomBytes(9)), privateKey, publicKey };
}
const sha256Hex = (data: Buffer | string) => createHash("sha256").update(data).digest("hex");

// ---------------------------------------------------------------- Entra ID

export interface AppRegistration {
  clientId: string;
  /** Certificates uploaded to the app registration ("Certificates & secrets"). */
  certificates: string[];
  /** Subject-name/issuer trust: a leaf sent in x5c and signed by this CA is accepted. */
  trustedIssuerPem?: string;
  /** This app's token lifetime, when it differs from the endpoint's (`expires_in` may be 0 or negative: a misbehaving provider). */
  tokenLifetimeSeconds?: number;
  /** A misbehaving identity provider: this answer replaces the token response for this app. */
  answer?: () => Response;
  /** Client secrets ("Certificates & secrets", their values). */
  secrets?: string[];
  /** Federated identity credentials: an external token with this issuer, subject and audience stands in for a credential. */
  federatedCredentials?: FederatedCredential[];
}

export interface FederatedCredential {
  issuer: string;
  /** For AKS workload identity: system:serviceaccount:<namespace>:<service account>. */
  subject: string;
  /** api://AzureADTokenExchange unless set. */
  audience?: string;
}

export const TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange";

/** Azure Managed Redis's Entra ID resource, and the object ID of the proxy's service principal in its tokens. */
export const REDIS_RESOURCE = "https://redis.azure.com";
export const SERVICE_PRINCIPAL_OID = "9b1c0000-0000-4000-8000-0000000000ad";

interface IssuedToken {
  expiresAtMs: number;
  clientId: string;
  /** The scope it was issued for ("" for managed identity resources): an API accepts only its own. */
  scope: string;
}

type Outage = { kind: "error"; status: number; error: string; code: number; description: string } | { kind: "hang" } | { kind: "stall-body" };

/**
 * A fake Entra ID token endpoint over HTTPS. It verifies the client
 * assertion as Entra does (signature against the registered certificate
 * found by `x5t#S256`, or an x5c chain for subject-name/issuer auth; `aud`
 * is the token endpoint; `iss` = `sub` = client id; `exp`/`nbf`; unique
 * `jti`), answers failures with AADSTS errors, and issues short-lived
 * opaque tokens that the fake Azure OpenAI checks.
 */
export class FakeEntraId {
  readonly tenantId = "11111111-2222-3333-4444-555555555555";
  readonly apps = new Map<string, AppRegistration>();
  readonly issued = new Map<string, IssuedToken>();
  /** Every client assertion received (federated tokens too), so tests can check none leaks. */
  readonly assertions: string[] = [];
  /** Every client secret received, likewise. */
  readonly clientSecrets: string[] = [];
  /** The signing keys of the OIDC issuers Entra has fetched (from the issuer's JWKS), by issuer URL. */
  readonly issuerKeys = new Map<string, KeyObject>();
  tokenLifetimeSeconds = 3600;
  refreshInSeconds: number | undefined;
  /** Told of each token before it is answered (a test's Redis learns the token it will accept). */
  onTokenIssued: ((token: string, scope: string) => Promise<void> | void) | undefined;
  outage: Outage | undefined;
  /** The scope of every token request, in order. */
  readonly scopes: string[] = [];
  /** Scopes refused as an unknown resource (AADSTS500011), as Entra answers a scope whose API is not in the tenant. */
  readonly refusedScopes = new Set<string>();
  /** Token requests per client id, with the time of each. */
  readonly requestTimes = new Map<string, number[]>();
  private readonly seenJti = new Set<string>();
  private readonly hanging = new Set<() => void>();
  private server: ReturnType<typeof Bun.serve> | undefined;
  private port = 0;

  constructor(private readonly tls: { cert: string; key: string }) {}

  start(): this {
    this.server = Bun.serve({
      hostname: "127.0.0.1",
      port: this.port,
      tls: this.tls,
      idleTimeout: 0,
      fetch: (req) => this.handle(req),
    });
    this.port = this.server.port!;
    return this;
  }

  /** Stops listening: the proxy then meets connection refused, as in a network outage. */
  stop(): void {
    this.server?.stop(true);
    this.server = undefined;
  }

  get authorityHost(): string {
    return `https://127.0.0.1:${this.port}`;
  }

  get tokenEndpoint(): string {
    return `${this.authorityHost}/${this.tenantId}/oauth2/v2.0/token`;
  }

  register(app: AppRegistration): void {
    this.apps.set(app.clientId, app);
  }

  /** Ends every held request (from a "hang" outage) with a connection reset. */
  releaseHanging(): void {
    for (const release of this.hanging) release();
    this.hanging.clear();
  }

  /** Trusts an external OIDC issuer's key, as Entra does after fetching its JWKS. */
  trustIssuer(issuer: FakeOidcIssuer): void {
    this.issuerKeys.set(issuer.url, issuer.publicKey);
  }

  /** Issues an access token for `clientId`: the token endpoint's, and what the managed identity endpoints hand out. */
  mint(clientId: string, lifetimeSeconds: number, scope = ""): string {
    // Azure Managed Redis takes the token's `oid` as the user name: a JWT-shaped token for its scope.
    const token = scope.startsWith(REDIS_RESOURCE)
      ? `${b64url(Buffer.from('{"alg":"RS256","typ":"JWT"}'))}.${b64url(Buffer.from(JSON.stringify({ aud: REDIS_RESOURCE, oid: SERVICE_PRINCIPAL_OID, exp: Math.floor(Date.now() / 1000) + lifetimeSeconds })))}.${b64url(randomBytes(32))}`
      : `fake-at-${b64url(randomBytes(24))}`;
    this.issued.set(token, { expiresAtMs: Date.now() + lifetimeSeconds * 1000, clientId, scope });
    return token;
  }

  /** Whether `token` was issued here and is still valid, and, when `scope` is given, issued for that scope (as each Azure API checks its audience). */
  isValid(token: string, scope?: string): boolean {
    const issued = this.issued.get(token);
    return issued !== undefined && Date.now() < issued.expiresAtMs && (scope === undefined || issued.scope === scope);
  }

  private aadError(status: number, error: string, code: number, description: string): Response {
    return Response.json(
      {
        error,
        error_description: `AADSTS${code}: ${description}\r\nTrace ID: ${crypto.randomUUID()}\r\nCorrelation ID: ${crypto.randomUUID()}\r\nTimestamp: ${new Date().toISOString()}`,
        error_codes: [code],
        timestamp: new Date().toISOString(),
        trace_id: crypto.randomUUID(),
        correlation_id: crypto.randomUUID(),
      },
      { status },
    );
  }

  /** Fetches of the signing keys (JWKS), as a caller-token verifier makes them. */
  keysFetches = 0;
  /** The keys Entra signs the access tokens apps get for the proxy with; rotated by `rotateSigningKey`. */
  private signingKeys: { kid: string; privateKey: KeyObject; publicKey: KeyObject }[] = [newSigningKey()];

  /** A new current key, published beside the old one unless `dropOld`: as Entra rolls its keys. */
  rotateSigningKey(dropOld = false): void {
    this.signingKeys = dropOld ? [newSigningKey()] : [newSigningKey(), ...this.signingKeys];
  }

  /**
   * An access token as Entra issues one to an app for another API (the
   * proxy): RS256 over the tenant's current key, v2 (`azp`, iss
   * `<authority>/<tenant>/v2.0`) or v1 (`appid`, iss sts.windows.net).
   * `claims` overrides any claim; `header` the JOSE header.
   */
  mintCallerToken(options: { appId: string; audience: string; version?: 1 | 2; lifetimeSeconds?: number; claims?: Record<string, unknown>; header?: Record<string, unknown>; key?: KeyObject }): string {
    const now = Math.floor(Date.now() / 1000);
    const version = options.version ?? 2;
    const claims = {
      aud: options.audience,
      iss: version === 2 ? `${this.authorityHost}/${this.tenantId}/v2.0` : `https://sts.windows.net/${this.tenantId}/`,
      iat: now,
      nbf: now,
      exp: now + (options.lifetimeSeconds ?? 3600),
      ...(version === 2 ? { azp: options.appId, azpacr: "2", ver: "2.0" } : { appid: options.appId, appidacr: "2", ver: "1.0" }),
      oid: "7d9c4a2e-0000-4000-8000-00000000c0de",
      sub: "7d9c4a2e-0000-4000-8000-00000000c0de",
      tid: this.tenantId,
      roles: [],
      ...options.claims,
    };
    const current = this.signingKeys[0]!;
    const header = { typ: "JWT", alg: "RS256", kid: current.kid, ...options.header };
    const signed = `${b64url(Buffer.from(JSON.stringify(header)))}.${b64url(Buffer.from(JSON.stringify(claims)))}`;
    return `${signed}.${b64url(sign("sha256", Buffer.from(signed), options.key ?? current.privateKey))}`;
  }

  private async handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    if (url.pathname === `/${this.tenantId}/v2.0/.well-known/openid-configuration`) {
      return Response.json({ issuer: `${this.authorityHost}/${this.tenantId}/v2.0`, jwks_uri: `${this.authorityHost}/${this.tenantId}/discovery/v2.0/keys`, token_endpoint: this.tokenEndpoint, id_token_signing_alg_values_supported: ["RS256"] });
    }
    if (url.pathname === `/${this.tenantId}/discovery/v2.0/keys`) {
      this.keysFetches += 1;
      return Response.json({ keys: this.signingKeys.map(({ kid, publicKey }) => ({ kty: "RSA", use: "sig", kid, x5t: kid, ...publicKey.export({ format: "jwk" }) })) });
    }
    if (url.pathname !== `/${this.tenantId}/oauth2/v2.0/token`) {
      if (url.pathname.endsWith("/oauth2/v2.0/token")) {
        return this.aadError(400, "invalid_request", 90002, `Tenant '${url.pathname.split("/")[1]}' not found.`);
      }
      return new Response("not found", { status: 404 });
    }
    if (this.outage?.kind === "hang") {
      return new Promise<Response>((resolve) => this.hanging.add(() => resolve(new Response("late", { status: 504 }))));
    }
    if (this.outage?.kind === "stall-body") {
      // Headers and the start of a token response, then nothing: a load balancer that lost its backend mid-answer.
      const body = new ReadableStream({ start: (controller) => controller.enqueue(new TextEncoder().encode('{"token_type":"Bearer",')) });
      return new Response(body, { headers: { "content-type": "application/json" } });
    }
    if (this.outage) return this.aadError(this.outage.status, this.outage.error, this.outage.code, this.outage.description);
    if (req.method !== "POST") return this.aadError(405, "invalid_request", 900561, "The endpoint only accepts POST requests.");
    const form = new URLSearchParams(await req.text());
    return this.issue(form);
  }

  private async issue(form: URLSearchParams): Promise<Response> {
    if (form.get("grant_type") !== "client_credentials") {
      return this.aadError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.");
    }
    const clientId = form.get("client_id") ?? "";
    const app = this.apps.get(clientId);
    if (!app) {
      return this.aadError(400, "unauthorized_client", 700016, `Application with identifier '${clientId}' was not found in the directory '${this.tenantId}'.`);
    }
    const scope = form.get("scope") ?? "";
    this.scopes.push(scope);
    this.requestTimes.set(clientId, [...(this.requestTimes.get(clientId) ?? []), Date.now()]);
    if (!scope.split(" ").some((s) => s.endsWith("/.default"))) {
      return this.aadError(400, "invalid_scope", 1002012, `The provided value for scope ${scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.`);
    }
    if (this.refusedScopes.has(scope)) {
      return this.aadError(400, "invalid_resource", 500011, `The resource principal named ${scope.replace(/\/\.default$/, "")} was not found in the tenant named ${this.tenantId}.`);
    }
    const secret = form.get("client_secret");
    if (secret !== null) {
      this.clientSecrets.push(secret);
      if (!(app.secrets ?? []).includes(secret)) {
        return this.aadError(401, "invalid_client", 7000215, `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${clientId}'.`);
      }
    } else {
      if (form.get("client_assertion_type") !== "urn:ietf:params:oauth:client-assertion-type:jwt-bearer") {
        return this.aadError(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.");
      }
      const assertion = form.get("client_assertion") ?? "";
      this.assertions.push(assertion);
      const fault = this.verifyAssertion(assertion, app);
      if (fault) return this.aadError(401, "invalid_client", fault.code, fault.description);
    }

    if (app.answer) return app.answer();

    const lifetime = app.tokenLifetimeSeconds ?? this.tokenLifetimeSeconds;
    const token = this.mint(clientId, lifetime, scope);
    await this.onTokenIssued?.(token, scope);
    return Response.json({
      token_type: "Bearer",
      expires_in: lifetime,
      ext_expires_in: lifetime,
      ...(this.refreshInSeconds === undefined ? {} : { refresh_in: this.refreshInSeconds }),
      access_token: token,
    });
  }

  private verifyAssertion(assertion: string, app: AppRegistration): { code: number; description: string } | undefined {
    const parts = assertion.split(".");
    if (parts.length !== 3) return { code: 50027, description: "JWT token is invalid or malformed." };
    const [headerPart, payloadPart, signaturePart] = parts as [string, string, string];
    let header: Record<string, unknown>;
    let claims: Record<string, unknown>;
    try {
      header = JSON.parse(Buffer.from(headerPart, "base64url").toString());
      claims = JSON.parse(Buffer.from(payloadPart, "base64url").toString());
    } catch {
      return { code: 50027, description: "JWT token is invalid or malformed." };
    }
    // An assertion the app did not sign itself is a federated one: an external issuer vouches for the workload.
    if (claims.iss !== app.clientId) return this.verifyFederatedAssertion(`${headerPart}.${payloadPart}`, signaturePart, header, claims, app);

    const certificate = this.signingCertificate(header, app);
    if (!certificate) {
      return { code: 700027, description: `The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '${String(header["x5t#S256"] ?? header.x5t)}']` };
    }
    const signed = Buffer.from(`${headerPart}.${payloadPart}`);
    const signature = Buffer.from(signaturePart, "base64url");
    const valid =
      header.alg === "PS256"
        ? verify("sha256", signed, { key: certificate.publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }, signature)
        : header.alg === "RS256" && verify("sha256", signed, certificate.publicKey, signature);
    if (!valid) return { code: 700027, description: "Client assertion failed signature validation." };
    if (Date.parse(certificate.validTo) < Date.now()) {
      return { code: 700027, description: "Client assertion contains an invalid signature. [Reason - The key used is expired., Thumbprint of key used by client: '...']" };
    }

    const now = Math.floor(Date.now() / 1000);
    if (claims.aud !== this.tokenEndpoint) {
      return { code: 700212, description: `The audience claim '${String(claims.aud)}' does not match the token endpoint.` };
    }
    if (claims.iss !== app.clientId || claims.sub !== app.clientId) {
      return { code: 700021, description: "Client assertion application identifier doesn't match 'client_id' parameter." };
    }
    if (typeof claims.exp !== "number" || claims.exp < now - 300 || (typeof claims.nbf === "number" && claims.nbf > now + 300)) {
      return { code: 700024, description: "Client assertion is not within its valid time range." };
    }
    if (typeof claims.jti !== "string" || this.seenJti.has(claims.jti)) {
      return { code: 700025, description: "Client assertion contains a replayed or missing jti." };
    }
    this.seenJti.add(claims.jti);
    return undefined;
  }

  /** Entra's checks of a federated assertion: a credential for its issuer, the issuer's signature, the time range, then subject and audience. */
  private verifyFederatedAssertion(
    signed: string,
    signaturePart: string,
    header: Record<string, unknown>,
    claims: Record<string, unknown>,
    app: AppRegistration,
  ): { code: number; description: string } | undefined {
    const issuer = String(claims.iss);
    const candidates = (app.federatedCredentials ?? []).filter((credential) => credential.issuer === issuer);
    if (candidates.length === 0) {
      return { code: 700211, description: `No matching federated identity record found for presented assertion issuer '${issuer}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.` };
    }
    const key = this.issuerKeys.get(issuer);
    if (!key || header.alg !== "RS256" || !verify("sha256", Buffer.from(signed), key, Buffer.from(signaturePart, "base64url"))) {
      return { code: 50013, description: "Assertion failed signature validation. [Reason - The key was not found.]" };
    }
    const now = Math.floor(Date.now() / 1000);
    if (typeof claims.exp !== "number" || claims.exp < now || (typeof claims.nbf === "number" && claims.nbf > now + 300)) {
      return { code: 700024, description: `Client assertion is not within its valid time range. Current time: ${new Date().toISOString()}, expiry time of assertion ${typeof claims.exp === "number" ? new Date(claims.exp * 1000).toISOString() : "missing"}.` };
    }
    const audiences = Array.isArray(claims.aud) ? claims.aud.map(String) : [String(claims.aud)];
    const match = candidates.find((credential) => credential.subject === claims.sub && audiences.includes(credential.audience ?? TOKEN_EXCHANGE_AUDIENCE));
    if (!match) {
      return { code: 70021, description: `No matching federated identity record found for presented assertion. Assertion Issuer: '${issuer}'. Assertion Subject: '${String(claims.sub)}'. Assertion Audience: '${audiences.join(",")}'.` };
    }
    return undefined;
  }

  private signingCertificate(header: Record<string, unknown>, app: AppRegistration): X509Certificate | undefined {
    const x5tS256 = header["x5t#S256"];
    if (typeof x5tS256 === "string") {
      for (const pem of app.certificates) {
        const certificate = new X509Certificate(pem);
        if (b64url(Buffer.from(certificate.fingerprint256.replace(/:/g, ""), "hex")) === x5tS256) return certificate;
      }
    }
    const x5c = header.x5c;
    if (app.trustedIssuerPem && Array.isArray(x5c) && typeof x5c[0] === "string") {
      const leaf = new X509Certificate(Buffer.from(x5c[0], "base64"));
      const issuer = new X509Certificate(app.trustedIssuerPem);
      if (leaf.checkIssued(issuer) && leaf.verify(issuer.publicKey)) return leaf;
    }
    return undefined;
  }
}

// ---------------------------------------------------------------- workload identity

/**
 * A Kubernetes cluster's OIDC issuer: signs projected service account
 * tokens (RS256, audience api://AzureADTokenExchange) as the kubelet
 * writes them for the workload identity webhook.
 */
export class FakeOidcIssuer {
  readonly url: string;
  private readonly keys = generateKeyPairSync("rsa", { modulusLength: 2048 });
  private readonly kid = b64url(randomBytes(8));

  constructor(name = "cluster") {
    this.url = `https://oidc.prod-aks.azure.com/${name}-${b64url(randomBytes(6))}/`;
  }

  get publicKey(): KeyObject {
    return this.keys.publicKey;
  }

  /** A service account token; `expiresInSeconds` may be negative (a stale file). */
  serviceAccountToken(namespace: string, serviceAccount: string, options: { expiresInSeconds?: number; audience?: string } = {}): string {
    const now = Math.floor(Date.now() / 1000);
    const expiresIn = options.expiresInSeconds ?? 3600;
    const header = { alg: "RS256", kid: this.kid };
    const claims = {
      aud: [options.audience ?? TOKEN_EXCHANGE_AUDIENCE],
      exp: now + expiresIn,
      iat: Math.min(now, now + expiresIn - 3600),
      nbf: Math.min(now, now + expiresIn - 3600),
      iss: this.url,
      sub: `system:serviceaccount:${namespace}:${serviceAccount}`,
      "kubernetes.io": { namespace, serviceaccount: { name: serviceAccount, uid: crypto.randomUUID() }, pod: { name: "app-0", uid: crypto.randomUUID() } },
    };
    const signed = `${b64url(Buffer.from(JSON.stringify(header)))}.${b64url(Buffer.from(JSON.stringify(claims)))}`;
    return `${signed}.${b64url(sign("sha256", Buffer.from(signed), this.keys.privateKey))}`;
  }
}

// ---------------------------------------------------------------- managed identity

export interface ManagedIdentityRequest {
  path: string;
  query: Record<string, string>;
  headers: Record<string, string>;
}

/**
 * The two managed identity endpoints MSAL-node finds most often, as they
 * answer: IMDS (GET /metadata/identity/oauth2/token, `Metadata: true`,
 * api-version 2018-02-01; MSAL reaches it through
 * AZURE_POD_IDENTITY_AUTHORITY_HOST) and App Service (GET IDENTITY_ENDPOINT
 * with the IDENTITY_HEADER secret as X-IDENTITY-HEADER, api-version
 * 2019-08-01). The tokens come from the fake Entra ID, so the fake Azure
 * OpenAI accepts them.
 */
export class FakeManagedIdentityEndpoint {
  readonly requests: ManagedIdentityRequest[] = [];
  /** The client id of the system-assigned identity, and those of the user-assigned ones attached. */
  systemAssigned = crypto.randomUUID();
  readonly userAssigned = new Set<string>();
  lifetimeSeconds = 86399;
  /** App Service's per-instance secret. */
  readonly identityHeader = b64url(randomBytes(18));
  private server: ReturnType<typeof Bun.serve> | undefined;

  constructor(
    private readonly entra: FakeEntraId,
    readonly kind: "imds" | "app-service",
  ) {}

  start(port = 0): this {
    this.server = Bun.serve({ hostname: "127.0.0.1", port, fetch: (req) => this.handle(req) });
    return this;
  }

  stop(): void {
    this.server?.stop(true);
  }

  get port(): number {
    return this.server!.port!;
  }

  /** The variables MSAL-node reads to find this endpoint. */
  environment(port = this.port): Record<string, string> {
    return this.kind === "imds"
      ? { AZURE_POD_IDENTITY_AUTHORITY_HOST: `http://127.0.0.1:${port}` }
      : { IDENTITY_ENDPOINT: `http://127.0.0.1:${port}/msi/token`, IDENTITY_HEADER: this.identityHeader };
  }

  private handle(req: Request): Response {
    const url = new URL(req.url);
    const query = Object.fromEntries(url.searchParams);
    this.requests.push({ path: url.pathname, query, headers: Object.fromEntries(req.headers) });
    const imds = this.kind === "imds";
    // MSAL-node's URL handling adds a trailing slash to an endpoint taken from the environment; the services accept both.
    if (url.pathname.replace(/\/$/, "") !== (imds ? "/metadata/identity/oauth2/token" : "/msi/token")) return new Response("not found", { status: 404 });
    if (imds && req.headers.get("metadata") !== "true") {
      return Response.json({ error: "invalid_request", error_description: "Required metadata header not specified" }, { status: 400 });
    }
    if (!imds && req.headers.get("x-identity-header") !== this.identityHeader) {
      return Response.json({ statusCode: 401, message: "Unauthorized" }, { status: 401 });
    }
    if (query["api-version"] !== (imds ? "2018-02-01" : "2019-08-01")) {
      return Response.json({ error: "invalid_request", error_description: "Invalid API version" }, { status: 400 });
    }
    if (!query.resource || query.resource.endsWith("/.default")) {
      return Response.json({ error: "invalid_resource", error_description: `AADSTS500011: The resource principal named ${query.resource} was not found.` }, { status: 400 });
    }
    const clientId = query.client_id ?? this.systemAssigned;
    if (query.client_id !== undefined && !this.userAssigned.has(query.client_id)) {
      return Response.json({ error: "invalid_request", error_description: "Identity not found" }, { status: 400 });
    }
    const expiresOn = Math.floor(Date.now() / 1000) + this.lifetimeSeconds;
    const token = this.entra.mint(clientId, this.lifetimeSeconds);
    return Response.json(
      imds
        ? { access_token: token, client_id: clientId, expires_in: String(this.lifetimeSeconds), expires_on: String(expiresOn), ext_expires_in: String(this.lifetimeSeconds), not_before: String(expiresOn - this.lifetimeSeconds), resource: query.resource, token_type: "Bearer" }
        : { access_token: token, expires_on: String(expiresOn), resource: query.resource, token_type: "Bearer", client_id: clientId },
    );
  }
}

// ---------------------------------------------------------------- Azure OpenAI

export interface RecordedRequest {
  method: string;
  /** The request target exactly as it arrived on the wire. */
  target: string;
  /** Header names and values in arrival order, as sent. */
  rawHeaders: string[];
  headers: http.IncomingHttpHeaders;
  bodyLength: number;
  bodySha256: string;
  tokenValid: boolean;
  /** When the proxy's connection for this request closed, or undefined while open. */
  closedAtMs?: number;
}

/**
 * A fake Azure OpenAI: `/openai/deployments/<name>/chat/completions` as the
 * real service shapes it (JSON, or SSE with `stream: true`), 401 for any
 * token the fake Entra ID did not issue or that has expired, and a few
 * `/test/...` routes that shape a response for one contract point. It
 * records every request exactly as received.
 */
/**
 * An answer a test gives the fake to send under `/test/answer/<name>`: its
 * parts are written one TCP write each, `gapMs` apart (or each after the
 * test's `releaseEvent()` when `gated`), so a value can be cut anywhere.
 */
export interface CannedAnswer {
  status?: number;
  headers: Record<string, string | number>;
  parts: (string | Buffer)[];
  gapMs?: number;
  gated?: boolean;
}

export class FakeAzureOpenAI {
  readonly received: RecordedRequest[] = [];
  /** Canned answers by name, for `/test/answer/<name>`. */
  readonly answers = new Map<string, CannedAnswer>();
  /** When each canned answer's last part was written (ms since the epoch), by name. */
  readonly lastPartWrittenAt = new Map<string, number>();
  /** Requests that arrived with an expired or foreign token. */
  rejected = 0;
  /** SSE gate: when set, each event waits for `releaseEvent()`. */
  gated = false;
  private readonly gateWaiters: (() => void)[] = [];
  private gatePermits = 0;
  private server: http.Server | undefined;
  port = 0;

  /** `scope`: accept only tokens issued for it, as Azure OpenAI and AI Search each accept only their own audience. */
  constructor(
    private readonly entra: FakeEntraId | undefined,
    private readonly scope?: string,
  ) {}

  start(): Promise<this> {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 60_000;
    this.server.requestTimeout = 0;
    return new Promise((resolve) => this.server!.listen(this.port, "127.0.0.1", () => {
      this.port = (this.server!.address() as AddressInfo).port;
      resolve(this);
    }));
  }

  stop(): Promise<void> {
    return new Promise((resolve) => {
      this.server?.closeAllConnections();
      this.server?.close(() => resolve());
    });
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Lets the gated stream send its next event; a release before the stream waits is kept for it. */
  releaseEvent(): void {
    const waiter = this.gateWaiters.shift();
    if (waiter) waiter();
    else this.gatePermits += 1;
  }

  private waitForRelease(): Promise<void> {
    if (this.gatePermits > 0) {
      this.gatePermits -= 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.gateWaiters.push(resolve));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const record: RecordedRequest = {
      method: req.method!,
      target: req.url!,
      rawHeaders: req.rawHeaders,
      headers: req.headers,
      bodyLength: 0,
      bodySha256: "",
      tokenValid: false,
    };
    this.received.push(record);
    res.on("close", () => (record.closedAtMs = Date.now()));
    const hash = createHash("sha256");
    const chunks: Buffer[] = [];
    for await (const chunk of req) {
      hash.update(chunk);
      record.bodyLength += chunk.length;
      if (record.bodyLength <= 1 << 20) chunks.push(chunk);
    }
    record.bodySha256 = hash.digest("hex");

    const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
    record.tokenValid = bearer !== undefined && (this.entra?.isValid(bearer, this.scope) ?? true);
    if (!record.tokenValid) {
      this.rejected += 1;
      res.writeHead(401, { "content-type": "application/json", "www-authenticate": 'Bearer error="invalid_token"' });
      res.end(JSON.stringify({ error: { code: "401", message: "Unauthorized. Access token is missing, invalid, audience is incorrect, or have expired." } }));
      return;
    }
    // Routes match on the path's end, so an API_BASE_URL path prefix does not matter.
    const fullPath = record.target.split("?")[0]!;
    const path = fullPath.includes("/test/") ? fullPath.slice(fullPath.indexOf("/test/")) : fullPath;
    const body = record.bodyLength <= 1 << 20 ? Buffer.concat(chunks).toString() : "";
    if (/\/openai\/deployments\/[^/]+\/chat\/completions$/.test(path) && req.method === "POST") {
      return this.chatCompletion(JSON.parse(body || "{}"), res);
    }
    return this.testRoute(path, new URLSearchParams(record.target.split("?")[1] ?? ""), record, res);
  }

  private async chatCompletion(request: { stream?: boolean; stream_options?: { include_usage?: boolean }; messages?: { content?: string }[] }, res: http.ServerResponse): Promise<void> {
    const words = ["Hello", " from", " the", " fake", " Azure", " OpenAI", "."];
    const id = `chatcmpl-${randomBytes(6).toString("hex")}`;
    const created = Math.floor(Date.now() / 1000);
    if (!request.stream) {
      res.writeHead(200, { "content-type": "application/json", "apim-request-id": id, "x-ratelimit-remaining-requests": "99", "x-ratelimit-remaining-tokens": "12345" });
      res.end(JSON.stringify({
        id, object: "chat.completion", created, model: "gpt-4o",
        choices: [{ index: 0, finish_reason: "stop", message: { role: "assistant", content: words.join("") } }],
        usage: { prompt_tokens: 9, completion_tokens: words.length, total_tokens: 9 + words.length },
      }));
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    // With stream_options.include_usage every chunk carries `"usage":null` and one more, with no choices, the usage (API reference).
    const withUsage = request.stream_options?.include_usage === true;
    const usageField = withUsage ? { usage: null } : {};
    for (const [index, word] of words.entries()) {
      const chunk = { id, object: "chat.completion.chunk", created, model: "gpt-4o", choices: [{ index: 0, delta: index === 0 ? { role: "assistant", content: word } : { content: word }, finish_reason: null }], ...usageField };
      res.write(`data: ${JSON.stringify(chunk)}\n\n`);
      await Bun.sleep(80);
    }
    res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model: "gpt-4o", choices: [{ index: 0, delta: {}, finish_reason: "stop" }], ...usageField })}\n\n`);
    if (withUsage) {
      const usage = { prompt_tokens: 9, completion_tokens: words.length, total_tokens: 9 + words.length, prompt_tokens_details: { cached_tokens: 0 }, completion_tokens_details: { reasoning_tokens: 0 } };
      res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model: "gpt-4o", choices: [], usage })}\n\n`);
    }
    res.end("data: [DONE]\n\n");
  }

  private async cannedAnswer(name: string, record: RecordedRequest, res: http.ServerResponse): Promise<void> {
    const answer = this.answers.get(name);
    if (answer === undefined) {
      res.writeHead(404, { "content-type": "application/json" });
      return void res.end(JSON.stringify({ error: { code: "404", message: `no canned answer ${name}` } }));
    }
    res.writeHead(answer.status ?? 200, answer.headers);
    res.flushHeaders();
    for (const [index, part] of answer.parts.entries()) {
      if (index > 0 && answer.gated) await this.waitForRelease();
      else if (index > 0 && answer.gapMs) await Bun.sleep(answer.gapMs);
      if (record.closedAtMs !== undefined) return;
      if (!res.write(part)) await new Promise((resolve) => res.once("drain", resolve));
    }
    this.lastPartWrittenAt.set(name, Date.now());
    res.end();
  }

  private async testRoute(path: string, query: URLSearchParams, record: RecordedRequest, res: http.ServerResponse): Promise<void> {
    if (path.startsWith("/test/answer/")) return this.cannedAnswer(path.slice("/test/answer/".length), record, res);
    switch (path) {
      case "/test/sse": {
        // N events; with `gated`, each waits until the test has seen the previous one.
        const events = Number(query.get("events") ?? 5);
        res.writeHead(200, { "content-type": "text/event-stream" });
        res.flushHeaders();
        for (let index = 0; index < events; index++) {
          if (this.gated) await this.waitForRelease();
          res.write(`data: {"event":${index}}\n\n`);
        }
        res.end();
        return;
      }
      case "/test/silent": {
        await Bun.sleep(Number(query.get("ms") ?? 15000));
        res.writeHead(200, { "content-type": "application/json" });
        res.end('{"late":true}');
        return;
      }
      case "/test/cut": {
        // A stream that sends one event and then loses its connection mid-body.
        res.writeHead(200, { "content-type": "text/event-stream" });
        res.write('data: {"before":"cut"}\n\n');
        await Bun.sleep(100);
        res.socket?.destroy();
        return;
      }
      case "/test/hang-then-reset": {
        // An upstream that takes the request, says nothing, then drops the connection.
        await Bun.sleep(Number(query.get("ms") ?? 15000));
        res.socket?.destroy();
        return;
      }
      case "/test/silent-stream": {
        // One event, a long silence, one more event: the idle timer mid-stream.
        res.writeHead(200, { "content-type": "text/event-stream" });
        res.write('data: {"before":"silence"}\n\n');
        await Bun.sleep(Number(query.get("ms") ?? 15000));
        res.end('data: {"after":"silence"}\n\n');
        return;
      }
      case "/test/stream": {
        // A stream that sends an event every `interval` ms for `ms` ms, or until the client goes.
        const until = Date.now() + Number(query.get("ms") ?? 60000);
        const interval = Number(query.get("interval") ?? 200);
        res.writeHead(200, { "content-type": "text/event-stream" });
        while (Date.now() < until && record.closedAtMs === undefined) {
          res.write(`data: {"t":${Date.now()}}\n\n`);
          await Bun.sleep(interval);
        }
        res.end();
        return;
      }
      case "/test/big": {
        // `mb` MiB of bigBodyChunk(0), (1), ... with a Content-Length, written as fast as the proxy takes them (waiting for drain).
        const total = Number(query.get("mb") ?? 1) * 1024 * 1024;
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": total });
        for (let index = 0; index * BIG_BODY_CHUNK < total && record.closedAtMs === undefined; index += 1) {
          if (!res.write(bigBodyChunk(index))) await new Promise((resolve) => res.once("drain", resolve));
        }
        res.end();
        return;
      }
      case "/test/gzip": {
        const payload = gzipSync(JSON.stringify({ message: "compressed", padding: "x".repeat(4096) }));
        res.writeHead(200, { "content-type": "application/json", "content-encoding": "gzip", "content-length": payload.length, "x-body-sha256": sha256Hex(payload) });
        res.end(payload);
        return;
      }
      case "/test/headers": {
        res.setHeader("set-cookie", ["a=1; Path=/", "b=2; Path=/"]);
        res.setHeader("x-upstream", "yes");
        res.setHeader("x-private-hop", "drop me");
        res.setHeader("keep-alive", "timeout=60");
        res.setHeader("proxy-authenticate", "Basic");
        res.setHeader("upgrade", "h2c");
        res.setHeader("connection", "keep-alive, x-private-hop");
        res.writeHead(200, { "content-type": "text/plain" });
        res.end("headers");
        return;
      }
      case "/test/no-content-type": {
        // A body of known length with no Content-Type: nothing may be added to it.
        res.removeHeader("date");
        res.writeHead(200, { "content-length": 5 });
        res.end(record.method === "HEAD" ? undefined : "plain");
        return;
      }
      case "/test/chunked": {
        // A resource served chunked; HEAD answers with the framing a GET has, as RFC 9110 section 9.3.2 allows.
        res.writeHead(200, { "content-type": "text/plain", "transfer-encoding": "chunked" });
        if (record.method === "HEAD") return void res.end();
        res.write("chun");
        res.end("ked");
        return;
      }
      case "/test/odd-connection": {
        // A Connection header listing a name that is no header name.
        res.writeHead(200, { "content-type": "text/plain", connection: "keep-alive, x a" });
        res.end("odd");
        return;
      }
      case "/test/trickle": {
        // A small body with a Content-Length whose second half comes `ms` later.
        res.writeHead(200, { "content-type": "application/json", "content-length": 20 });
        res.write('{"trickled":');
        await Bun.sleep(Number(query.get("ms") ?? 1000));
        res.end('"yes"}  ');
        return;
      }
      case "/test/redirect": {
        res.writeHead(302, { location: "https://elsewhere.example/steal" });
        res.end();
        return;
      }
      case "/test/status": {
        const status = Number(query.get("code") ?? 200);
        res.writeHead(status, { "content-type": "application/json" });
        res.end(JSON.stringify({ status }));
        return;
      }
      default: {
        // Echo: what arrived, for header and body assertions.
        res.writeHead(200, { "content-type": "application/json" });
        res.end(JSON.stringify({ target: record.target, bodyLength: record.bodyLength, bodySha256: record.bodySha256 }));
      }
    }
  }
}

// ---------------------------------------------------------------- Azure OpenAI over WebSocket

export interface RecordedHandshake {
  /** Path and query exactly as received. */
  target: string;
  headers: Record<string, string>;
  /** Subprotocols the client offered, in order. */
  protocols: string[];
  tokenValid: boolean;
}

export interface UpstreamSession {
  handshake: RecordedHandshake;
  closeCode?: number;
  closeReason?: string;
  closedAtMs?: number;
  /** Frames received from the proxy, in order (commands excluded). */
  received: (string | Buffer)[];
}

type FakeSocket = import("bun").ServerWebSocket<UpstreamSession>;

/**
 * The Realtime API's and the Responses API's WebSocket endpoints: the
 * handshake is accepted only with a bearer token the fake Entra ID issued
 * (401 JSON otherwise, as Azure answers), and recorded. On open it sends
 * `session.created` as Azure does; it answers `session.update` with
 * `session.updated`, echoes every other frame as it came (text as text,
 * binary as binary), and obeys commands, text frames starting `cmd:`:
 * `{"close":[code,reason]}`, `{"terminate":true}`, `{"send":[sizes...]}`
 * (binary frames of those sizes, byte i = i % 251) and `{"flood":bytes}`
 * (64 KiB binary frames, waiting for drain under back-pressure).
 */
export class FakeRealtime {
  readonly sessions: UpstreamSession[] = [];
  /** Handshakes refused, with their status. */
  readonly refused: { target: string; status: number }[] = [];
  /** Every open socket, so a test can end them from outside. */
  readonly open = new Set<FakeSocket>();
  private server: ReturnType<typeof Bun.serve<UpstreamSession>> | undefined;
  private readonly floods = new Map<FakeSocket, () => void>();

  constructor(
    private readonly entra: FakeEntraId | undefined,
    private readonly tls?: { cert: string; key: string },
  ) {}

  start(): this {
    this.server = Bun.serve<UpstreamSession>({
      hostname: "127.0.0.1",
      port: 0,
      tls: this.tls,
      idleTimeout: 0,
      fetch: (req, server) => this.handshake(req, server),
      websocket: {
        idleTimeout: 0,
        maxPayloadLength: 64 * 1024 * 1024,
        backpressureLimit: 64 * 1024 * 1024,
        open: (ws) => {
          this.open.add(ws);
          ws.send(JSON.stringify({ type: "session.created", event_id: "event_1", session: { id: "sess_fake", object: "realtime.session", model: "gpt-4o-realtime-preview-2024-12-17" } }));
        },
        message: (ws, message) => this.message(ws, message),
        drain: (ws) => this.floods.get(ws)?.(),
        close: (ws, code, reason) => {
          this.open.delete(ws);
          this.floods.delete(ws);
          Object.assign(ws.data, { closeCode: code, closeReason: reason, closedAtMs: Date.now() });
        },
      },
    });
    return this;
  }

  stop(): void {
    this.server?.stop(true);
  }

  get url(): string {
    return `${this.tls ? "https" : "http"}://127.0.0.1:${this.server!.port}`;
  }

  private handshake(req: Request, server: import("bun").Server<UpstreamSession>): Response | undefined {
    const url = new URL(req.url);
    const target = url.pathname + url.search;
    const bearer = /^Bearer (.+)$/.exec(req.headers.get("authorization") ?? "")?.[1];
    const tokenValid = bearer !== undefined && (this.entra?.isValid(bearer) ?? true);
    const forced = Number(url.searchParams.get("refuse") ?? 0);
    if (!tokenValid || forced) {
      const status = forced || 401;
      this.refused.push({ target, status });
      // Azure answers 302 to an upgrade on the wrong endpoint, with the one to use.
      const headers: Record<string, string> = status >= 300 && status < 400 ? { location: `wss://moved.example${url.pathname}` } : status === 429 ? { "retry-after": "7" } : {};
      return Response.json({ error: { code: String(status), message: status === 401 ? "Unauthorized. Access token is missing, invalid, audience is incorrect, or have expired." : `refused with ${status}` } }, { status, headers });
    }
    const protocols = (req.headers.get("sec-websocket-protocol") ?? "").split(",").map((p) => p.trim()).filter(Boolean);
    const session: UpstreamSession = {
      handshake: { target, headers: Object.fromEntries(req.headers), protocols, tokenValid },
      received: [],
    };
    this.sessions.push(session);
    // Pick the last offer, so a relay that answers with the client's first offer is caught.
    const chosen = protocols.at(-1);
    if (server.upgrade(req, { data: session, headers: chosen ? { "sec-websocket-protocol": chosen } : undefined })) return undefined;
    return new Response("upgrade failed", { status: 400 });
  }

  private message(ws: FakeSocket, message: string | Buffer): void {
    if (typeof message === "string" && message.startsWith("cmd:")) return this.command(ws, JSON.parse(message.slice(4)));
    ws.data.received.push(message);
    if (typeof message === "string" && message.startsWith('{"type":"session.update"')) {
      const event = JSON.parse(message) as { session?: unknown };
      ws.send(JSON.stringify({ type: "session.updated", event_id: "event_2", session: event.session }));
      return;
    }
    ws.send(message);
  }

  private command(ws: FakeSocket, command: { close?: [number, string]; terminate?: boolean; send?: number[]; flood?: number }): void {
    if (command.close) ws.close(...command.close);
    if (command.terminate) ws.terminate();
    for (const size of command.send ?? []) ws.send(patternBytes(size));
    if (command.flood) this.flood(ws, command.flood);
  }

  /** Sends `total` bytes in 64 KiB frames, pausing for drain as a well-behaved server does. */
  private flood(ws: FakeSocket, total: number): void {
    const frame = patternBytes(64 * 1024);
    let left = total;
    const pump = () => {
      while (left > 0) {
        const status = ws.send(left >= frame.length ? frame : frame.subarray(0, left));
        if (status === 0) return; // closed or dropped
        left -= Math.min(left, frame.length);
        if (status === -1) return; // resumes on drain
      }
      this.floods.delete(ws);
      ws.send("cmd-done:flood");
    };
    this.floods.set(ws, pump);
    pump();
  }
}

/** The size of /test/big's writes: its body is patternBytes(total), BIG_BODY_CHUNK bytes at a time. */
const BIG_BODY_CHUNK = 64 * 1024;
function bigBodyChunk(index: number): Buffer {
  return patternBytes(BIG_BODY_CHUNK, index * BIG_BODY_CHUNK);
}

/** Bytes whose value depends on their offset, so a reordered or truncated frame is caught. */
export function patternBytes(size: number, seed = 0): Buffer {
  const bytes = Buffer.allocUnsafe(size);
  for (let index = 0; index < size; index++) bytes[index] = (index + seed) % 251;
  return bytes;
}

// ---------------------------------------------------------------- a backend whose answers a test scripts

export interface ScriptedAnswer {
  status: number;
  headers?: Record<string, string>;
  body?: string;
  /** Milliseconds before the answer is sent. */
  delayMs?: number;
  /** Send `body` as SSE events this many ms apart (one per line of `body`). */
  eventIntervalMs?: number;
}

export interface ScriptedRequest {
  method: string;
  target: string;
  headers: Record<string, string>;
  bodySha256: string;
  bodyLength: number;
  /** False when the client went away before the answer was sent. */
  answered: boolean;
}

/**
 * One deployment of a backend pool: answers each request with the next
 * scripted answer (or `fallback`), records what it received (body hashed),
 * and accepts WebSocket upgrades unless the script says otherwise (a
 * scripted status refuses the handshake with it).
 */
export class ScriptedBackend {
  readonly received: ScriptedRequest[] = [];
  readonly script: ScriptedAnswer[] = [];
  fallback: ScriptedAnswer = { status: 200, headers: { "content-type": "application/json" } };
  private server: ReturnType<typeof Bun.serve<undefined>> | undefined;

  constructor(readonly name: string) {}

  start(): this {
    this.server = Bun.serve<undefined>({
      hostname: "127.0.0.1",
      port: 0,
      idleTimeout: 0,
      fetch: (req, server) => this.answer(req, server),
      websocket: { message: (ws, message) => void ws.send(message), open: (ws) => void ws.send(`hello from ${this.name}`) },
    });
    return this;
  }

  stop(): void {
    this.server?.stop(true);
  }

  get url(): string {
    return `http://127.0.0.1:${this.server!.port}`;
  }

  get port(): number {
    return this.server!.port!;
  }

  /** Appends answers to the script; `answer(429, ...)` etc. */
  then(...answers: ScriptedAnswer[]): this {
    this.script.push(...answers);
    return this;
  }

  private async answer(req: Request, server: import("bun").Server<undefined>): Promise<Response | undefined> {
    const url = new URL(req.url);
    const body = new Uint8Array(await req.arrayBuffer());
    const record: ScriptedRequest = {
      method: req.method,
      target: url.pathname + url.search,
      headers: Object.fromEntries(req.headers),
      bodySha256: createHash("sha256").update(body).digest("hex"),
      bodyLength: body.byteLength,
      answered: false,
    };
    this.received.push(record);
    const scripted = this.script.shift() ?? this.fallback;
    if (scripted.delayMs) await Bun.sleep(scripted.delayMs);
    if (req.signal.aborted) return new Response(null, { status: 499 });
    record.answered = true;
    if (req.headers.get("upgrade")?.toLowerCase() === "websocket" && scripted.status === 200) {
      return server.upgrade(req) ? undefined : new Response("upgrade failed", { status: 400 });
    }
    const headers = { "x-backend": this.name, ...scripted.headers };
    if (scripted.eventIntervalMs !== undefined) {
      const events = (scripted.body ?? "").split("\n");
      const stream = new ReadableStream<Uint8Array>({
        async pull(controller) {
          const event = events.shift();
          if (event === undefined) return controller.close();
          controller.enqueue(new TextEncoder().encode(`data: ${event}\n\n`));
          await Bun.sleep(scripted.eventIntervalMs!);
        },
      });
      return new Response(stream, { status: scripted.status, headers: { "content-type": "text/event-stream", ...headers } });
    }
    const text = scripted.body ?? JSON.stringify({ backend: this.name, target: record.target, bodySha256: record.bodySha256 });
    return new Response(text, { status: scripted.status, headers });
  }
}
