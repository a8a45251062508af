/** The startup floor: a compiled Bun.serve answering /live and nothing else. */
Bun.serve({ hostname: "127.0.0.1", port: Number(process.env.PORT), fetch: () => new Response('{"status":"ok"}') });
