// `bun deploy/image/config-args.ts < inspect.json`: reads `buildah inspect --type image`
// JSON and prints the `buildah config` arguments (NUL-separated) that give another
// image the same runtime config: the arm64 image build.sh assembles gets exactly
// what the Dockerfile gave amd64.
const config = JSON.parse(await Bun.stdin.text()).Docker.config;
const args: string[] = ["--user", config.User, "--entrypoint", JSON.stringify(config.Entrypoint), "--cmd", JSON.stringify(config.Cmd ?? [])];
if (config.WorkingDir) args.push("--workingdir", config.WorkingDir);
for (const env of config.Env ?? []) args.push("--env", env);
for (const port of Object.keys(config.ExposedPorts ?? {})) args.push("--port", port);
for (const [key, value] of Object.entries(config.Labels ?? {})) args.push("--label", `${key}=${value}`);
const check = config.Healthcheck;
if (check) {
  const seconds = (ns: number) => `${ns / 1e9}s`;
  // buildah splits the command on blanks (`CMD /auth-proxy --healthcheck`); a JSON array would be one word.
  args.push("--healthcheck", check.Test.join(" "), "--healthcheck-interval", seconds(check.Interval), "--healthcheck-timeout", seconds(check.Timeout));
  args.push("--healthcheck-start-period", seconds(check.StartPeriod), "--healthcheck-retries", String(check.Retries));
}
process.stdout.write(args.map((arg) => `${arg}\0`).join(""));
