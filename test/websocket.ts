/**
 * A WebSocket test client over Bun's own client: every frame it receives,
 * in order, with awaitable arrivals and close.
 */
import net from "node:net";
import { parseResponse, type RawResponse } from "./http.ts";

export class TestSocket {
  readonly frames: (string | Buffer)[] = [];
  readonly opened: Promise<void>;
  readonly closed: Promise<{ code: number; reason: string; atMs: number }>;
  failure: string | undefined;
  private readonly waiters: (() => void)[] = [];

  constructor(
    url: string,
    options: { headers?: Record<string, string>; protocols?: string[] } = {},
    readonly socket = new WebSocket(url, { headers: options.headers, protocols: options.protocols, perMessageDeflate: false }),
  ) {
    socket.binaryType = "nodebuffer";
    this.opened = new Promise((resolve, reject) => {
      socket.onopen = () => resolve();
      socket.onerror = (event) => {
        this.failure = (event as ErrorEvent).message;
        reject(new Error(this.failure));
      };
    });
    this.opened.catch(() => {});
    this.closed = new Promise((resolve) => {
      socket.onclose = (event) => {
        resolve({ code: event.code, reason: event.reason, atMs: Date.now() });
        this.wake();
      };
    });
    socket.onmessage = (event) => {
      this.frames.push(event.data as string | Buffer);
      this.wake();
    };
  }

  private wake(): void {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  /** Resolves once `count` frames have arrived in all. */
  async waitForFrames(count: number, timeoutMs = 10_000): Promise<(string | Buffer)[]> {
    const deadline = Date.now() + timeoutMs;
    while (this.frames.length < count) {
      if (Date.now() > deadline || this.socket.readyState === WebSocket.CLOSED) {
        throw new Error(`${this.frames.length} of ${count} frames arrived`);
      }
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
    return this.frames;
  }

  send(frame: string | Buffer): void {
    this.socket.send(frame);
  }

  command(command: object): void {
    this.socket.send(`cmd:${JSON.stringify(command)}`);
  }
}

/** A raw upgrade request, for the status and body of a refused handshake. */
export function rawUpgrade(port: number, target: string, headers: Record<string, string> = {}): Promise<RawResponse> {
  // `headers` adds to these or replaces them (by name, whatever its case).
  const handshake: Record<string, string> = {
    Host: `127.0.0.1:${port}`,
    Connection: "Upgrade",
    Upgrade: "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
  };
  for (const [name, value] of Object.entries(headers)) {
    for (const known of Object.keys(handshake)) if (known.toLowerCase() === name.toLowerCase()) delete handshake[known];
    handshake[name] = value;
  }
  const lines = [`GET ${target} HTTP/1.1`, ...Object.entries(handshake).map(([name, value]) => `${name}: ${value}`)];
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write(`${lines.join("\r\n")}\r\n\r\n`));
    let text = "";
    socket.on("data", (chunk: Buffer) => {
      text += chunk.toString("latin1");
      const response = parseResponse(text);
      const length = Number(/^content-length:\s*(\d+)/im.exec(text)?.[1] ?? -1);
      if (text.includes("\r\n\r\n") && (response.status === 101 || Buffer.byteLength(response.body, "latin1") >= length)) {
        socket.destroy();
        resolve(response);
      }
    });
    socket.on("error", reject);
    socket.on("close", () => resolve(parseResponse(text)));
    socket.setTimeout(15_000, () => socket.destroy(new Error("raw upgrade timed out")));
  });
}
