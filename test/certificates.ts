/**
 * Test certificates, made at test time with the openssl CLI: a CA for the
 * fake Entra ID's HTTPS listener, and client certificates in every key
 * format the proxy accepts.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface ClientCertificate {
  /** Certificate then PKCS#8 key: the common layout. */
  pemPath: string;
  certificatePem: string;
  privateKeyPem: string;
}

export class CertificateFactory {
  private serial = 0;

  constructor(readonly dir = mkdtempSync(join(tmpdir(), "auth-proxy-certs-"))) {}

  private openssl(...args: string[]): void {
    execFileSync("openssl", args, { cwd: this.dir, stdio: ["ignore", "ignore", "pipe"] });
  }

  path(name: string): string {
    return join(this.dir, name);
  }

  read(name: string): string {
    return readFileSync(this.path(name), "utf8");
  }

  /** Readable by the owner only, as a private key should be (the proxy warns about a key every user can read). */
  write(name: string, text: string): string {
    writeFileSync(this.path(name), text, { mode: 0o600 });
    return this.path(name);
  }

  /** A CA and a server certificate for 127.0.0.1/localhost signed by it, for the fake Entra ID. */
  serverTls(): { caPath: string; cert: string; key: string } {
    this.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=auth-proxy test CA");
    this.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost");
    this.write("server.ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
    this.openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext");
    return { caPath: this.path("ca.pem"), cert: this.read("server.pem"), key: this.read("server.key") };
  }

  /** A self-signed RSA client certificate, as users upload to an app registration. */
  /** An app registration's certificate; `days` 2 by default, so the expiry warning has something to warn of. */
  client(name: string, keyOptions = ["-newkey", "rsa:2048"], days = 2): ClientCertificate {
    this.serial += 1;
    this.openssl("req", "-x509", ...keyOptions, "-nodes", "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", String(days), "-subj", `/CN=${name}`, "-set_serial", String(this.serial));
    const certificatePem = this.read(`${name}.crt`);
    const privateKeyPem = this.read(`${name}.key`);
    return { pemPath: this.write(`${name}.pem`, certificatePem + privateKeyPem), certificatePem, privateKeyPem };
  }

  /** A client certificate signed by an issuing CA, with that CA as its chain: for subject-name/issuer auth. */
  chained(name: string): ClientCertificate & { issuerPem: string } {
    this.openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}-issuer.key`, "-out", `${name}-issuer.crt`, "-days", "2", "-subj", `/CN=${name} issuing CA`);
    this.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    this.openssl("x509", "-req", "-in", `${name}.csr`, "-CA", `${name}-issuer.crt`, "-CAkey", `${name}-issuer.key`, "-CAcreateserial", "-out", `${name}.crt`, "-days", "2");
    const certificatePem = this.read(`${name}.crt`);
    const issuerPem = this.read(`${name}-issuer.crt`);
    const privateKeyPem = this.read(`${name}.key`);
    return { pemPath: this.write(`${name}.pem`, certificatePem + issuerPem + privateKeyPem), certificatePem, privateKeyPem, issuerPem };
  }

  /** A self-signed client certificate whose validity ended in 2020, made with `openssl ca` (the only way to set past dates in OpenSSL 3.0). */
  expired(name: string): ClientCertificate {
    this.openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
    this.write(`${name}.index`, "");
    this.write(`${name}.serial`, "01\n");
    this.write(
      `${name}.cnf`,
      `[ca]\ndefault_ca = expired\n[expired]\ndir = .\ndatabase = ${name}.index\nnew_certs_dir = .\nserial = ${name}.serial\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n`,
    );
    this.openssl("ca", "-batch", "-config", `${name}.cnf`, "-selfsign", "-keyfile", `${name}.key`, "-in", `${name}.csr`, "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-notext", "-out", `${name}.crt`);
    const certificatePem = this.read(`${name}.crt`);
    const privateKeyPem = this.read(`${name}.key`);
    return { pemPath: this.write(`${name}.pem`, certificatePem + privateKeyPem), certificatePem, privateKeyPem };
  }

  /** The same key as PKCS#1 (`BEGIN RSA PRIVATE KEY`). */
  pkcs1(name: string): string {
    this.openssl("rsa", "-in", `${name}.key`, "-out", `${name}.pkcs1.key`, "-traditional");
    return this.read(`${name}.pkcs1.key`);
  }

  /** The same key as encrypted PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`). */
  encrypted(name: string, password: string): string {
    this.openssl("pkcs8", "-topk8", "-in", `${name}.key`, "-out", `${name}.enc.key`, "-v2", "aes-256-cbc", "-passout", `pass:${password}`);
    return this.read(`${name}.enc.key`);
  }
}
