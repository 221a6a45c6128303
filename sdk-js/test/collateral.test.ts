// TDX collateral (CRLs, TCB info, QE identity, TCB status) checked here agrees with the Python verifier: the same
// TCB status and parts on the real dcap-qvl sample, the same failed check when the collateral is tampered, expired,
// for another FMSPC, or revokes the PCK leaf. Revocation and re-rated TCB need CRLs and TCB info signed by Intel, so
// those cases use py_tdx_kit.py: the real chain and collateral re-issued under a test root both sides are given.
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { resolve } from "node:path";
import { after, test } from "node:test";
import { type Bytes, fromB64, fromHex, hex } from "../src/bytes.js";
import { parseCollateral } from "../src/collateral.js";
import { verifyDocument } from "../src/document.js";
import { CheckFailed } from "../src/errors.js";
import { verifyQuote } from "../src/tdx.js";
import { TESTDATA, closePy, py } from "./helpers.js";

after(closePy);

const AT = "2025-06-20T00:00:00";
const skip = existsSync(resolve(TESTDATA, "tdx")) ? false : `shared TDX test vectors not present at ${TESTDATA}`;
const raw = (name: string): Bytes => new Uint8Array(readFileSync(resolve(TESTDATA, "tdx", name)));
const colJson = (): Record<string, string> => JSON.parse(readFileSync(resolve(TESTDATA, "tdx", "dcapqvl_v4_collateral.json"), "utf8"));

interface Case { quote: Bytes; collateral: Record<string, string>; at?: string; root?: string; acceptTcb?: string[] }

async function js(c: Case): Promise<Record<string, unknown>> {
  try {
    const v = await verifyQuote(c.quote, { at: new Date((c.at ?? AT) + "Z"), collateral: parseCollateral(c.collateral),
      root: c.root ? fromHex(c.root) : undefined, acceptTcb: c.acceptTcb });
    const t = v.tcb!;
    return { ok: true, mrtd: hex(v.quote.report.mrTd), tcb: { status: t.status, platform_status: t.platformStatus,
      module_status: t.moduleStatus, qe_status: t.qeStatus, advisory_ids: t.advisoryIds, fmspc: t.fmspc } };
  } catch (e) {
    if (!(e instanceof CheckFailed)) throw e;
    return { ok: false, check: e.check };
  }
}

/** Both verifiers on the same input; returns Python's outcome after checking JS gives the same. */
async function same(c: Case): Promise<Record<string, unknown>> {
  const want = await py("collateral", { quote: Buffer.from(c.quote).toString("base64"), collateral: c.collateral,
    at: c.at ?? AT, root: c.root, accept_tcb: c.acceptTcb });
  assert.deepEqual(await js(c), want);
  return want;
}

const flipHex = (h: string, i: number): string => h.slice(0, 2 * i) + (parseInt(h.slice(2 * i, 2 * i + 2), 16) ^ 1)
  .toString(16).padStart(2, "0") + h.slice(2 * i + 2);

test("real collateral: the same TCB status and parts as Python (UpToDate, FMSPC b0c06f000000)", { skip }, async () => {
  const want = await same({ quote: raw("dcapqvl_v4.bin"), collateral: colJson() });
  assert.equal(want.ok, true);
  assert.deepEqual(want.tcb, { status: "UpToDate", platform_status: "UpToDate", module_status: "UpToDate",
    qe_status: "UpToDate", advisory_ids: [], fmspc: "b0c06f000000" }); // specs/attestation.md's figures
});

test("tampered, expired, swapped and other-platform collateral: the same refusal as Python", { skip }, async () => {
  const q = raw("dcapqvl_v4.bin");
  const cases: [string, Case][] = [
    ["tcb_info", { quote: q, collateral: { ...colJson(), tcb_info_signature: flipHex(colJson().tcb_info_signature, 3) } }],
    ["qe_identity", { quote: q, collateral: { ...colJson(), qe_identity_signature: flipHex(colJson().qe_identity_signature, 40) } }],
    ["tcb_info", { quote: q, collateral: { ...colJson(), tcb_info: colJson().tcb_info.replace('"pcesvn":11', '"pcesvn":10') } }],
    ["crl", { quote: q, collateral: colJson(), at: "2025-08-01T00:00:00" }], // past every nextUpdate
    ["crl", { quote: q, collateral: { ...colJson(), pck_crl: colJson().root_ca_crl } }],
    ["crl", { quote: q, collateral: { ...colJson(), root_ca_crl: colJson().pck_crl } }],
    ["tcb_info", { quote: raw("trustee_v4.bin"), collateral: colJson() }], // FMSPC 50806f000000, not b0c06f
  ];
  for (const [check, c] of cases) {
    const want = await same(c);
    assert.deepEqual(want, { ok: false, check });
  }
  assert.throws(() => parseCollateral({ ...colJson(), tcb_info: undefined } as unknown as Record<string, string>),
    (e: unknown) => e instanceof CheckFailed && e.check === "collateral");
});

