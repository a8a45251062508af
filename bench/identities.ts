/**
 * Idle memory per identity mode, and against the build before identities
 * beyond the certificate existed (BENCH_BASELINE_REF, default a0d94d6): each
 * compiled binary started fresh against the fakes, /health 200, 500 ms to
 * settle, VmRSS read, killed; targets interleaved in every round, medians.
 * Part of `make bench`; alone: `bun bench/identities.ts` (after make build-x64).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { CertificateFactory } from "../test/certificates.ts";
import { FakeEntraId, FakeManagedIdentityEndpoint, FakeOidcIssuer } from "../test/fakes.ts";
import { freePort, median, memoryKiB, ROOT, waitForStatus } from "../test/harness.ts";

const BUN = process.execPath;
const CERTIFICATE_APP = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const SECRET_APP = "3f2e1d0c-9b8a-4f7e-8d6c-5b4a3f2e1d0c";
const WORKLOAD_APP = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d";
export const BASELINE_REF = process.env.BENCH_BASELINE_REF ?? "a0d94d6";

/** The proxy as it was at `ref`, compiled like today's; undefined when this checkout lacks the commit. */
/** The compiled binary of `ref`'s proxy.ts (and src/, where it has one), as dist/bench-<name>; undefined when `ref` has no proxy.ts. */
export function buildAt(ref: string, name: string): string | undefined {
  const dir = join(ROOT, `dist/${name}-source`);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const tree = spawnSync("git", ["ls-tree", "--name-only", ref, "proxy.ts", "package.json", "src"], { cwd: ROOT });
  if (tree.status !== 0 || !tree.stdout.toString().includes("proxy.ts")) return undefined;
  execFileSync("sh", ["-c", `git archive ${ref} ${tree.stdout.toString().trim().split("\n").join(" ")} | tar -x -C ${dir}`], { cwd: ROOT });
  const binary = join(ROOT, `dist/bench-${name}`);
  execFileSync(BUN, ["build", join(dir, "proxy.ts"), "--compile", "--minify", "--bytecode", "--no-compile-autoload-dotenv", "--no-compile-autoload-bunfig", "--outfile", binary], { stdio: "ignore" });
  return binary;
}

async function idleRssKiB(binary: string, env: Record<string, string>, serverCpu: string): Promise<number> {
  const port = freePort();
  const child = Bun.spawn(["taskset", "-c", serverCpu, binary], {
    env: { PATH: process.env.PATH, ...env, HOST: "127.0.0.1", PORT: String(port), BUN_CONFIG_MAX_HTTP_REQUESTS: "65535" },
    stdout: "ignore",
    stderr: "inherit",
  });
  try {
    await waitForStatus(`http://127.0.0.1:${port}/health`);
    await Bun.sleep(500);
    return memoryKiB(child.pid, "VmRSS");
  } finally {
    child.kill("SIGKILL");
    await child.exited;
  }
}

/** Median idle RSS (KiB) of each target over `rounds`; the baseline is included when its commit is present. */
export async function identityIdleMemory(options: { upstream: string; proxyBinary: string; rounds: number; serverCpu: string; workDir: string }): Promise<Record<string, number>> {
  const certs = new CertificateFactory(join(options.workDir, "identity-certs"));
  mkdirSync(certs.dir, { recursive: true });
  const tls = certs.serverTls();
  const entra = new FakeEntraId(tls).start();
  const app = certs.client("identity-bench-app");
  const issuer = new FakeOidcIssuer();
  entra.trustIssuer(issuer);
  entra.register({ clientId: CERTIFICATE_APP, certificates: [app.certificatePem] });
  entra.register({ clientId: SECRET_APP, certificates: [], secrets: ["bench-secret-value"] });
  entra.register({ clientId: WORKLOAD_APP, certificates: [], federatedCredentials: [{ issuer: issuer.url, subject: "system:serviceaccount:ai:chat" }] });
  const imds = new FakeManagedIdentityEndpoint(entra, "imds").start();
  const tokenFile = certs.write("azure-identity-token", issuer.serviceAccountToken("ai", "chat", { expiresInSeconds: 24 * 3600 }));
  const common = { API_BASE_URL: options.upstream, AZURE_AUTHORITY_HOST: entra.authorityHost, NODE_EXTRA_CA_CERTS: tls.caPath, AZURE_TENANT_ID: entra.tenantId };
  const certificateEnv = { ...common, AZURE_CLIENT_ID: CERTIFICATE_APP, AZURE_CERTIFICATE_PATH: app.pemPath };
  const targets: Record<string, [string, Record<string, string>]> = {
    certificate: [options.proxyBinary, certificateEnv],
    "client-secret": [options.proxyBinary, { ...common, AZURE_CLIENT_ID: SECRET_APP, AZURE_CLIENT_SECRET: "bench-secret-value" }],
    "workload-identity": [options.proxyBinary, { ...common, AZURE_CLIENT_ID: WORKLOAD_APP, AZURE_FEDERATED_TOKEN_FILE: tokenFile }],
    "managed-identity (IMDS)": [options.proxyBinary, { ...common, AZURE_AUTH_MODE: "managed-identity", ...imds.environment() }],
  };
  const baseline = buildAt(BASELINE_REF, "baseline");
  if (baseline) targets[`certificate, before identities (${BASELINE_REF})`] = [baseline, certificateEnv];
  const samples: Record<string, number[]> = Object.fromEntries(Object.keys(targets).map((name) => [name, []]));
  try {
    for (let round = 0; round < options.rounds; round++) {
      for (const [name, [binary, env]] of Object.entries(targets)) samples[name]!.push(await idleRssKiB(binary, env, options.serverCpu));
    }
  } finally {
    imds.stop();
    entra.stop();
  }
  return Object.fromEntries(Object.entries(samples).map(([name, values]) => [name, median(values)]));
}

if (import.meta.main) {
  const { mkdtempSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const upstream = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("ok") });
  const result = await identityIdleMemory({
    upstream: `http://127.0.0.1:${upstream.port}`,
    proxyBinary: join(ROOT, "dist/auth-proxy"),
    rounds: Number(process.env.BENCH_ROUNDS ?? 5),
    serverCpu: "1",
    workDir: mkdtempSync(join(tmpdir(), "auth-proxy-identities-")),
  });
  for (const [name, kib] of Object.entries(result)) console.log(`${name}: ${(kib / 1024).toFixed(2)} MB`);
  upstream.stop(true);
}
