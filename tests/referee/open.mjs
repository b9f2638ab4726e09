// The JOSE referee: an independent implementation (panva/jose) that must open what bridge/sealing.py seals.
//
// Reads {"jwe": <General JSON JWE>, "jwk": <private X25519 JWK>} on stdin, decrypts with jose's
// generalDecrypt, and writes the plaintext as base64 on stdout. Any failure exits non-zero with a short
// reason on stderr (never the key). Only the test suite runs this; the bridge never does.
import { generalDecrypt, importJWK } from "jose";

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  const { jwe, jwk } = JSON.parse(await readStdin());
  const key = await importJWK(jwk, "ECDH-ES+A256KW");
  const { plaintext } = await generalDecrypt(jwe, key, {
    keyManagementAlgorithms: ["ECDH-ES+A256KW"],
    contentEncryptionAlgorithms: ["A256GCM"],
  });
  process.stdout.write(Buffer.from(plaintext).toString("base64"));
}

main().catch((err) => {
  process.stderr.write(`referee: cannot open: ${err.code ?? err.name}: ${err.message}\n`);
  process.exitCode = 1;
});
