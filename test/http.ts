/**
 * Raw HTTP/1.1 over a TCP socket: for request targets and headers that
 * fetch would normalise away, and for many concurrent requests without a
 * client-side connection cap.
 */
import net from "node:net";
import { memoryKiB } from "./harness.ts";

export interface RawResponse {
  status: number;
  headers: string[];
  body: string;
}

/** Sends `request` as is and reads until the server closes the connection. */
export function rawRequest(port: number, request: string | Buffer): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1");
    const chunks: Buffer[] = [];
    socket.on("connect", () => socket.write(request));
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", reject);
    socket.on("close", () => resolve(parseResponse(Buffer.concat(chunks).toString("latin1"))));
    socket.setTimeout(30_000, () => socket.destroy(new Error("raw request timed out")));
  });
}

export function parseResponse(text: string): RawResponse {
  const headerEnd = text.indexOf("\r\n\r\n");
  const [statusLine = "", ...headers] = text.slice(0, headerEnd === -1 ? undefined : headerEnd).split("\r\n");
  return { status: Number(statusLine.split(" ")[1]), headers, body: headerEnd === -1 ? "" : text.slice(headerEnd + 4) };
}

/** Opens a connection, sends `request`, and resolves once the first bytes of the response arrive. */
export function openStream(port: number, request: string): Promise<{ socket: net.Socket }> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write(request));
    socket.once("data", () => resolve({ socket }));
    socket.on("error", reject);
  });
}

/** A minimal HTTP CONNECT proxy, as corporate networks run: records each tunnel's target. */
export function startConnectProxy(): Promise<{ port: number; tunnels: string[]; close(): void }> {
  const tunnels: string[] = [];
  const server = net.createServer((client) => {
    client.once("data", (head: Buffer) => {
      const [method, target] = head.toString("latin1").split(" ");
      if (method !== "CONNECT" || !target) return void client.end("HTTP/1.1 405 Method Not Allowed\r\n\r\n");
      tunnels.push(target);
      const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
      const remote = net.connect(port, host, () => {
        client.write("HTTP/1.1 200 Connection Established\r\n\r\n");
        client.pipe(remote).pipe(client);
      });
      remote.on("error", () => client.destroy());
      client.on("error", () => remote.destroy());
    });
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ port: (server.address() as net.AddressInfo).port, tunnels, close: () => server.close() })),
  );
}

/**
 * Sends one request on a fresh keep-alive connection, reads the response,
 * then stays idle: resolves with how long after the last byte the server
 * closed the connection (or `undefined` if it was still open at `waitMs`).
 */
export function idleCloseAfterResponse(port: number, request: string, waitMs: number): Promise<{ closedAfterMs: number | undefined; response: string }> {
  return new Promise((resolve, reject) => {
    let response = "";
    let lastByteAt = 0;
    const socket = net.connect(port, "127.0.0.1", () => socket.write(request));
    socket.on("data", (chunk: Buffer) => {
      response += chunk.toString("latin1");
      lastByteAt = Date.now();
    });
    socket.on("error", reject);
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ closedAfterMs: undefined, response });
    }, waitMs);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ closedAfterMs: Date.now() - lastByteAt, response });
    });
  });
}

/**
 * Takes a raw HTTP/1.1 response as it arrives off a socket (`push` each
 * piece) and hands on its body with the head and, for a chunked body, the
 * chunk framing removed; `ended` once the final zero-length chunk is in.
 */
export function chunkedBodyReader(onBody: (bytes: Buffer) => void): { push(data: Buffer): void; readonly head: string; readonly ended: boolean } {
  let state: "head" | "size" | "data" | "crlf" | "end" | "whole" = "head";
  let head = "";
  let pending: Buffer = Buffer.alloc(0);
  let left = 0;
  const push = (data: Buffer) => {
    pending = pending.length === 0 ? data : Buffer.concat([pending, data]);
    while (pending.length > 0 && state !== "end") {
      if (state === "whole" || state === "data") {
        const take = state === "whole" ? pending.length : Math.min(left, pending.length);
        onBody(pending.subarray(0, take));
        pending = pending.subarray(take);
        if (state === "data" && (left -= take) === 0) state = "crlf";
        continue;
      }
      const lineEnd = pending.indexOf(state === "head" ? "\r\n\r\n" : "\r\n");
      if (lineEnd === -1) return;
      const line = pending.subarray(0, lineEnd).toString("latin1");
      pending = pending.subarray(lineEnd + (state === "head" ? 4 : 2));
      if (state === "head") {
        head = line;
        state = /^transfer-encoding:\s*chunked/im.test(line) ? "size" : "whole";
      } else if (state === "crlf") state = "size";
      else {
        left = parseInt(line, 16);
        state = left === 0 ? "end" : "data";
      }
    }
  };
  return {
    push,
    get head() {
      return head;
    },
    get ended() {
      return state === "end";
    },
  };
}

