// The official openai SDK's realtime client (OpenAIRealtimeWS over the `ws`
// package), run under Node.js as an app would run it, against auth-proxy:
// node test/realtime-sdk.mjs http://127.0.0.1:PORT
// Prints one JSON line: the events it received, or the error.
import net from "node:net";
import { AzureOpenAI } from "openai";
import { OpenAIRealtimeWS } from "openai/realtime/ws";

const [proxyUrl] = process.argv.slice(2);
const client = new AzureOpenAI({ endpoint: proxyUrl, apiKey: "placeholder-key", apiVersion: "2025-04-01-preview", deployment: "gpt-4o-realtime" });
const realtime = await OpenAIRealtimeWS.azure(client, {
  // The SDK always builds a wss:// URL; the sidecar speaks plain HTTP on loopback.
  options: { createConnection: (options) => net.connect(options.port, options.host) },
});
const events = [];
const timer = setTimeout(() => finish({ error: "timed out" }), 10_000);
function finish(result) {
  clearTimeout(timer);
  process.stdout.write(JSON.stringify(result) + "\n");
  realtime.close({ code: 1000, reason: "done" });
  setTimeout(() => process.exit(0), 100);
}
realtime.on("error", (error) => finish({ error: error.message, events }));
realtime.on("session.created", (event) => {
  events.push(event.type);
  realtime.send({ type: "session.update", session: { instructions: "Answer briefly.", voice: "alloy" } });
});
realtime.on("session.updated", (event) => {
  events.push(event.type);
  finish({ events, session: event.session, url: realtime.url.toString() });
});
