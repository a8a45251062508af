/**
 * Opens `count` slow SSE streams at once over raw sockets (no client-side
 * connection cap) and waits until every one has ended.
 * Usage: bun bench/hold-streams.ts <port> <count>
 */
import net from "node:net";

const [port, count] = [Number(process.argv[2]), Number(process.argv[3])];
let complete = 0;
await Promise.all(
  Array.from({ length: count }, () => new Promise<void>((resolve) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write("GET /slow-sse HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"));
    let tail = "";
    socket.on("data", (chunk) => {
      tail = (tail + chunk.toString()).slice(-16);
    });
    socket.on("close", () => {
      if (tail.endsWith("0\r\n\r\n")) complete += 1;
      resolve();
    });
    socket.on("error", () => resolve());
  })),
);
console.log(JSON.stringify({ opened: count, complete }));
