/**
 * Reads an `mb` MiB body at about 40 MB/s (1 MiB, then a 25 ms pause),
 * far slower than the upstream sends it, and samples the proxy's RSS at
 * every MiB. Prints the RSS before, the peak over it, the peaks of the
 * first quarter and of the second half of the transfer, and the bytes.
 * Usage: bun bench/slow-reader.ts <port> <proxy pid> <mb>
 */
import net from "node:net";
import { memoryKiB } from "../test/harness.ts";

const [port, pid, mb] = process.argv.slice(2).map(Number) as [number, number, number];
const before = memoryKiB(pid, "VmRSS");
const samples: number[] = [];
const bytes = await new Promise<number>((resolve) => {
  let received = 0;
  let sinceLastPause = 0;
  const socket = net.connect(port, "127.0.0.1", () => socket.write(`GET /big?mb=${mb} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n`));
  socket.on("data", (chunk: Buffer) => {
    received += chunk.length;
    sinceLastPause += chunk.length;
    if (sinceLastPause >= 1 << 20) {
      sinceLastPause = 0;
      socket.pause();
      samples.push(memoryKiB(pid, "VmRSS") - before);
      setTimeout(() => socket.resume(), 25);
    }
  });
  socket.on("close", () => resolve(received));
  socket.on("error", () => resolve(received));
});
const quarter = Math.floor(samples.length / 4);
console.log(JSON.stringify({
  beforeKiB: before,
  peakKiB: Math.max(...samples),
  firstQuarterPeakKiB: Math.max(...samples.slice(0, quarter)),
  secondHalfPeakKiB: Math.max(...samples.slice(2 * quarter)),
  bytes,
}));
