// NVIDIA GPU evidence checked here agrees with the Python verifier on the shared Hopper report: the same parsed
// measurements and config (and NVIDIA's published claims), the same failed check for a wrong nonce, a broken or
// foreign chain, an out-of-validity time and flipped bytes; documents carrying GPU evidence verify as in Python.
import assert from "node:assert/strict";
import { readFileSync, existsSync } from "node:fs";
import { resolve } from "node:path";
import { after, test } from "node:test";
import { type Bytes, fromHex, hex } from "../src/bytes.js";
import { verifyDocument } from "../src/document.js";
import { CheckFailed } from "../src/errors.js";
import { gpuConfig, verifyGpuReport } from "../src/nvidia.js";
import { intelRootDer } from "../src/roots.js";
import { TESTDATA, closePy, py } from "./helpers.js";

after(closePy);

const AT = "2026-06-01T00:00:00";
const NV = resolve(TESTDATA, "nvidia");
const skip = existsSync(NV) ? false : `shared NVIDIA test vectors not present at ${NV}`;
const report = (): Bytes => fromHex(readFileSync(resolve(NV, "hopperAttestationReport.txt"), "utf8").trim());
const chain = (): string => readFileSync(resolve(NV, "hopper_cert_chain_case1.txt"), "utf8");

interface Case { report: Bytes; chain: string; at?: string; nonce?: Bytes; root?: Bytes }

async function js(c: Case): Promise<Record<string, unknown>> {
  try {
    const v = await verifyGpuReport(c.report, c.chain, { at: new Date((c.at ?? AT) + "Z"), expectedNonce: c.nonce, root: c.root });
    const r = v.report;
    return { ok: true, request_nonce: hex(r.requestNonce), config: gpuConfig(r),
      measurements: Object.fromEntries([...r.measurements].map(([k, m]) => [String(k), hex(m)])) };
  } catch (e) {
    if (!(e instanceof CheckFailed)) throw e;
    return { ok: false, check: e.check };
  }
}

async function same(c: Case): Promise<Record<string, unknown>> {
  const want = await py("gpu", { report: hex(c.report), chain: c.chain, at: c.at ?? AT,
    expected_nonce: c.nonce ? hex(c.nonce) : undefined });
  const { leaf_subject: _s, ...fields } = want;
  assert.deepEqual(await js(c), fields);
  return want;
}

test("the Hopper report verifies to the pinned NVIDIA root, parsed as Python and NVIDIA's claims have it", { skip }, async () => {
  const want = await same({ report: report(), chain: chain() });
  assert.equal(want.ok, true);
  const claims = JSON.parse(readFileSync(resolve(NV, "hopperAttestationReport-claims.txt"), "utf8"));
  assert.deepEqual(want.measurements, claims.measurements);
  const cfg = want.config as Record<string, string>;
  assert.ok(Object.keys(cfg).length >= 10);
  for (const [k, v] of Object.entries(cfg)) assert.equal(claims.config[k], v, k);
  const v = await verifyGpuReport(report(), chain(), { at: new Date(AT + "Z"), expectedNonce: report().slice(4, 36) });
  assert.match(v.leafSubject, /GH100/);
});

test("wrong nonce, broken or foreign chain, wrong time, flipped bytes: the same refusal as Python", { skip }, async () => {
  const pems = chain().match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----\n?/g)!;
  assert.ok(pems.length >= 4);
  const flip = (off: number): Bytes => {
    const r = report();
    r[off < 0 ? r.length + off : off] ^= 0x40;
    return r;
  };
  const cases: [string | string[], Case][] = [
    ["gpu_nonce", { report: report(), chain: chain(), nonce: new Uint8Array(32) }],
    ["gpu_chain", { report: report(), chain: pems[0] }], // the leaf alone: no path to the root
    ["gpu_chain", { report: report(), chain: [pems[0], ...pems.slice(2)].join("") }], // a middle certificate gone
    ["gpu_chain", { report: report(), chain: "not a certificate" }],
    ["gpu_chain", { report: report(), chain: chain(), at: "2019-01-01T00:00:00" }],
    ["gpu_signature", { report: flip(-5), chain: chain() }], // the signature itself
    ["gpu_signature", { report: flip(10), chain: chain() }], // the request nonce
    ["gpu_signature", { report: flip(37 + 8 + 100), chain: chain() }], // a measurement
    [["gpu_signature", "gpu_structure"], { report: flip(-200), chain: chain() }], // opaque data
    ["gpu_structure", { report: report().slice(0, 100), chain: chain() }],
  ];
  for (const [check, c] of cases) {
    const want = await same(c);
    assert.equal(want.ok, false);
    assert.ok([check].flat().includes(want.check as string), `${want.check} for ${check}`);
  }
  await assert.rejects(verifyGpuReport(report(), chain(), { at: new Date(AT + "Z"), root: intelRootDer() }),
    (e: unknown) => e instanceof CheckFailed && e.check === "gpu_chain");
});

test("documents with GPU evidence verify (no longer refused); altered or missing evidence is refused as in Python", { skip }, async () => {
  const M = "cd".repeat(32);
  const NOW = Date.parse(AT + "Z") / 1000;
  const check = async (doc: unknown, requireGpu: boolean, devKey: string): Promise<void> => {
    const want = await py("document_check", { document: doc, measurement: M, now: NOW + 1, dev_keys: [devKey],
      require_gpu: requireGpu });
    const got = await verifyDocument(doc, { measurements: [M], trustedDevKeys: [devKey], requireGpu }, NOW + 1).then(
      (v) => ({ ok: true, key_id: v.keyId, tee: v.tee, tcb: null }), (e) => ({ ok: false, check: (e as CheckFailed).check }));
    assert.deepEqual(got, want);
  };
  const withGpu = await py("replica", { seed: "gpu", function: "f", measurement: M, now: NOW, gpu: true });
  const plain = await py("replica", { seed: "plain", function: "f", measurement: M, now: NOW });
  await check(withGpu.document, true, withGpu.dev_public_key);
  await check(withGpu.document, false, withGpu.dev_public_key);
  const ok = await verifyDocument(withGpu.document, { measurements: [M], trustedDevKeys: [withGpu.dev_public_key] }, NOW + 1);
  assert.equal(ok.keyId, withGpu.document.key_id);
  const bad = structuredClone(withGpu.document);
  bad.evidence.nvidia.report = bad.evidence.nvidia.report.slice(0, -2) + "00";
  await check(bad, true, withGpu.dev_public_key);
  await assert.rejects(verifyDocument(bad, { measurements: [M], trustedDevKeys: [withGpu.dev_public_key] }, NOW + 1),
    (e: unknown) => e instanceof CheckFailed && e.check === "gpu_evidence");
  // a tampered report that the document does commit to: caught by the report's own signature
  const flipped = await py("replica", { seed: "gpu", function: "f", measurement: M, now: NOW, gpu: true, gpu_flip: -5 });
  await check(flipped.document, false, flipped.dev_public_key);
  await assert.rejects(verifyDocument(flipped.document, { measurements: [M], trustedDevKeys: [flipped.dev_public_key] }, NOW + 1),
    (e: unknown) => e instanceof CheckFailed && e.check === "gpu_signature");
  await check(plain.document, true, plain.dev_public_key);
  await assert.rejects(verifyDocument(plain.document, { measurements: [M], trustedDevKeys: [plain.dev_public_key], requireGpu: true }, NOW + 1),
    (e: unknown) => e instanceof CheckFailed && e.check === "gpu_evidence");
});
