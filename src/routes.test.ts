/**
 * Routes: several APIs behind one proxy (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/routes.ts called directly.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { matchRoute } from "../src/routes.ts";
import { FakeAzureOpenAI } from "../test/fakes.ts";
import { ROOT, spawnProxy, startProxy } from "../test/harness.ts";
import { rawRequest } from "../test/http.ts";
import { promtool, scrape, valueOf } from "../test/prometheus.ts";
import { rawUpgrade } from "../test/websocket.ts";
import { baseEnv, certs, describeSecrets, entra, OPENAI_SCOPE, proxyBodies, readJson, realtime, SEARCH_SCOPE, upstream, useSuite } from "../test/suite.ts";

useSuite();

describe("Routes and backends", () => {
  /** Azure OpenAI and AI Search fakes that accept only tokens issued for their own scope. */
  let openai: FakeAzureOpenAI;
  let search: FakeAzureOpenAI;
  beforeAll(async () => {
    openai = await new FakeAzureOpenAI(entra, OPENAI_SCOPE).start();
    search = await new FakeAzureOpenAI(entra, SEARCH_SCOPE).start();
  });
  afterAll(async () => {
    await openai.stop();
    await search.stop();
  });

  /** A RAG app's routes: AI Search under /search (its own scope), Azure OpenAI under /openai (prefix kept), a longer prefix inside /search that goes elsewhere. */
  const ragRoutes = () => `# comments are YAML's
routes:
  - prefix: /search
    scope: ${SEARCH_SCOPE}
    backends:
      - url: ${search.url}/base/
  - prefix: /search/special/
    strip_prefix: false
    backends:
      - url: ${openai.url}
        name: openai-eastus
  - prefix: /openai
    strip_prefix: false
    backends:
      - url: ${openai.url}
  - prefix: /rt
    backends:
      - url: ${realtime.url}/prefix
`;

  const routesEnv = (file: string, overrides: Record<string, string | undefined> = {}) => baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: file, ...overrides });

  test("each route gets its own scope's token, its backend's path and the rest byte for byte; longest prefix on a segment boundary; nothing matches: 404 no_route, nothing forwarded", async () => {
    const proxy = await startProxy(routesEnv(certs.write("rag-routes.yaml", ragRoutes())));
    await proxy.waitForHealth();
    const get = async (target: string) => rawRequest(proxy.port, `GET ${target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`);

    expect((await get("/search/indexes/docs/docs?api-version=2024-07-01&search=a%20b&$top=2")).status).toBe(200);
    expect(search.received.at(-1)).toMatchObject({ target: "/base/indexes/docs/docs?api-version=2024-07-01&search=a%20b&$top=2", tokenValid: true });
    expect((await get("/search?x=%2F")).status).toBe(200);
    expect(search.received.at(-1)!.target).toBe("/base?x=%2F");
    // The longer prefix wins, and keeps its prefix (strip_prefix: false) on the other API with the other scope's token.
    expect((await get("/search/special/x?y=1")).status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/search/special/x?y=1", tokenValid: true });
    const completion = await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, { method: "POST", body: JSON.stringify({ messages: [] }) });
    expect(completion.status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", tokenValid: true });
    expect(openai.rejected + search.rejected).toBe(0);

    // Segment boundaries: /searching is not /search's; /other is no route's.
    const forwarded = openai.received.length + search.received.length;
    for (const target of ["/searching", "/other", "/", "/rtx"]) {
      const response = await get(target);
      expect(response.status).toBe(404);
      expect(JSON.parse(response.body).error).toMatchObject({ type: "auth_proxy_error", code: "no_route" });
      proxyBodies.push(response.body);
    }
    expect(openai.received.length + search.received.length).toBe(forwarded);

    // WebSocket upgrades are routed alike.
    const upgrade = await rawUpgrade(proxy.port, "/rt/openai/v1/realtime?model=gpt-realtime");
    expect(upgrade.status).toBe(101);
    expect(realtime.sessions.at(-1)!.handshake.target).toBe("/prefix/openai/v1/realtime?model=gpt-realtime");

    // The startup line lists the routes; each access line names its route; token metrics carry their scope.
    expect(proxy.lines.find((line) => line.msg === "auth-proxy started")).toMatchObject({
      routes: [
        { prefix: "/search", scope: SEARCH_SCOPE, backends: [`${search.url}/base`] },
        { prefix: "/search/special", scope: OPENAI_SCOPE, backends: [openai.url] },
        { prefix: "/openai", scope: OPENAI_SCOPE, backends: [openai.url] },
        { prefix: "/rt", scope: OPENAI_SCOPE, backends: [`${realtime.url}/prefix`] },
      ],
    });
    const line = await proxy.waitForLog((entry) => entry.msg === "request" && entry.path === "/search/special/x");
    expect(line).toMatchObject({ route: "/search/special", status: 200 });
    expect(proxy.lines.find((entry) => entry.msg === "request" && entry.path === "/other")).toMatchObject({ status: 404 });
    const { text, samples } = await scrape(proxy.url);
    proxyBodies.push(text);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { scope: SEARCH_SCOPE, result: "success" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_token_acquisitions_total", { scope: OPENAI_SCOPE, result: "success" })).toBe(1);
    expect(samples.filter((sample) => sample.name === "auth_proxy_token_expiration_timestamp_seconds").map((sample) => sample.labels.scope).sort()).toEqual([OPENAI_SCOPE, SEARCH_SCOPE]);
    expect((await promtool(["check", "metrics"], text)).exitCode).toBe(0);
    await proxy.stop();
  });

  test("Entra ID refusing one scope: that route answers 503 while the other serves, /health names the scope, and both recover", async () => {
    entra.refusedScopes.add(SEARCH_SCOPE);
    try {
      const proxy = await startProxy(routesEnv(certs.write("rag-refused.yaml", ragRoutes())));
      await proxy.waitForLog((line) => line.msg === "token acquisition failed" && line.scope === SEARCH_SCOPE && line.aadsts === "AADSTS500011");
      await proxy.waitForLog((line) => line.msg === "token acquired" && line.scope === OPENAI_SCOPE);
      const health = await fetch(`${proxy.url}/health`);
      expect(health.status).toBe(503);
      const reason = (await readJson(health)).reason as string;
      expect(reason).toContain(`no token for ${SEARCH_SCOPE}`);
      expect(reason).not.toContain(`no token for ${OPENAI_SCOPE}`);
      const refused = await fetch(`${proxy.url}/search/indexes`);
      expect(refused.status).toBe(503);
      expect(Number(refused.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
      expect((await readJson(refused)).error.code).toBe("token_unavailable");
      expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
      // The gateway's readiness: ready while any route serves, naming the scope and the routes that do not.
      const readiness = await fetch(`${proxy.url}/ready`);
      expect(readiness.status).toBe(200);
      const degraded = await readJson(readiness);
      expect(degraded.status).toBe("degraded");
      expect(degraded.reason).toContain(`no token for ${SEARCH_SCOPE}`);
      expect(degraded.reason).toContain("(routes /search answer 503)");
      expect(degraded.reason).not.toContain(OPENAI_SCOPE);
      const failed = proxy.lines.find((line) => line.msg === "token acquisition failed" && line.scope === SEARCH_SCOPE);
      expect(failed!.serving).toBe("no valid token: routes /search answer 503");
      entra.refusedScopes.delete(SEARCH_SCOPE);
      await proxy.waitForHealth(200, 10_000);
      expect(await readJson(await fetch(`${proxy.url}/ready`))).toEqual({ status: "ok" });
      expect((await fetch(`${proxy.url}/search/indexes`)).status).toBe(200);
      expect(search.received.at(-1)!.tokenValid).toBe(true);
      await proxy.stop();
    } finally {
      entra.refusedScopes.clear();
    }
  }, 30_000);

  test("--check acquires a token for every scope and prints the routes", async () => {
    const proxy = spawnProxy(routesEnv(certs.write("rag-check.yaml", ragRoutes())), ["--check"]);
    expect(await proxy.exited).toBe(0);
    const report = JSON.parse(proxy.stdout);
    expect(Object.keys(report.scopes).sort()).toEqual([OPENAI_SCOPE, SEARCH_SCOPE]);
    expect(report.routes.map((route: { prefix: string }) => route.prefix)).toEqual(["/search", "/search/special", "/openai", "/rt"]);
  });

  test("the README's JavaScript AI Search snippet runs through a /search route: allowInsecureConnection lets the SDK use http://localhost, its api-key is replaced by the search scope's token", async () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const snippet = readme.match(/```js\n(import \{ AzureKeyCredential, SearchClient \} from "@azure\/search-documents";[^`]*)```/)![1]!;
    const proxy = await startProxy(routesEnv(certs.write("search-sdk.yaml", ragRoutes())));
    await proxy.waitForHealth();
    const run = async (code: string) => {
      const sdk = Bun.spawn([process.execPath, "-e", code], { cwd: ROOT, stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_PROXY: "*" } });
      const [stdout, stderr] = await Promise.all([new Response(sdk.stdout).text(), new Response(sdk.stderr).text(), sdk.exited]);
      return stdout + stderr;
    };
    // The SDK asks the proxy for a search; the fake answers an echo, which the SDK may not parse: what matters is what arrived.
    const query = `\ntry { for await (const found of (await search.search("*")).results) {} } catch (error) { console.log(String(error.message)); }\nconsole.log("done");\n`;
    const before = search.received.length;
    expect(await run(snippet.replaceAll("http://localhost:8080", proxy.url) + query)).toContain("done");
    const arrived = search.received.slice(before);
    expect(arrived).toHaveLength(1);
    expect(arrived[0]!.target).toStartWith("/base/indexes('docs')/docs/search.post.search?api-version=");
    expect(arrived[0]!.tokenValid).toBe(true);
    expect(arrived[0]!.headers["api-key"]).toBeUndefined();
    // Without the option the SDK refuses before sending anything: why the snippet sets it.
    const refused = await run(snippet.replaceAll("http://localhost:8080", proxy.url).replace(", { allowInsecureConnection: true }", "") + query);
    expect(refused).toContain("allowInsecureConnection is false");
    expect(search.received.length).toBe(before + 1);
    await proxy.stop();
  });

  test("a JSON routes file works as YAML does", async () => {
    const json = JSON.stringify({ routes: [{ prefix: "/search", scope: SEARCH_SCOPE, backends: [{ url: search.url }] }, { prefix: "/", backends: [{ url: openai.url }] }] });
    const proxy = await startProxy(routesEnv(certs.write("routes.json", json)));
    await proxy.waitForHealth();
    expect((await fetch(`${proxy.url}/search/x`)).status).toBe(200);
    expect(search.received.at(-1)).toMatchObject({ target: "/x", tokenValid: true });
    expect((await fetch(`${proxy.url}/openai/models`)).status).toBe(200);
    expect(openai.received.at(-1)).toMatchObject({ target: "/openai/models", tokenValid: true });
    await proxy.stop();
  });

  const badFiles: [string, string, string[]][] = [
    ["unparsable", "routes: [\n  - prefix: /x\n", ["is not YAML or JSON"]],
    ["without routes", "backends: []\n", ["must hold `routes:`"]],
    ["an unknown key at each level", "extra: 1\nroutes:\n  - prefix: /\n    strip: false\n    backends:\n      - url: https://a.example\n        region: eastus\n", ["extra is not a setting", "routes[0].strip is not a setting", "routes[0].backends[0].region is not a setting"]],
    ["a malformed or missing backend URL", "routes:\n  - prefix: /a\n    backends:\n      - url: https://a.example\n  - prefix: /b\n    backends:\n      - url: not a url\n      - name: nameless\n", ["routes[1].backends[0].url=not a url is not a URL", "routes[1].backends[1].url must be the backend's URL"]],
    ["a backend URL with a query or credentials", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example/?x=1\n      - url: https://user:pw@b.example\n", ["routes[0].backends[0].url=https://a.example/?x=1 must not have a query", "routes[0].backends[1].url must not carry credentials"]],
    ["a prefix not starting with /, and a duplicate one", "routes:\n  - prefix: search\n    backends: [{ url: https://a.example }]\n  - prefix: /x/\n    backends: [{ url: https://a.example }]\n  - prefix: /x\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix must be a path starting with /", "routes[2].prefix /x is routes[1]'s prefix too"]],
    ["a prefix with a dot segment", "routes:\n  - prefix: /a/../b\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix /a/../b must be plain path segments"]],
    ["a scope that is not a /.default one", "routes:\n  - prefix: /\n    scope: https://search.azure.com/user_impersonation\n    backends: [{ url: https://a.example }]\n", ["routes[0].scope", "/.default"]],
    ["a priority or weight that is not a positive integer", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n        priority: 0\n      - url: https://b.example\n        weight: 1.5\n", ["routes[0].backends[0].priority must be a positive integer", "routes[0].backends[1].weight must be a positive integer"]],
    ["no backends", "routes:\n  - prefix: /\n    backends: []\n", ["routes[0].backends must list one to 32 backends"]],
    // Clients send these percent-encoded (`/caf%C3%A9`), so such a prefix would never match and its requests would reach the catch-all.
    ["a prefix clients must percent-encode", "routes:\n  - prefix: /café\n    backends: [{ url: https://a.example }]\n  - prefix: /a\"b\n    backends: [{ url: https://a.example }]\n", ["routes[0].prefix /café must be plain path segments", 'routes[1].prefix /a"b must be plain path segments']],
    ["a scope that names no resource", "routes:\n  - prefix: /\n    scope: /.default\n    backends: [{ url: https://a.example }]\n", ["routes[0].scope \"/.default\" must be one resource's /.default scope"]],
    ["a connect_timeout that is not a number of seconds", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n        connect_timeout: 0\n      - url: https://b.example\n        connect_timeout: soon\n", ["routes[0].backends[0].connect_timeout=0 must be a number of seconds", "routes[0].backends[1].connect_timeout=soon must be a number of seconds"]],
    ["two backends of one name, after a malformed one", "routes:\n  - prefix: /\n    backends:\n      - url: nowhere\n      - url: https://a.example\n      - url: https://a.example/other\n", ["routes[0].backends[0].url=nowhere is not a URL", "routes[0].backends[2] is named a.example like routes[0].backends[1]: the backends of a route need names of their own (without name:, a backend is named after its URL's host: set a name on each)"]],
    ["two backends both named east", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n        name: east\n      - url: https://b.example\n        name: east\n", ["routes[0].backends[1] is named east like routes[0].backends[0]: the backends of a route need names of their own"]],
    ["an indentation error", "routes:\n  - prefix: /\n    backends:\n      - url: https://a.example\n     scope: https://search.azure.com/.default\n", ["is not YAML or JSON: Unexpected token at line 5"]],
  ];
  for (const [name, text, expected] of badFiles) {
    test(`a routes file with ${name}: exit 1 within 2 s, one line per fault naming the file and the place`, async () => {
      const file = certs.write(`bad-routes-${name.replace(/\W+/g, "-")}.yaml`, text);
      const startedAt = performance.now();
      const proxy = spawnProxy({ ...routesEnv(file), PORT: "0", HOST: "127.0.0.1" });
      expect(await proxy.exited).toBe(1);
      expect(performance.now() - startedAt).toBeLessThan(2000);
      const lines = proxy.stderr.trim().split("\n");
      // One line per fault: the scope's two expected pieces are one fault's.
      expect(lines).toHaveLength(name.startsWith("a scope") ? 1 : expected.length);
      for (const text of expected) expect(proxy.stderr).toContain(text);
      for (const line of lines) expect(line).toStartWith(`auth-proxy: AUTH_PROXY_ROUTES=${file}: `);
      expect(proxy.stderr).not.toMatch(/^\s+at /m);
    });
  }

  test("an unreadable routes file, and one set together with API_BASE_URL, exit 1 within 2 s naming both", async () => {
    const missing = spawnProxy({ ...routesEnv("/nonexistent/routes.yaml"), PORT: "0", HOST: "127.0.0.1" });
    expect(await missing.exited).toBe(1);
    expect(missing.stderr).toContain("AUTH_PROXY_ROUTES=/nonexistent/routes.yaml cannot be read (no such file)");
    const both = spawnProxy({ ...routesEnv(certs.write("both.yaml", ragRoutes()), { API_BASE_URL: upstream.url }), PORT: "0", HOST: "127.0.0.1" });
    expect(await both.exited).toBe(1);
    expect(both.stderr).toContain("set API_BASE_URL or AUTH_PROXY_ROUTES, not both");
    const flag = spawnProxy({ ...baseEnv(), PORT: "0", HOST: "127.0.0.1" }, ["--routes", certs.write("flag.yaml", ragRoutes())]);
    expect(await flag.exited).toBe(1);
    expect(flag.stderr).toContain("set API_BASE_URL or --routes, not both");
  });
});

describe("Pure pieces", () => {
  test("matchRoute takes the longest prefix that matches on a segment boundary", () => {
    const routes = [{ match: "/search/special" }, { match: "/search" }, { match: "" }];
    const matched = (target: string) => routes.indexOf(matchRoute(routes, target)!);
    expect(["/search", "/search/x", "/search?x=1", "/search/specialty"].map(matched)).toEqual([1, 1, 1, 1]);
    expect(["/search/special", "/search/special/y", "/search/special?z"].map(matched)).toEqual([0, 0, 0]);
    expect(["/searching", "/", "/openai/models"].map(matched)).toEqual([2, 2, 2]);
    expect(matchRoute(routes.slice(0, 2), "/other")).toBeUndefined();
  });
});

describeSecrets();
