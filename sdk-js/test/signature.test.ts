// The argument check a sealing client runs before it seals (the gateway cannot read sealed arguments): the same
// refusals, worded the same, as the gateway's check of plain calls (cocoon_faas/signature.py).
import assert from "node:assert/strict";
import { test } from "node:test";
import { CocoonError } from "../src/errors.js";
import { checkArgs, parseSignature } from "../src/signature.js";

const sig = parseSignature({
  params: [
    { name: "name", type: "string", required: true, nullable: false },
    { name: "excited", type: "boolean", required: false, nullable: false },
    { name: "n", type: "integer", required: false, nullable: true },
  ],
  var_kwargs: false,
})!;

function refusal(args: Record<string, unknown>): string {
  try {
    checkArgs("greet", sig, args);
  } catch (e) {
    assert.ok(e instanceof CocoonError && e.status === 400 && e.type === "invalid_request");
    return e.message;
  }
  return "accepted";
}

test("honest arguments pass; null only where the parameter allows it", () => {
  assert.equal(refusal({ name: "Ada" }), "accepted");
  assert.equal(refusal({ name: "Ada", excited: true, n: null }), "accepted");
  assert.equal(refusal({ name: "Ada", n: 3 }), "accepted");
});

test("unknown, missing and mistyped arguments are named with the fix", () => {
  assert.equal(refusal({ nmae: "Ada" }), "function 'greet' takes no argument 'nmae'; did you mean 'name'?");
  assert.equal(refusal({ name: "Ada", zzzzzz: 1 }), "function 'greet' takes no argument 'zzzzzz'; it takes ['excited', 'n', 'name']");
  assert.equal(refusal({}), "function 'greet' is missing required argument 'name' (string)");
  assert.equal(refusal({ name: 5 }), "argument 'name' of 'greet' must be a string, got integer");
  assert.equal(refusal({ name: "Ada", n: 1.5 }), "argument 'n' of 'greet' must be an integer or null, got number");
  assert.equal(refusal({ name: "Ada", excited: null }), "argument 'excited' of 'greet' must be a boolean, got null");
});

test("**kwargs accepts any name; a missing or malformed listing checks nothing", () => {
  const open = parseSignature({ params: [], var_kwargs: true })!;
  checkArgs("f", open, { anything: [1, 2] });
  assert.equal(parseSignature(undefined), null);
  assert.equal(parseSignature({ params: "nope" }), null);
  assert.equal(parseSignature({ params: [{ name: 1, type: "string" }] }), null);
});
