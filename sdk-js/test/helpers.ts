// Test helpers: run the Python side (test/py_vectors.py) and the shared deterministic rng.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { sha256 } from "@noble/hashes/sha2.js";
import { type Bytes, concat, u32, utf8 } from "../src/bytes.js";

export const SDK_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO_ROOT = resolve(SDK_ROOT, "..");
/** The shared test vectors (../shared/testdata beside the repository, as tests/conftest.py has it). */
export const TESTDATA = process.env.COCOON_TESTDATA ?? resolve(REPO_ROOT, "..", "shared", "testdata");

let child: ChildProcessWithoutNullStreams | null = null;
let lines: AsyncIterator<string> | null = null;
let queue: Promise<unknown> = Promise.resolve();

/** Run one py_vectors.py command in a Python process kept for the test file (PYTHON, else `python` on PATH);
 *  call `closePy` when the file is done (`after(closePy)`). */
export function py(cmd: string, data: Record<string, unknown>): Promise<any> {
  if (!child) {
    child = spawn(process.env.PYTHON ?? "python", [resolve(SDK_ROOT, "test", "py_vectors.py")], {
      cwd: REPO_ROOT, env: { ...process.env, PYTHONPATH: REPO_ROOT }, stdio: ["pipe", "pipe", "pipe"],
    });
    child.stderr.on("data", (d) => process.stderr.write(d));
    lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }
  const p = queue.then(async () => {
    child!.stdin.write(JSON.stringify({ cmd, ...data }) + "\n");
    const { value, done } = await lines!.next();
    if (done) throw new Error(`py_vectors.py exited during '${cmd}' (see its stderr above)`);
    return JSON.parse(value);
  });
  queue = p.catch(() => undefined);
  return p;
}

export function closePy(): void {
  child?.stdin.end();
  child = null;
}

/** rand(n): successive bytes of SHA-256(seed/label ‖ u32 counter) blocks (py_vectors.stream_rng). */
export function streamRng(seed: string, label: string): (n: number) => Bytes {
  let buf: Uint8Array = new Uint8Array(0);
  let counter = 0;
  return (n: number) => {
    while (buf.length < n) {
      buf = concat(buf as Bytes, sha256(concat(utf8(`${seed}/${label}`), u32(counter))) as Bytes);
      counter += 1;
    }
    const out = buf.slice(0, n);
    buf = buf.slice(n);
    return out as Bytes;
  };
}
