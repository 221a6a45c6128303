// A deployed function's signature as the gateway lists it beside the attestation documents, and the same
// argument check the gateway runs on plain calls (cocoon_faas/signature.py), run here for sealed calls: the
// gateway cannot read sealed arguments, so a typo is caught on this device, before anything is sealed or paid.
import { CocoonError } from "./errors.js";

export interface SignatureParam {
  name: string;
  type: string; // string | integer | number | boolean | array | object | any
  required: boolean;
  nullable?: boolean;
}

export interface FunctionSignature {
  params: SignatureParam[];
  var_kwargs?: boolean;
}

/** The listing's signature, or null when it has none or a malformed one (the replica's own check stands). */
export function parseSignature(raw: unknown): FunctionSignature | null {
  const s = raw as FunctionSignature | null;
  if (!s || !Array.isArray(s.params)) return null;
  const ok = s.params.every((p) => p && typeof p.name === "string" && typeof p.type === "string" && p.type.length > 0);
  return ok ? { params: s.params, var_kwargs: Boolean(s.var_kwargs) } : null;
}

function jsonName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  if (typeof v === "number") return Number.isInteger(v) ? "integer" : "number";
  return typeof v === "object" ? "object" : typeof v;
}

function typeOk(p: SignatureParam, v: unknown): boolean {
  if (v === null || v === undefined) return Boolean(p.nullable) || p.type === "any" || p.type === "null";
  switch (p.type) {
    case "any": return true;
    case "integer": return typeof v === "number" && Number.isInteger(v);
    case "number": return typeof v === "number";
    case "string": return typeof v === "string";
    case "boolean": return typeof v === "boolean";
    case "array": return Array.isArray(v);
    case "object": return typeof v === "object" && !Array.isArray(v);
    default: return true;
  }
}

/** Edit distance counting a swap of two neighbours as one edit (optimal string alignment). */
function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.length][b.length];
}

/** 1 for equal names, 0 for nothing in common: a suggestion needs 0.6, as Python's difflib asks by default. */
function similarity(a: string, b: string): number {
  return 1 - distance(a, b) / Math.max(a.length, b.length, 1);
}

function invalid(message: string, argument: string): CocoonError {
  return new CocoonError(message, 400, "invalid_request", { error: { type: "invalid_request", message, argument } });
}

/** Throw a 400 `invalid_request` naming the first unknown, missing or mistyped argument (as the gateway words it). */
export function checkArgs(fn: string, sig: FunctionSignature, args: Record<string, unknown>): void {
  const names = sig.params.map((p) => p.name);
  if (!sig.var_kwargs) {
    for (const key of Object.keys(args)) {
      if (names.includes(key)) continue;
      const close = names.filter((n) => similarity(n, key) >= 0.6)
        .sort((x, y) => similarity(y, key) - similarity(x, key))[0];
      const hint = close ? `; did you mean '${close}'?` : `; it takes [${names.map((n) => `'${n}'`).sort().join(", ") || "no arguments"}]`;
      throw invalid(`function '${fn}' takes no argument '${key}'${hint}`, key);
    }
  }
  for (const p of sig.params) {
    if (!(p.name in args)) {
      if (p.required) throw invalid(`function '${fn}' is missing required argument '${p.name}' (${p.type})`, p.name);
      continue;
    }
    if (!typeOk(p, args[p.name])) {
      const article = "aeiou".includes(p.type[0]) ? "an" : "a";
      throw invalid(`argument '${p.name}' of '${fn}' must be ${article} ${p.type}${p.nullable ? " or null" : ""}, `
        + `got ${jsonName(args[p.name])}`, p.name);
    }
  }
}
