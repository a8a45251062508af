/**
 * Reload without a restart (shared/CONTRACT.md, Callers: Reload), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts, its routes and callers
 * files swapped as Kubernetes swaps a ConfigMap's `..data` link.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdirSync, renameSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ScriptedBackend } from "../test/fakes.ts";
import { startProxy } from "../test/harness.ts";
import { scrape, valueOf } from "../test/prometheus.ts";
import { TestSocket } from "../test/websocket.ts";
import { baseEnv, certs, describeSecrets, entra, realtime, SEARCH_SCOPE, upstream, useSuite, waitFor } from "../test/suite.ts";

useSuite();

/** A folder laid out as kubelet mounts a ConfigMap: `name -> ..data/name`, `..data -> ..<version>`; `update` swaps `..data` at once. */
function configMapFolder(name: string, files: Record<string, string>): { path: (file: string) => string; update(files: Record<string, string>): void } {
  const dir = join(certs.dir, `configmap-${name}-${Date.now()}`);
  mkdirSync(dir, { recursive: true });
  let version = 0;
  const write = (contents: Record<string, string>) => {
    version += 1;
    const versionDir = join(dir, `..2026_12_07_${version}`);
    mkdirSync(versionDir);
    for (const [file, text] of Object.entries(contents)) writeFileSync(join(versionDir, file), text);
    symlinkSync(`..2026_12_07_${version}`, join(dir, "..data_tmp"));
    renameSync(join(dir, "..data_tmp"), join(dir, "..data"));
  };
  write(files);
  for (const file of Object.keys(files)) symlinkSync(join("..data", file), join(dir, file));
  return { path: (file) => join(dir, file), update: write };
}

