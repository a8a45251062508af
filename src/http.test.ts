/**
 * What forwarding and the relay share: the pure pieces of src/http.ts,
 * called directly (forwarding itself is tested through real sockets in
 * proxy.test.ts).
 */
import { describe, expect, test } from "bun:test";
import { removeHopByHopHeaders, requestTarget } from "../src/http.ts";


describe("Pure pieces", () => {
  test("requestTarget keeps the raw path and query of absolute and relative request URLs", () => {
    expect(requestTarget("http://localhost:8080/a%2Fb?x=1&x=2")).toBe("/a%2Fb?x=1&x=2");
    expect(requestTarget("http://[::1]:8080//other/x")).toBe("//other/x");
    expect(requestTarget("/relative?q")).toBe("/relative?q");
    expect(requestTarget("http://localhost")).toBe("/");
  });

  test("removeHopByHopHeaders removes the RFC 9110 set and what Connection names", () => {
    const headers = new Headers({ connection: "close, X-A", "x-a": "1", "x-b": "2", te: "trailers", "transfer-encoding": "chunked", upgrade: "websocket" });
    removeHopByHopHeaders(headers);
    expect([...headers.keys()]).toEqual(["x-b"]);
  });
});
