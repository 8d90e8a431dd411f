// A delay proxy for the latency-bound benchmark (bench/latency.py). Each client connection gets one
// upstream connection of its own, kept as long as the client keeps its own (HTTP keep-alive passes
// through); every chunk from the client reaches upstream DELAY_MS later, answers come back at once.
// A request is one chunk, so each request gains DELAY_MS of round trip. Bytes pass unchanged (Host
// included), so SigV4 signatures made for the proxy's address verify upstream. No HTTP parsing: a
// few microseconds of CPU per request, where the tests' asyncio fault proxy would itself be the
// bottleneck at a few thousand requests/s (the bench measures this one's ceiling and prints it).
//
// usage: node delayproxy.js LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT DELAY_MS
"use strict";
const net = require("net");

const [listenPort, upstreamHost, upstreamPort, delayMs] = process.argv.slice(2);
const delay = Number(delayMs);

const server = net.createServer((client) => {
  const upstream = net.connect(Number(upstreamPort), upstreamHost);
  client.setNoDelay(true);
  upstream.setNoDelay(true);
  // Timers of one duration fire in the order they were set: chunks keep their order.
  client.on("data", (chunk) => setTimeout(() => upstream.destroyed || upstream.write(chunk), delay));
  client.on("end", () => setTimeout(() => upstream.end(), delay));
  upstream.on("data", (chunk) => client.destroyed || client.write(chunk));
  upstream.on("end", () => client.end());
  client.on("error", () => upstream.destroy());
  upstream.on("error", () => client.destroy());
  client.on("close", () => setTimeout(() => upstream.destroy(), delay));
  upstream.on("close", () => client.destroy());
});
server.listen(Number(listenPort), "127.0.0.1", () => process.stdout.write("ready\n"));
