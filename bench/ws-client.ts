/**
 * WebSocket load: `sessions` sessions at once, each sending a small text
 * frame (a realtime event's size) and waiting for its echo, for `seconds`.
 * Prints the median round trip (ms) and the frames relayed per second
 * (both directions) as JSON.
 * Usage: bun bench/ws-client.ts <ws-url> <sessions> <seconds>
 */
const [url, sessions, seconds] = [process.argv[2]!, Number(process.argv[3]), Number(process.argv[4])];
const frame = JSON.stringify({ type: "input_audio_buffer.append", audio: "A".repeat(96) });
const roundTrips: number[] = [];

async function session(until: number): Promise<void> {
  const socket = new WebSocket(url, { perMessageDeflate: false });
  let resolveEcho: () => void = () => {};
  socket.onmessage = () => resolveEcho();
  await new Promise<void>((resolve, reject) => {
    socket.onopen = () => resolve();
    socket.onerror = (event) => reject(new Error((event as ErrorEvent).message));
  });
  while (performance.now() < until) {
    const sentAt = performance.now();
    const echoed = new Promise<void>((resolve) => (resolveEcho = resolve));
    socket.send(frame);
    await echoed;
    roundTrips.push(performance.now() - sentAt);
  }
  socket.close(1000);
}

const until = performance.now() + seconds * 1000;
await Promise.all(Array.from({ length: sessions }, () => session(until)));
const sorted = roundTrips.sort((a, b) => a - b);
console.log(JSON.stringify({ p50: sorted[Math.floor(sorted.length / 2)], framesPerSecond: (roundTrips.length * 2) / seconds }));
process.exit(0);
