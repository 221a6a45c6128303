// The plain call's headers, against a fake fetch (no gateway): call() asks for JSON, so a generator function is
// refused by the gateway before it runs (fetch's default Accept, */*, got the SSE stream, which r.json() cannot
// read: the error was a JSON parse error and a paid call's charge, sent in the stream's end event, was lost).
import assert from "node:assert/strict";
import { test } from "node:test";
import { Client } from "../src/client.js";

test("call() accepts only JSON; stream() only the event stream", async () => {
  const accepts: (string | null)[] = [];
  const fake = (async (_url: string, init?: RequestInit) => {
    accepts.push(new Headers(init?.headers).get("accept"));
    const sse = accepts.length > 1;
    return new Response(sse ? "event: end\ndata: {}\n\n" : '{"ok":true}',
      { status: 200, headers: { "content-type": sse ? "text/event-stream" : "application/json" } });
  }) as typeof fetch;
  const c = new Client({ url: "http://gateway.invalid", apiKey: "k", fetch: fake });
  assert.deepEqual(await c.call("f", {}), { ok: true });
  for await (const _ of c.stream("g", {})) assert.fail("no items");
  assert.deepEqual(accepts, ["application/json", "text/event-stream"]);
});