test("a revoked PCK leaf, an unknown FMSPC and an out-of-date platform (test root): refused as Python does", { skip }, async () => {
  const kit = async (d: Record<string, unknown>): Promise<Case> => {
    const k = await py("kit", d);
    return { quote: fromB64(k.quote), collateral: k.collateral, root: k.root };
  };
  const good = await kit({});
  const ok = await same(good);
  assert.equal(ok.ok, true); // the re-issued chain and collateral pass, so each refusal below is the change made
  assert.deepEqual(await same({ ...good, root: undefined }), { ok: false, check: "pck_chain" }); // not Intel's root
  assert.deepEqual(await same(await kit({ revoke: true })), { ok: false, check: "revoked" });
  const otherFmspc = await kit({ edits: { tcb_info: [['"fmspc":"B0C06F000000"', '"fmspc":"00906EA10000"']] } });
  assert.deepEqual(await same(otherFmspc), { ok: false, check: "tcb_info" });
  const outdated = await kit({ edits: { tcb_info: [['"pcesvn":11', '"pcesvn":99']] } });
  assert.deepEqual(await same(outdated), { ok: false, check: "tcb_status" });
  const accepted = await same({ ...outdated, acceptTcb: ["OutOfDate"] });
  assert.equal((accepted.tcb as Record<string, unknown>).status, "OutOfDate");
  const stale = await kit({ edits: { tcb_info: [['"nextUpdate":"2025-07-19T10:16:03Z"', '"nextUpdate":"2025-06-19T12:00:00Z"']] } });
  assert.deepEqual(await same(stale), { ok: false, check: "tcb_info" }); // expired TCB info, CRLs still current
  const early = await kit({ edits: { qe_identity: [['"issueDate":"2025-06-19T10:32:27Z"', '"issueDate":"2025-06-21T00:00:00Z"']] } });
  assert.deepEqual(await same(early), { ok: false, check: "qe_identity" }); // issued after the evaluation time
  const qeOld = await kit({ edits: { qe_identity: [['"isvprodid":2', '"isvprodid":3']] } });
  assert.deepEqual(await same(qeOld), { ok: false, check: "qe_identity" });
});

test("documents: collateral in the policy is checked, a revoked platform is refused, requireCollateral holds", { skip }, async () => {
  const M = "ab".repeat(32);
  const NOW = Date.parse(AT + "Z") / 1000;
  for (const revoke of [false, true]) {
    const d = await py("tdx_document", { seed: "col", function: "f", measurement: M, now: NOW, revoke });
    const want = await py("document_check", { document: d.document, measurement: M, now: NOW + 5,
      collateral: d.collateral, root: d.root });
    assert.deepEqual(want, revoke ? { ok: false, check: "revoked" } : { ok: true, key_id: d.document.key_id, tee: "tdx",
      tcb: want.tcb });
    const policy = { measurements: [M], collateral: parseCollateral(d.collateral), root: fromHex(d.root) };
    const got = await verifyDocument(d.document, policy, NOW + 5).then(
      (v) => ({ ok: true, key_id: v.keyId, tee: v.tee, tcb: v.quote!.tcb!.status }),
      (e) => ({ ok: false, check: (e as CheckFailed).check }));
    assert.deepEqual(got, want.ok ? { ...want, tcb: (want.tcb as Record<string, unknown>).status } : want);
    if (!revoke) {
      const bare = { measurements: [M], root: fromHex(d.root), tdx: { requireCollateral: true } };
      await assert.rejects(verifyDocument(d.document, bare, NOW + 5), (e: unknown) => e instanceof CheckFailed && e.check === "tcb_status");
      assert.deepEqual(await py("document_check", { document: d.document, measurement: M, now: NOW + 5, root: d.root,
        require_collateral: true }), { ok: false, check: "tcb_status" });
    }
  }
});