describe("Reload without a restart", () => {
  const started: ScriptedBackend[] = [];
  afterAll(() => started.forEach((backend) => backend.stop()));
  const backend = (name: string) => {
    const scripted = new ScriptedBackend(name).start();
    started.push(scripted);
    return scripted;
  };

  test("a ConfigMap-style swap of the routes file is served within 5 s; a bad file is logged with its faults and the old one keeps serving; SIGHUP reads it at once; a resting backend keeps its rest; a new scope's token is asked for at once", async () => {
    const primary = backend("primary").then({ status: 429, headers: { "retry-after": "60" } });
    const secondary = backend("secondary");
    const routes = (extra = "") => `routes:
  - prefix: /
    backends:
      - { url: ${primary.url}, name: primary, priority: 1 }
      - { url: ${secondary.url}, name: secondary, priority: 2 }
${extra}`;
    const folder = configMapFolder("routes", { "routes.yaml": routes() });
    const proxy = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: folder.path("routes.yaml") }));
    await proxy.waitForHealth();
    // The primary is throttled for a minute: requests go to the secondary.
    expect((await fetch(`${proxy.url}/openai/models`)).headers.get("x-backend")).toBe("secondary");
    const extraGoesTo = async () => (await fetch(`${proxy.url}/extra/x`)).headers.get("x-backend") ?? (upstream.received.at(-1)?.target === "/x" ? "upstream" : "?");
    expect(await extraGoesTo()).toBe("secondary");

    // A new route, swapped in as kubelet does: served within 5 s, the primary still resting.
    const swappedAt = Date.now();
    folder.update({ "routes.yaml": routes(`  - prefix: /extra\n    backends:\n      - url: ${upstream.url}\n`) });
    const reloaded = await proxy.waitForLog((line) => line.msg === "configuration reloaded", 5000);
    expect(Date.now() - swappedAt).toBeLessThan(5000);
    expect(reloaded).toMatchObject({ trigger: "file changed", routes: ["/extra", "/"] });
    expect(await extraGoesTo()).toBe("upstream");
    expect((await fetch(`${proxy.url}/openai/models`)).headers.get("x-backend")).toBe("secondary");
    expect(primary.received).toHaveLength(1);
    const afterGood = await scrape(proxy.url);
    expect(valueOf(afterGood.samples, "auth_proxy_backend_up", { route: "/", backend: "primary" })).toBe(0);
    expect(valueOf(afterGood.samples, "auth_proxy_backend_requests_total", { route: "/", backend: "primary", code: "429" })).toBe(1);

    // A bad file: every fault logged with its place, counted, the last good routes serving.
    folder.update({ "routes.yaml": "routes:\n  - prefix: nowhere\n    backends: []\n" });
    const failed = await proxy.waitForLog((line) => line.msg === "configuration reload failed; the last good one keeps serving", 5000);
    expect(failed.level).toBe("error");
    expect((failed.faults as string[]).join("\n")).toContain("routes[0].prefix must be a path starting with /");
    expect((failed.faults as string[]).join("\n")).toContain("routes[0].backends must list one to 32 backends");
    expect(await extraGoesTo()).toBe("upstream");
    await Bun.sleep(2500);
    expect(proxy.lines.filter((line) => line.msg === "configuration reload failed; the last good one keeps serving")).toHaveLength(1);

    // SIGHUP: read at once, here with a route of a new scope, whose token is asked for at once.
    const written = routes(`  - prefix: /search\n    scope: ${SEARCH_SCOPE}\n    backends:\n      - url: ${upstream.url}\n`);
    folder.update({ "routes.yaml": written });
    proxy.proc.kill("SIGHUP");
    const hup = await proxy.waitForLog((line) => line.msg === "configuration reloaded" && line.trigger === "SIGHUP", 1000);
    expect(hup.routes).toEqual(["/search", "/"]);
    await proxy.waitForLog((line) => line.msg === "token acquired" && line.scope === SEARCH_SCOPE, 5000);
    expect((await fetch(`${proxy.url}/search/indexes`)).status).toBe(200);
    expect(await extraGoesTo()).toBe("secondary");
    await proxy.waitForHealth(200, 5000);
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_config_reloads_total", { file: "routes", result: "success" })).toBeGreaterThanOrEqual(2);
    expect(valueOf(samples, "auth_proxy_config_reloads_total", { file: "routes", result: "failure" })).toBe(1);
    expect(entra.scopes.filter((scope) => scope === SEARCH_SCOPE).length).toBeGreaterThanOrEqual(1);
    await proxy.stop();
  }, 30_000);

  test("a stream and a WebSocket session that started before two reloads finish byte-exact on what they started with", async () => {
    const folder = configMapFolder("routes-live", { "routes.yaml": `routes:\n  - prefix: /\n    backends:\n      - url: ${upstream.url}\n  - prefix: /rt\n    backends:\n      - url: ${realtime.url}\n` });
    const proxy = await startProxy(baseEnv({ API_BASE_URL: undefined, AUTH_PROXY_ROUTES: folder.path("routes.yaml") }));
    await proxy.waitForHealth();
    const parts = Array.from({ length: 40 }, (_, index) => `data: {"index":${index},"pad":"${"x".repeat(index * 7)}"}\n\n`);
    upstream.answers.set("reload-stream", { headers: { "content-type": "text/event-stream" }, parts, gapMs: 100 });
    const stream = await fetch(`${proxy.url}/test/answer/reload-stream`);
    const body = stream.text();
    const client = new TestSocket(`ws://127.0.0.1:${proxy.port}/rt/openai/v1/realtime?model=gpt-realtime`);
    await client.waitForFrames(1);
    // Two reloads: the routes the stream and the session took are gone from the new files.
    folder.update({ "routes.yaml": `routes:\n  - prefix: /other\n    backends:\n      - url: ${upstream.url}\n` });
    await proxy.waitForLog((line) => line.msg === "configuration reloaded", 5000);
    proxy.proc.kill("SIGHUP");
    await waitFor(() => proxy.lines.filter((line) => line.msg === "configuration reloaded").length === 2, 2000);
    expect((await fetch(`${proxy.url}/test/answer/reload-stream`)).status).toBe(404);
    expect(await body).toBe(parts.join(""));
    const framesBefore = client.frames.length;
    const message = JSON.stringify({ type: "conversation.item.create", item: { text: "after two reloads" } });
    client.socket.send(message);
    await waitFor(() => client.frames.length > framesBefore, 5000);
    expect(client.frames.at(-1)).toBe(message);
    client.socket.close(1000);
    await proxy.waitForLog((line) => line.msg === "websocket session", 5000);
    await proxy.stop();
  }, 30_000);

  test("a callers file swapped in: a removed caller's next request is refused, a new one accepted, their counts go on; a bad one keeps the last good callers", async () => {
    const callers = (names: string[]) => `callers:\n${names.map((name) => `  - name: ${name}\n    keys: [${name}-key-0000]\n`).join("")}`;
    const folder = configMapFolder("callers", { "callers.yaml": callers(["alpha", "beta"]) });
    const proxy = await startProxy(baseEnv({ AUTH_PROXY_CALLERS: folder.path("callers.yaml") }));
    await proxy.waitForHealth();
    const status = async (key: string) => (await fetch(`${proxy.url}/openai/models`, { headers: { "api-key": key } })).status;
    expect([await status("alpha-key-0000"), await status("beta-key-0000"), await status("gamma-key-0000")]).toEqual([200, 200, 401]);
    folder.update({ "callers.yaml": callers(["alpha", "gamma"]) });
    expect(await proxy.waitForLog((line) => line.msg === "configuration reloaded", 5000)).toMatchObject({ callers: ["alpha", "gamma"] });
    expect([await status("alpha-key-0000"), await status("beta-key-0000"), await status("gamma-key-0000")]).toEqual([200, 401, 200]);
    folder.update({ "callers.yaml": "callers:\n  - name: Not Valid\n" });
    await proxy.waitForLog((line) => line.msg === "configuration reload failed; the last good one keeps serving", 5000);
    expect([await status("alpha-key-0000"), await status("gamma-key-0000")]).toEqual([200, 200]);
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_requests_total", { caller: "alpha", code: "200" })).toBe(3);
    expect(valueOf(samples, "auth_proxy_config_reloads_total", { file: "callers", result: "success" })).toBe(1);
    expect(valueOf(samples, "auth_proxy_config_reloads_total", { file: "callers", result: "failure" })).toBe(1);
    await proxy.stop();
  }, 30_000);
});

describeSecrets();
