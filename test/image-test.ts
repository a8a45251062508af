/**
 * `make image-test`: the archives `make image` wrote, checked as a user's
 * engine would see them. For each: the image config the contract and the
 * manifests assume (skopeo inspect); the root file system unpacked (skopeo,
 * umoci) and listed, with no shell and no package manager in it; and its
 * /auth-proxy run read-only as uid 65532 through the end-to-end core checks
 * (test/image-check.ts). An image for another architecture than this
 * machine's runs `--version` under qemu-user against its own glibc. The
 * multi-arch archive must be an OCI index of amd64 and arm64.
 *
 * Usage: bun test/image-test.ts [archives...]   (default: dist/auth-proxy-*.oci.tar)
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, lstatSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { arch, tmpdir } from "node:os";
import { join, relative } from "node:path";
import { cannotRunImages, checkImageRoot } from "./image-check.ts";
import { ROOT } from "./harness.ts";

const archives = process.argv.length > 2 ? process.argv.slice(2) : readdirSync(join(ROOT, "dist")).filter((name) => /^auth-proxy-.*\.oci\.tar$/.test(name)).map((name) => join(ROOT, "dist", name));
if (archives.length === 0) throw new Error("no dist/auth-proxy-*.oci.tar: run `make image` first");
for (const tool of ["skopeo", "umoci"]) if (!Bun.which(tool)) throw new Error(`make image-test needs ${tool}: apt-get install skopeo umoci`);
const revision = execFileSync("git", ["rev-parse", "--short=12", "HEAD"], { cwd: ROOT }).toString().trim();
const machineArch = arch() === "x64" ? "amd64" : arch();
const SHELLS = new Set(["sh", "bash", "dash", "ash", "zsh", "busybox", "toybox"]);
const PACKAGE_MANAGERS = new Set(["apt", "apt-get", "dpkg", "dpkg-deb", "rpm", "yum", "dnf", "apk", "pip", "npm"]);
let failures = 0;

function check(name: string, ok: boolean, detail = ""): void {
  console.log(`${ok ? "✔" : "✘"} ${name}${detail ? `: ${detail}` : ""}`);
  if (!ok) failures += 1;
}

function skopeo(...args: string[]): any {
  return JSON.parse(execFileSync("skopeo", args, { maxBuffer: 64 << 20 }).toString());
}

/** Every path under `root`, relative, with its size; directories end with `/`. */
function listing(root: string): { path: string; bytes: number }[] {
  const entries: { path: string; bytes: number }[] = [];
  const walk = (dir: string) => {
    for (const name of readdirSync(dir)) {
      const full = join(dir, name);
      const stat = lstatSync(full);
      if (stat.isDirectory()) {
        entries.push({ path: `${relative(root, full)}/`, bytes: 0 });
        walk(full);
      } else entries.push({ path: relative(root, full), bytes: stat.size });
    }
  };
  walk(root);
  return entries;
}

/** What an image holds, summed by its top two directory levels, largest first. */
function summary(entries: { path: string; bytes: number }[]): string {
  const groups = new Map<string, { files: number; bytes: number }>();
  for (const entry of entries) {
    if (entry.path.endsWith("/")) continue;
    const segments = entry.path.split("/");
    const key = segments.slice(0, segments.length > 2 ? 2 : segments.length).join("/");
    const group = groups.get(key) ?? { files: 0, bytes: 0 };
    group.files += 1;
    group.bytes += entry.bytes;
    groups.set(key, group);
  }
  return [...groups].sort((a, b) => b[1].bytes - a[1].bytes).map(([key, group]) => `    ${(group.bytes / 1048576).toFixed(1).padStart(6)} MB ${String(group.files).padStart(5)} files  /${key}`).join("\n");
}

