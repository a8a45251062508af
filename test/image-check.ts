/**
 * `make image-check`: proves the container image without a Docker engine.
 * The compiled binary runs in a root holding exactly what the `scratch`
 * image holds (deploy/rootfs.sh), mounted read-only, as uid 65532, with
 * /proc and /dev as a container runtime provides them; then it is driven
 * against the fakes: /health, a streamed completion, --healthcheck, --check.
 *
 * Usage: bun test/image-check.ts <binary>
 */
import { execFileSync, spawnSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CertificateFactory } from "./certificates.ts";
import { FakeAzureOpenAI, FakeEntraId } from "./fakes.ts";
import { ROOT, startProxy } from "./harness.ts";

const binary = process.argv[2] ?? join(ROOT, "dist/auth-proxy");
const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const USER = "65532:65532";

function skip(reason: string): never {
  console.log(`image-check skipped: ${reason}`);
  process.exit(0);
}

function run(command: string, ...args: string[]): void {
  execFileSync(command, args, { stdio: ["ignore", "ignore", "pipe"] });
}

if (process.getuid?.() !== 0) skip("chroot and mount need root (CI runs as root)");
if (spawnSync("chroot", ["--version"]).status !== 0) skip("no chroot command on this machine");

const root = mkdtempSync(join(tmpdir(), "auth-proxy-image-"));
chmodSync(root, 0o755); // mkdtemp makes it 0700: uid 65532 could not enter its own /
const mounts: string[] = [];
let failures = 0;

async function runInImage(command: string[], env: Record<string, string>, timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = Bun.spawn(command, { env: { PATH: process.env.PATH, ...env }, stdout: "pipe", stderr: "pipe", timeout: timeoutMs });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { code, stdout, stderr };
}

function check(name: string, ok: boolean, detail = ""): void {
  console.log(`${ok ? "✔" : "✘"} ${name}${detail ? `: ${detail}` : ""}`);
  if (!ok) failures += 1;
}

try {
  run("sh", join(ROOT, "deploy/rootfs.sh"), binary, root);
  // Certificates as a mounted Secret would be: readable by the proxy's user, outside its writable reach.
  const certs = new CertificateFactory(join(root, "certs"));
  mkdirSync(certs.dir, { recursive: true });
  const tls = certs.serverTls();
  const app = certs.client("image-app");
  chmodSync(certs.dir, 0o755);
  for (const file of ["ca.pem", "image-app.pem"]) chmodSync(certs.path(file), 0o644);
  for (const device of ["null", "zero", "random", "urandom"]) writeFileSync(join(root, "dev", device), "");

  // Read-only root, then the runtime's /proc and device nodes on top of it.
  try {
    run("mount", "--bind", root, root);
    mounts.unshift(root);
    run("mount", "-o", "remount,bind,ro", root);
    run("mount", "-t", "proc", "proc", join(root, "proc"));
    mounts.unshift(join(root, "proc"));
    for (const device of ["null", "zero", "random", "urandom"]) {
      run("mount", "--bind", `/dev/${device}`, join(root, "dev", device));
      mounts.unshift(join(root, "dev", device));
    }
  } catch (error) {
    skip(`cannot mount a read-only root with /proc here (${(error as Error).message.split("\n")[0]})`);
  }
  let writable = true;
  try {
    writeFileSync(join(root, "probe"), "x");
  } catch {
    writable = false;
  }
  check("the root is mounted read-only", !writable);

  const entra = new FakeEntraId(tls).start();
  entra.register({ clientId: CLIENT_ID, certificates: [app.certificatePem] });
  const upstream = await new FakeAzureOpenAI(entra).start();
  const chroot = ["chroot", `--userspec=${USER}`, root, "/auth-proxy"];
  const env = {
    AZURE_CLIENT_ID: CLIENT_ID,
    AZURE_TENANT_ID: entra.tenantId,
    AZURE_CERTIFICATE_PATH: "/certs/image-app.pem",
    API_BASE_URL: upstream.url,
    AZURE_AUTHORITY_HOST: entra.authorityHost,
    NODE_EXTRA_CA_CERTS: "/certs/ca.pem",
  };

  const proxy = await startProxy(env, [], chroot);
  try {
    await proxy.waitForHealth(200);
    check("/health answers 200 once the token is held", true);
    // chroot execs the binary, and the binary re-execs itself: one PID throughout.
    const uid = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${proxy.proc.pid}/status`, "utf8"))?.[1];
    check("the proxy runs as uid 65532", uid === "65532", `uid ${uid}`);

    const response = await fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, {
      method: "POST",
      headers: { "content-type": "application/json", "api-key": "placeholder" },
      body: JSON.stringify({ stream: true, messages: [{ role: "user", content: "Hi" }] }),
    });
    const text = await response.text();
    const content = [...text.matchAll(/"content":"([^"]*)"/g)].map((match) => match[1]).join("");
    check("a streamed chat completion passes through", response.status === 200 && content === "Hello from the fake Azure OpenAI.", content);

    const probe = await runInImage([...chroot, "--healthcheck"], { HOST: "127.0.0.1", PORT: String(proxy.port) }, 2000);
    check("--healthcheck exits 0 within 2 s", probe.code === 0, probe.stdout.trim());

    // Asynchronously: this process serves the fake Entra ID that --check calls.
    const summary = await runInImage([...chroot, "--check"], env, 15000);
    const parsed = summary.code === 0 ? JSON.parse(summary.stdout) : undefined;
    check("--check acquires a token and prints its summary", parsed?.status === "ok" && /^[0-9A-F]{64}$/.test(parsed?.certificate_thumbprint ?? ""), summary.stderr.trim() || `thumbprint ${parsed?.certificate_thumbprint}`);
  } finally {
    await proxy.stop();
    entra.stop();
    await upstream.stop();
  }
} finally {
  for (const mount of mounts) spawnSync("umount", ["-l", mount]);
  rmSync(root, { recursive: true, force: true });
}

console.log(failures === 0 ? "image-check passed" : `image-check: ${failures} check(s) failed`);
process.exit(failures === 0 ? 0 : 1);
