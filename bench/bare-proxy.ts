/**
 * The Bun floor: the least a Bun.serve + fetch passthrough can do (a static
 * token, no header hygiene, no logging). Usage: bun bench/bare-proxy.ts <port> <upstream>
 */
const port = Number(process.argv[2]);
const upstream = process.argv[3]!;
Bun.serve({
  hostname: "127.0.0.1",
  port,
  idleTimeout: 0,
  fetch(req, server) {
    server.timeout(req, 0);
    const url = req.url;
    req.headers.set("authorization", "Bearer static-token");
    return fetch(upstream + url.slice(url.indexOf("/", 8)), {
      method: req.method,
      headers: req.headers,
      body: req.body,
      decompress: false,
      redirect: "manual",
    });
  },
});
