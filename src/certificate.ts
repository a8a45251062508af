/**
 * Certificate mode's credential: the PEM (certificate, chain, private key in
 * any order, encrypted or not) read and checked, its SHA-256 and SHA-1
 * thumbprints, subject and expiry.
 *
 * Imports: log, config.
 */
import { createPrivateKey, createPublicKey, X509Certificate, type KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { errorMessage, unreadableReason } from "./log.ts";
import { type Config } from "./config.ts";

export interface Credential {
  /** PKCS#8 PEM, decrypted: what MSAL signs the client assertion with. */
  privateKeyPem: string;
  /** Hex SHA-256 of the leaf certificate's DER: the `x5t#S256` Entra matches against the uploaded certificate. */
  thumbprintSha256: string;
  /** Uppercase hex SHA-1 of the leaf: what the Azure portal shows under Certificates & secrets. */
  thumbprintSha1: string;
  /** Leaf first, then the chain, as PEM: sent as x5c when AZURE_CLIENT_SEND_CERTIFICATE_CHAIN is on. */
  certificateChainPem: string;
  subject: string;
  notAfter: Date;
}

/** A fault in the certificate file, phrased for the person who must fix it. */
export class CredentialError extends Error {}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]*?-----END \1-----/g;

/** How Entra ID and the Azure portal name a certificate: hex SHA-256 thumbprint and one-line subject. */
function certificateThumbprint(certificate: X509Certificate): string {
  return certificate.fingerprint256.replace(/:/g, "");
}

function certificateSubject(certificate: X509Certificate): string {
  return certificate.subject.replace(/\n/g, ", ");
}

function spki(key: KeyObject): string {
  return key.export({ type: "spki", format: "der" }).toString("base64");
}

/**
 * Parses a PEM holding the certificate (optionally followed by its chain)
 * and its private key, in any order. The key may be PKCS#8, PKCS#1 or
 * encrypted PKCS#8 (then `password` decrypts it).
 */
export function parseCredential(pem: string, password: string | undefined, file: string): Credential {
  const certificates: X509Certificate[] = [];
  const keyBlocks: { label: string; text: string }[] = [];
  for (const [text, label = ""] of pem.matchAll(PEM_BLOCK)) {
    if (label === "CERTIFICATE") {
      try {
        certificates.push(new X509Certificate(text));
      } catch (error) {
        throw new CredentialError(`${file} holds a certificate block that cannot be parsed (${errorMessage(error)})`);
      }
    } else if (label.endsWith("PRIVATE KEY")) {
      keyBlocks.push({ label, text });
    }
  }
  if (certificates.length === 0) {
    throw new CredentialError(`${file} holds no certificate (expected a -----BEGIN CERTIFICATE----- block)`);
  }
  if (keyBlocks.length === 0) {
    throw new CredentialError(`${file} holds no private key (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or ENCRYPTED PRIVATE KEY)`);
  }
  if (keyBlocks.length > 1) throw new CredentialError(`${file} holds ${keyBlocks.length} private keys; keep only the certificate's own`);

  const { label, text } = keyBlocks[0]!;
  const encrypted = label === "ENCRYPTED PRIVATE KEY" || /Proc-Type: 4,ENCRYPTED/.test(text);
  if (encrypted && !password) {
    throw new CredentialError(`${file} holds an encrypted private key; set AZURE_CERTIFICATE_PASSWORD`);
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(encrypted ? { key: text, format: "pem", passphrase: password } : { key: text, format: "pem" });
  } catch (error) {
    throw new CredentialError(
      encrypted
        ? `AZURE_CERTIFICATE_PASSWORD does not decrypt the private key in ${file}`
        : `${file} holds a private key that cannot be parsed (${errorMessage(error)})`,
    );
  }
  // Entra ID signs in apps only with RSA certificates (PS256/RS256 assertions).
  if (privateKey.asymmetricKeyType !== "rsa") {
    throw new CredentialError(`${file} holds a ${privateKey.asymmetricKeyType?.toUpperCase()} key; Entra ID accepts only RSA certificates`);
  }

  const publicKey = spki(createPublicKey(privateKey));
  const leaf = certificates.find((certificate) => spki(certificate.publicKey) === publicKey);
  if (!leaf) {
    const [first] = certificates;
    throw new CredentialError(
      `the private key in ${file} does not belong to its certificate (${certificateSubject(first!)}, SHA-256 ${certificateThumbprint(first!)})`,
    );
  }
  const chain = [leaf, ...certificates.filter((certificate) => certificate !== leaf)];
  return {
    privateKeyPem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    thumbprintSha256: certificateThumbprint(leaf),
    thumbprintSha1: leaf.fingerprint.replace(/:/g, "").toUpperCase(),
    certificateChainPem: chain.map((certificate) => certificate.toString()).join(""),
    subject: certificateSubject(leaf),
    notAfter: new Date(leaf.validTo),
  };
}

/** Reads the file afresh each time: Kubernetes rotates a mounted Secret by swapping a symlink. */
export function readCredential(config: Pick<Config, "certificatePath" | "certificatePathSource" | "certificatePassword">): Credential {
  const pem = readCredentialFile(config.certificatePathSource, config.certificatePath);
  return parseCredential(pem, config.certificatePassword, `${config.certificatePathSource}=${config.certificatePath}`);
}

/** A credential file's text, or a CredentialError naming the variable, the file and why in words. */
export function readCredentialFile(variable: string, file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (error) {
    throw new CredentialError(`${variable}=${file} cannot be read (${unreadableReason(error)})`);
  }
}
