// Build the demo page into web/: app.js (esbuild bundle of demo/app.ts + the runtime), index.html, and
// onnxruntime-web's WASM build under web/ort/ (loaded at run time, not bundled).
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const out = path.join(root, "web");
mkdirSync(path.join(out, "ort"), { recursive: true });
await build({
  entryPoints: [path.join(root, "demo", "app.ts")], bundle: true, format: "esm", platform: "browser", target: "es2022",
  outfile: path.join(out, "app.js"), external: ["onnxruntime-web/wasm"], sourcemap: true, logLevel: "warning",
});
copyFileSync(path.join(root, "demo", "index.html"), path.join(out, "index.html"));
const dist = path.join(root, "node_modules", "onnxruntime-web", "dist");
for (const f of ["ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]) copyFileSync(path.join(dist, f), path.join(out, "ort", f));
