/**
 * What every benchmark's proxy needs to get a token: a fake Entra ID over
 * HTTPS with the bench app's certificate registered, and the environment
 * that points a proxy at it (the upstream is the caller's).
 */
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { CertificateFactory } from "../test/certificates.ts";
import { FakeEntraId } from "../test/fakes.ts";

export const BENCH_CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

export function benchEntra(work: string) {
  const certs = new CertificateFactory(join(work, "certs"));
  execFileSync("mkdir", ["-p", certs.dir]);
  const tls = certs.serverTls();
  const app = certs.client("bench-app");
  const entra = new FakeEntraId(tls).start();
  entra.register({ clientId: BENCH_CLIENT_ID, certificates: [app.certificatePem] });
  const env = {
    AZURE_CLIENT_ID: BENCH_CLIENT_ID,
    AZURE_TENANT_ID: entra.tenantId,
    AZURE_CERTIFICATE_PATH: app.pemPath,
    AZURE_AUTHORITY_HOST: entra.authorityHost,
    NODE_EXTRA_CA_CERTS: tls.caPath,
    HOST: "127.0.0.1",
    BUN_CONFIG_MAX_HTTP_REQUESTS: "65535",
  };
  return { certs, tls, app, entra, env };
}
