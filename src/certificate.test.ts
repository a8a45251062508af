/**
 * Certificates (shared/CONTRACT.md), through real sockets: the proxy as its
 * own process against the fakes of test/suite.ts; the pure pieces of
 * src/certificate.ts called directly.
 */
import { describe, expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { parseCredential } from "../src/certificate.ts";
import { spawnProxy, startProxy } from "../test/harness.ts";
import { scrape, valueOf } from "../test/prometheus.ts";
import { appCertificate, baseEnv, certs, describeSecrets, entra, readJson, thumbprintOf, useSuite } from "../test/suite.ts";

useSuite();

describe("Certificates", () => {
  test("the startup line and --check name both thumbprints; a certificate expiring within 30 days is a warning", async () => {
    const sha1 = new X509Certificate(appCertificate.certificatePem).fingerprint.replace(/:/g, "");
    const proxy = await startProxy(baseEnv());
    const started = await proxy.waitForLog((line) => line.msg === "auth-proxy started");
    expect(started).toMatchObject({ certificate_thumbprint: thumbprintOf(appCertificate.certificatePem), certificate_thumbprint_sha1: sha1 });
    // The test certificates live two days.
    const warning = await proxy.waitForLog((line) => line.msg === "the certificate expires soon; upload and mount a new one");
    expect(warning).toMatchObject({ level: "warn", certificate_thumbprint_sha1: sha1 });
    expect(warning.days_left as number).toBeLessThanOrEqual(2);
    await proxy.stop();
    const check = spawnProxy(baseEnv(), ["--check"]);
    expect(await check.exited).toBe(0);
    expect(JSON.parse(check.stdout)).toMatchObject({ certificate_thumbprint_sha1: sha1 });
  });

  test("AADSTS700027 failures name both thumbprints and say what to compare", async () => {
    const unregistered = certs.client("unregistered-2");
    const sha1 = new X509Certificate(unregistered.certificatePem).fingerprint.replace(/:/g, "");
    const proxy = await startProxy(baseEnv({ AZURE_CERTIFICATE_PATH: unregistered.pemPath }));
    const failure = await proxy.waitForLog((line) => line.msg === "token acquisition failed");
    expect(failure).toMatchObject({ aadsts: "AADSTS700027", certificate_thumbprint: thumbprintOf(unregistered.certificatePem), certificate_thumbprint_sha1: sha1 });
    expect(String(failure.hint)).toContain(`Compare the portal's thumbprint under Certificates & secrets with SHA-1 ${sha1}`);
    await proxy.stop();
    const check = spawnProxy(baseEnv({ AZURE_CERTIFICATE_PATH: unregistered.pemPath }), ["--check"]);
    expect(await check.exited).toBe(1);
    expect(check.stderr).toContain(`SHA-1 ${sha1}`);
    expect(check.stderr).toContain("differs from the file, or it has expired");
  });

  test("an expired certificate is an error at startup and the reason /health gives", async () => {
    const expired = certs.expired("expired-app");
    const clientId = "1e000000-0000-4000-8000-0000000000a3";
    entra.register({ clientId, certificates: [expired.certificatePem] });
    const proxy = await startProxy(baseEnv({ AZURE_CLIENT_ID: clientId, AZURE_CERTIFICATE_PATH: expired.pemPath }));
    const error = await proxy.waitForLog((line) => line.msg === "the certificate has expired; Entra ID will reject it");
    expect(error).toMatchObject({ level: "error", not_after: "2020-01-02T00:00:00.000Z" });
    await proxy.waitForLog((line) => line.msg === "token acquisition failed");
    const health = await fetch(`${proxy.url}/health`);
    expect(health.status).toBe(503);
    expect((await readJson(health)).reason).toStartWith("the certificate (SHA-1 ");
    const { samples } = await scrape(proxy.url);
    expect(valueOf(samples, "auth_proxy_certificate_expiration_timestamp_seconds")).toBe(Date.parse("2020-01-02T00:00:00Z") / 1000);
    await proxy.stop();
  });
});

describe("Pure pieces", () => {
  test("parseCredential computes the SHA-256 thumbprint and puts the leaf first in the chain", () => {
    const chained = certs.chained("order");
    const credential = parseCredential(chained.issuerPem + chained.privateKeyPem + chained.certificatePem, undefined, "test.pem");
    expect(credential.thumbprintSha256).toBe(thumbprintOf(chained.certificatePem));
    expect(credential.certificateChainPem.indexOf(chained.certificatePem.trim().split("\n")[1]!)).toBe(28);
    expect(credential.subject).toBe("CN=order");
  });
});

describeSecrets();
