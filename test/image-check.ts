/**
 * `make image-check`: proves the container image's contents without a
 * Docker engine. The compiled binary runs in a root holding exactly what
 * the `scratch` image holds (deploy/rootfs.sh), mounted read-only, as uid
 * 65532, with /proc and /dev as a container runtime provides them; then it
 * is driven against the fakes: /health, a streamed completion,
 * --healthcheck, --check, a SIGTERM drain. `make image-test` runs the same
 * checks (`checkImageRoot`) on the root file systems unpacked from the
 * built images.
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

const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const USER = "65532:65532";
const DEVICES = ["null", "zero", "random", "urandom"];

function run(command: string, ...args: string[]): void {
  execFileSync(command, args, { stdio: ["ignore", "ignore", "pipe"] });
}

async function runInImage(command: string[], env: Record<string, string>, timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = Bun.spawn(command, { env: { PATH: process.env.PATH, ...env }, stdout: "pipe", stderr: "pipe", timeout: timeoutMs });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { code, stdout, stderr };
}

/** Why images cannot be run on this machine, or undefined when they can. */
export function cannotRunImages(): string | undefined {
  if (process.getuid?.() !== 0) return "chroot and mount need root (CI runs as root)";
  if (spawnSync("chroot", ["--version"]).status !== 0) return "no chroot command on this machine";
  return undefined;
}

/**
 * Runs an image root file system's /auth-proxy read-only as uid 65532 and
 * drives it. The root is taken over: /certs (as a mounted Secret), /proc
 * and /dev (as a runtime mounts them) are added. Prints one line a check;
 * returns the number that failed.
 */
export async function checkImageRoot(root: string, label = ""): Promise<number> {
  let failures = 0;
  const check = (name: string, ok: boolean, detail = "") => {
    console.log(`${ok ? "✔" : "✘"} ${label}${name}${detail ? `: ${detail}` : ""}`);
    if (!ok) failures += 1;
  };
  chmodSync(root, 0o755); // uid 65532 must be able to enter its own /
  const certs = new CertificateFactory(join(root, "certs"));
  mkdirSync(certs.dir, { recursive: true });
  const tls = certs.serverTls();
  const app = certs.client("image-app");
  chmodSync(certs.dir, 0o755);
  for (const file of ["ca.pem", "image-app.pem"]) chmodSync(certs.path(file), 0o644);
  mkdirSync(join(root, "proc"), { recursive: true });
  mkdirSync(join(root, "dev"), { recursive: true });
  for (const device of DEVICES) writeFileSync(join(root, "dev", device), "");

  const mounts: string[] = [];
  try {
    // Read-only root, then the runtime's /proc and device nodes on top of it.
    try {
      run("mount", "--bind", root, root);
      mounts.unshift(root);
      run("mount", "-o", "remount,bind,ro", root);
      run("mount", "-t", "proc", "proc", join(root, "proc"));
      mounts.unshift(join(root, "proc"));
      for (const device of DEVICES) {
        run("mount", "--bind", `/dev/${device}`, join(root, "dev", device));
        mounts.unshift(join(root, "dev", device));
      }
    } catch (error) {
      check("a read-only root with /proc can be mounted here", false, (error as Error).message.split("\n")[0]);
      return failures;
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
    const chat = (stream: boolean) =>
      fetch(`${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`, {
        method: "POST",
        headers: { "content-type": "application/json", "api-key": "placeholder" },
        body: JSON.stringify({ stream, messages: [{ role: "user", content: "Hi" }] }),
      });
    const words = (text: string) => [...text.matchAll(/"content":"([^"]*)"/g)].map((match) => match[1]).join("");
    try {
      await proxy.waitForHealth(200);
      check("/health answers 200 once the token is held", true);
      // chroot execs the binary, and the binary re-execs itself: one PID throughout.
      const uid = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${proxy.proc.pid}/status`, "utf8"))?.[1];
      check("the proxy runs as uid 65532", uid === "65532", `uid ${uid}`);

      const response = await chat(true);
      const text = await response.text();
      check("a streamed chat completion passes through with the token", response.status === 200 && words(text) === "Hello from the fake Azure OpenAI." && upstream.received.at(-1)!.tokenValid, words(text));

      const probe = await runInImage([...chroot, "--healthcheck"], { HOST: "127.0.0.1", PORT: String(proxy.port) }, 2000);
      check("--healthcheck exits 0 within 2 s", probe.code === 0, probe.stdout.trim());

      // Asynchronously: this process serves the fake Entra ID that --check calls.
      const summary = await runInImage([...chroot, "--check"], env, 15000);
      const parsed = summary.code === 0 ? JSON.parse(summary.stdout) : undefined;
      check("--check acquires a token and prints its summary", parsed?.status === "ok" && /^[0-9A-F]{64}$/.test(parsed?.certificate_thumbprint ?? ""), summary.stderr.trim() || `thumbprint ${parsed?.certificate_thumbprint}`);

      // SIGTERM mid-stream: /health turns 503, the stream still ends whole, the exit is 0.
      const streaming = await chat(true);
      const reader = streaming.body!.getReader();
      let streamed = new TextDecoder().decode((await reader.read()).value);
      proxy.proc.kill("SIGTERM");
      let health = 200;
      for (const deadline = Date.now() + 2000; health === 200 && Date.now() < deadline; await Bun.sleep(20)) health = await fetch(`${proxy.url}/health`).then((r) => r.status, () => 0);
      for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) streamed += new TextDecoder().decode(chunk.value);
      const exitCode = await proxy.proc.exited;
      // 503 while the listener is open, refused once it has closed: never 200 again.
      check("SIGTERM drains: /health stops answering 200, the open stream ends whole, exit 0", health !== 200 && words(streamed) === "Hello from the fake Azure OpenAI." && exitCode === 0, `health ${health || "refused"}, exit ${exitCode}`);
    } finally {
      await proxy.stop();
      entra.stop();
      await upstream.stop();
    }
  } finally {
    for (const mount of mounts) spawnSync("umount", ["-l", mount]);
  }
  return failures;
}

if (import.meta.main) {
  const binary = process.argv[2] ?? join(ROOT, "dist/auth-proxy");
  const reason = cannotRunImages();
  if (reason !== undefined) {
    console.log(`image-check skipped: ${reason}`);
    process.exit(0);
  }
  const root = mkdtempSync(join(tmpdir(), "auth-proxy-image-"));
  let failures = 1;
  try {
    run("sh", join(ROOT, "deploy/rootfs.sh"), binary, root);
    failures = await checkImageRoot(root);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
  console.log(failures === 0 ? "image-check passed" : `image-check: ${failures} check(s) failed`);
  process.exit(failures === 0 ? 0 : 1);
}
