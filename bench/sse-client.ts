/**
 * SSE load: `concurrency` streams at once, `rounds` times; prints the
 * time to first byte and total time of every stream, in ms, as JSON.
 * Usage: bun bench/sse-client.ts <url> <concurrency> <rounds>
 */
const [url, concurrency, rounds] = [process.argv[2]!, Number(process.argv[3]), Number(process.argv[4])];
const ttfb: number[] = [];
const total: number[] = [];

async function stream(): Promise<void> {
  const startedAt = performance.now();
  const response = await fetch(url);
  const reader = response.body!.getReader();
  let first = true;
  for (;;) {
    const { done } = await reader.read();
    if (first) {
      ttfb.push(performance.now() - startedAt);
      first = false;
    }
    if (done) break;
  }
  total.push(performance.now() - startedAt);
}

for (let round = 0; round < rounds; round++) {
  await Promise.all(Array.from({ length: concurrency }, stream));
}
console.log(JSON.stringify({ ttfb, total }));
