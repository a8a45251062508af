/**
 * `make demo`: auth-proxy between a fake Entra ID and a fake Azure OpenAI
 * on this machine, and one streamed chat completion through it with curl.
 * No Azure account needed.
 */
import { CertificateFactory } from "./certificates.ts";
import { FakeAzureOpenAI, FakeEntraId } from "./fakes.ts";
import { startProxy } from "./harness.ts";

const CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const dim = (text: string) => (process.stdout.isTTY ? `\x1b[2m${text}\x1b[0m` : text);
const step = (text: string) => console.log(`\n▶ ${text}`);

step("Generating a CA for the fake Entra ID and a client certificate for the app registration");
const certs = new CertificateFactory();
const tls = certs.serverTls();
// 90 days: well past the 30-day expiry warning, which is not what the demo is about.
const app = certs.client("demo-app", undefined, 90);
const entra = new FakeEntraId(tls).start();
entra.register({ clientId: CLIENT_ID, certificates: [app.certificatePem] });
const upstream = await new FakeAzureOpenAI(entra).start();
console.log(`  fake Entra ID      ${entra.authorityHost} (verifies the signed client assertion)`);
console.log(`  fake Azure OpenAI  ${upstream.url} (accepts only tokens the fake Entra ID issued)`);

step("Starting auth-proxy (bun proxy.ts)");
const proxy = await startProxy({
  AZURE_CLIENT_ID: CLIENT_ID,
  AZURE_TENANT_ID: entra.tenantId,
  AZURE_CERTIFICATE_PATH: app.pemPath,
  API_BASE_URL: upstream.url,
  AZURE_AUTHORITY_HOST: entra.authorityHost,
  NODE_EXTRA_CA_CERTS: tls.caPath,
});
await proxy.waitForHealth(200);
for (const line of proxy.stdout.trim().split("\n")) console.log(dim(`  ${line}`));

const url = `${proxy.url}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21`;
const body = JSON.stringify({ stream: true, messages: [{ role: "user", content: "Say hello" }] });
step(`curl -N ${url} -H 'api-key: placeholder' -d '${body}'`);
let exitCode = 1;
try {
  const curl = Bun.spawn(["curl", "-sS", "-N", url, "-H", "content-type: application/json", "-H", "api-key: placeholder", "-d", body], {
    stdout: "inherit",
    stderr: "inherit",
  });
  await curl.exited;
  const received = upstream.received.at(-1);
  const ok = curl.exitCode === 0 && received?.tokenValid === true && received.headers["api-key"] === undefined;
  const events = proxy.lines.find((line) => line.msg === "request");
  console.log(
    ok
      ? `\n✔ Streamed through auth-proxy: the upstream got a bearer token from the fake Entra ID and no api-key (access log: ${events?.status}, first byte after ${events?.ttfb_ms} ms, whole stream ${events?.duration_ms} ms).`
      : `\n✘ Something went wrong; proxy output:\n${proxy.stdout}${proxy.stderr}`,
  );
  exitCode = ok ? 0 : 1;
} finally {
  await proxy.stop();
  entra.stop();
  await upstream.stop();
}
process.exit(exitCode);
