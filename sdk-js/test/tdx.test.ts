// TDX quotes verified here (WebCrypto ECDSA P-256, @peculiar/x509 to the pinned Intel root) agree with the Python
// verifier on every shared test quote: the same fields when valid, the same failed check when tampered or out of
// the chains' validity window.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { fromB64 } from "../src/bytes.js";
import { hex } from "../src/bytes.js";
import { CheckFailed } from "../src/errors.js";
import { checkTdxPolicy, verifyQuote } from "../src/tdx.js";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { existsSync } from "node:fs";
import { TESTDATA, closePy, py } from "./helpers.js";

after(closePy);

const QUOTES = ["dcapqvl_v4.bin", "trustee_v4.bin", "trustee_v5.bin", "gotdx_v5.bin", "gotdx_spr_v4_trailer.bin"];
const AT = "2026-06-01T00:00:00";

async function jsOutcome(raw: Uint8Array<ArrayBuffer>, at: string): Promise<Record<string, unknown>> {
  try {
    const v = await verifyQuote(raw, { at: new Date(at + "Z") });
    const r = v.quote.report;
    return { ok: true, mrtd: hex(r.mrTd), report_data: hex(r.reportData), debug: r.debug, rtmr0: hex(r.rtmr[0]),
      version: v.quote.version, root_sha256: v.rootSha256 };
  } catch (e) {
    if (!(e instanceof CheckFailed)) throw e;
    return { ok: false, check: e.check };
  }
}

function raw(name: string): Uint8Array<ArrayBuffer> {
  return new Uint8Array(readFileSync(resolve(TESTDATA, "tdx", name)));
}


const skip = existsSync(resolve(TESTDATA, "tdx")) ? false : `shared TDX test vectors not present at ${TESTDATA}`;

for (const name of QUOTES) {
  test(`quote ${name}: same outcome as Python (valid, tampered, expired)`, { skip }, async () => {
    const want = await py("quote", { path: name, at: AT });
    const { quote: _q, ...wantFields } = want;
    assert.deepEqual(await jsOutcome(raw(name), AT), wantFields);
    assert.equal(want.ok, true);
    for (const at of ["2050-01-01T00:00:00", "2020-01-01T00:00:00"]) {
      assert.deepEqual(await jsOutcome(raw(name), at), await py("quote", { path: name, at }));
    }
    for (const off of [100, 48 + 520, 700]) { // TD report, REPORTDATA, signature data
      const t = raw(name);
      t[off] ^= 1;
      const w = await py("quote", { path: name, at: AT, tamper: off });
      assert.equal(w.ok, false);
      assert.deepEqual(await jsOutcome(t, AT), w);
    }
  });
}

test("policy: REPORTDATA must equal the binding; debug TDs are refused", { skip }, async () => {
  const v = await verifyQuote(raw("trustee_v4.bin"), { at: new Date(AT + "Z") });
  assert.equal(v.quote.report.debug, true); // this test quote comes from a debug TD
  assert.throws(() => checkTdxPolicy(v, {}, v.quote.report.reportData), (e: unknown) => e instanceof CheckFailed && e.check === "debug");
  checkTdxPolicy(v, { allowDebug: true }, v.quote.report.reportData);
  assert.throws(() => checkTdxPolicy(v, { allowDebug: true }, new Uint8Array(64)), (e: unknown) => e instanceof CheckFailed && e.check === "report_data");
  assert.throws(() => checkTdxPolicy(v, { allowDebug: true, mrtd: ["00".repeat(48)] }), (e: unknown) => e instanceof CheckFailed && e.check === "mrtd");
  assert.ok(fromB64((await py("quote", { path: "trustee_v4.bin", at: AT })).quote).length > 1000);
});