/** What readSlowly saw: the RSS before, and its rise over that at every MiB read. */
export interface SlowRead {
  bytes: number;
  beforeKiB: number;
  peakKiB: number;
  firstQuarterPeakKiB: number;
  secondHalfPeakKiB: number;
}

/**
 * Sends `request` on a fresh connection and reads the answer at about
 * 40 MB/s (1 MiB, then a 25 ms pause), far slower than an upstream on
 * loopback sends it, sampling process `pid`'s RSS at every MiB: flat means
 * the second half of the transfer holds no more than the first quarter.
 */
export function readSlowly(port: number, request: string, pid: number, onData: (data: Buffer) => void = () => {}): Promise<SlowRead> {
  const beforeKiB = memoryKiB(pid, "VmRSS");
  const rises: number[] = [];
  return new Promise((resolve, reject) => {
    let bytes = 0;
    let sinceLastPause = 0;
    const socket = net.connect(port, "127.0.0.1", () => socket.write(request));
    socket.on("data", (data: Buffer) => {
      onData(data);
      bytes += data.length;
      sinceLastPause += data.length;
      if (sinceLastPause >= 1024 * 1024) {
        sinceLastPause = 0;
        socket.pause();
        rises.push(memoryKiB(pid, "VmRSS") - beforeKiB);
        setTimeout(() => socket.resume(), 25);
      }
    });
    socket.on("error", reject);
    socket.on("close", () => {
      const quarter = Math.floor(rises.length / 4);
      resolve({
        bytes,
        beforeKiB,
        peakKiB: Math.max(...rises),
        firstQuarterPeakKiB: Math.max(...rises.slice(0, quarter)),
        secondHalfPeakKiB: Math.max(...rises.slice(2 * quarter)),
      });
    });
  });
}

/**
 * An address that drops SYNs, as a black-holed private endpoint or a dead
 * node does, staying on 127.0.0.1: a listener whose accept queue (backlog 0)
 * is full and never drained. Node and Bun accept every connection on their
 * own, so it is Python's socket module, which lets one listen and not accept.
 */
export async function startBlackHole(): Promise<{ port: number; close(): void }> {
  const script = [
    "import socket, sys",
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(0)",
    "fill = []",
    "for _ in range(4):",
    "    c = socket.socket(); c.setblocking(False)",
    "    try: c.connect(s.getsockname())",
    "    except BlockingIOError: pass",
    "    fill.append(c)",
    "print(s.getsockname()[1], flush=True)",
    "sys.stdin.read()",
  ].join("\n");
  const proc = Bun.spawn(["python3", "-c", script], { stdin: "pipe", stdout: "pipe", stderr: "inherit" });
  const { value } = await proc.stdout.getReader().read();
  const port = Number(new TextDecoder().decode(value).trim());
  if (!(port > 0)) throw new Error("the black hole did not start (python3 is needed)");
  // Let the filler connections settle into the queue before anyone counts on it being full.
  await Bun.sleep(200);
  return { port, close: () => proc.kill() };
}

/** A listener that accepts connections and never says anything: a TLS handshake to it never completes. */
export function startSilentListener(): Promise<{ port: number; close(): void }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () =>
      resolve({
        port: (server.address() as net.AddressInfo).port,
        close: () => {
          for (const socket of sockets) socket.destroy();
          server.close();
        },
      }),
    ),
  );
}

/** An upload that announces `announced` bytes, sends `sent` of them, then nothing: resolves with what came back once the server closes, or at `waitMs`. */
export function stalledUpload(port: number, path: string, announced: number, sent: number, waitMs: number): { written: Promise<void>; done: Promise<{ response: string; closedAfterMs: number | undefined }>; socket: net.Socket } {
  const socket = net.connect(port, "127.0.0.1");
  const startedAt = Date.now();
  let response = "";
  const written = new Promise<void>((resolve, reject) => {
    socket.on("connect", () => {
      socket.write(`POST ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: ${announced}\r\n\r\n`);
      socket.write(Buffer.alloc(sent, "x"), () => resolve());
    });
    socket.on("error", reject);
  });
  const done = new Promise<{ response: string; closedAfterMs: number | undefined }>((resolve) => {
    socket.on("data", (chunk: Buffer) => (response += chunk.toString("latin1")));
    const timer = setTimeout(() => {
      socket.destroy();
      resolve({ response, closedAfterMs: undefined });
    }, waitMs);
    socket.on("close", () => {
      clearTimeout(timer);
      resolve({ response, closedAfterMs: Date.now() - startedAt });
    });
  });
  socket.on("error", () => {});
  return { written, done, socket };
}
