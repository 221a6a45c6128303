// Bundle the SDK for browsers (one ES module, no CDN): dist/cocoon-sdk.js. @ton/core expects Node's Buffer, which
// the `buffer` package provides here.
import { build } from "esbuild";

await build({
  entryPoints: ["src/index.ts"],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  outfile: "dist/cocoon-sdk.js",
  inject: ["buffer-shim.mjs"],
  legalComments: "eof",
  logLevel: "warning",
});