const work = mkdtempSync(join(tmpdir(), "auth-proxy-image-test-"));
try {
  for (const archive of archives) {
    const name = archive.replace(/^.*\/auth-proxy-|\.oci\.tar$/g, "");
    const raw = skopeo("inspect", "--raw", `oci-archive:${archive}`);
    if (raw.manifests) {
      const platforms = raw.manifests.map((m: any) => `${m.platform?.os}/${m.platform?.architecture}`).sort();
      check(`${name}: an OCI index of linux/amd64 and linux/arm64`, JSON.stringify(platforms) === '["linux/amd64","linux/arm64"]', platforms.join(", "));
      continue;
    }
    const expectedArch = name.split("-").at(-1)!;
    const target = name.split("-")[0]!;
    // The config as stored: skopeo's converted view would drop HEALTHCHECK, which only Docker's config format has.
    const config = skopeo("inspect", "--config", "--raw", `oci-archive:${archive}`);
    const runtime = config.config ?? {};
    const env: string[] = runtime.Env ?? [];
    const labels: Record<string, string> = runtime.Labels ?? {};
    console.log(`${name}: ${(statSync(archive).size / 1048576).toFixed(1)} MB archive, ${config.os}/${config.architecture}`);
    check(`${name}: platform linux/${expectedArch}`, config.os === "linux" && config.architecture === expectedArch, `${config.os}/${config.architecture}`);
    check(`${name}: user 65532:65532`, runtime.User === "65532:65532", runtime.User);
    check(`${name}: entrypoint /auth-proxy, no command`, JSON.stringify(runtime.Entrypoint) === '["/auth-proxy"]' && !(runtime.Cmd?.length), JSON.stringify([runtime.Entrypoint, runtime.Cmd]));
    for (const variable of ["BUN_CONFIG_MAX_HTTP_REQUESTS=65535", "HOST=0.0.0.0", "PORT=8080"]) check(`${name}: env ${variable}`, env.includes(variable));
    check(`${name}: exposes 8080/tcp`, Object.keys(runtime.ExposedPorts ?? {}).join() === "8080/tcp", Object.keys(runtime.ExposedPorts ?? {}).join());
    const healthcheck = runtime.Healthcheck;
    check(`${name}: healthcheck /auth-proxy --healthcheck every 10 s`, JSON.stringify(healthcheck?.Test) === '["CMD","/auth-proxy","--healthcheck"]' && healthcheck?.Interval === 10e9, JSON.stringify(healthcheck));
    check(`${name}: OCI labels with the revision ${revision}`, labels["org.opencontainers.image.revision"] === revision && labels["org.opencontainers.image.title"] === "auth-proxy" && labels["org.opencontainers.image.licenses"] === "MIT", labels["org.opencontainers.image.revision"]);

    // Unpacked as a runtime would, then listed.
    const layout = join(work, `${name}-layout`);
    const root = join(work, `${name}-root`);
    execFileSync("skopeo", ["copy", "--quiet", `oci-archive:${archive}`, `oci:${layout}:image`]);
    execFileSync("umoci", ["raw", "unpack", "--image", `${layout}:image`, root]);
    const entries = listing(root);
    const files = entries.filter((entry) => !entry.path.endsWith("/"));
    const bytes = files.reduce((sum, entry) => sum + entry.bytes, 0);
    console.log(`${name}: ${files.length} files, ${(bytes / 1048576).toFixed(1)} MB unpacked:\n${summary(entries)}`);
    const shells = files.filter((entry) => SHELLS.has(entry.path.split("/").at(-1)!));
    check(`${name}: no shell`, shells.length === 0, shells.map((entry) => entry.path).join(", "));
    const managers = files.filter((entry) => PACKAGE_MANAGERS.has(entry.path.split("/").at(-1)!));
    check(`${name}: no package manager`, managers.length === 0, managers.map((entry) => entry.path).join(", "));
    const binary = statSync(join(root, "auth-proxy"));
    check(`${name}: /auth-proxy is root's, executable, not writable by 65532`, binary.uid === 0 && (binary.mode & 0o111) !== 0 && (binary.mode & 0o002) === 0, `uid ${binary.uid} mode ${(binary.mode & 0o777).toString(8)}`);
    if (target === "scratch") {
      const unexpected = files.filter((entry) => !/^(auth-proxy|etc\/(passwd|group|ssl\/certs\/ca-certificates\.crt)|(usr\/)?lib(64|\/x86_64-linux-gnu|\/aarch64-linux-gnu)?\/(ld-linux[^/]*|lib(c|m|pthread|dl)\.so\.[0-9]+))$/.test(entry.path));
      check(`${name}: only the binary, glibc, passwd/group and the CA bundle`, unexpected.length === 0, unexpected.map((entry) => entry.path).join(", "));
    }

    if (expectedArch === machineArch) {
      const reason = cannotRunImages();
      if (reason !== undefined) check(`${name}: runs (${reason})`, false);
      else failures += await checkImageRoot(root, `${name}: `);
    } else {
      // The image's own loader and glibc, under qemu-user: proves the binary and the libraries match the architecture.
      const qemu = Bun.which(`qemu-${expectedArch === "arm64" ? "aarch64" : "x86_64"}`);
      const version = qemu ? spawnSync(qemu, ["-L", root, join(root, "auth-proxy"), "--version"], { timeout: 30_000 }) : undefined;
      check(`${name}: /auth-proxy --version runs on the image's own glibc under qemu-user (no ${expectedArch} RUN here)`, version?.status === 0 && version.stdout.toString().includes(revision), qemu ? version!.stdout.toString().trim() || version!.stderr.toString().trim() : "qemu-user not installed");
    }
    rmSync(layout, { recursive: true, force: true });
    if (existsSync(root)) rmSync(root, { recursive: true, force: true });
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}
console.log(failures === 0 ? "image-test passed" : `image-test: ${failures} check(s) failed`);
process.exit(failures === 0 ? 0 : 1);
