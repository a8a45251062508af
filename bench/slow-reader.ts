/**
 * Reads an `mb` MiB body at about 40 MB/s, far slower than the upstream
 * sends it, sampling the proxy's RSS at every MiB (test/http.ts readSlowly);
 * prints what it saw as JSON.
 * Usage: bun bench/slow-reader.ts <port> <proxy pid> <mb>
 */
import { readSlowly } from "../test/http.ts";

const [port, pid, mb] = process.argv.slice(2).map(Number) as [number, number, number];
console.log(JSON.stringify(await readSlowly(port, `GET /big?mb=${mb} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n`, pid)));
