/**
 * The demo page answers the Paris question about examples/house.png in headless Chromium (Debian's
 * `chromium`, driven by playwright-core), on onnxruntime-web's WASM backend. Pages and the bundle are served
 * from 127.0.0.1 only; the screenshot is kept in out/browser/.
 */

import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import path from "node:path";
import { test } from "node:test";

import { parseManifest } from "../src/manifest.js";
import { CI, OUT, PACKAGE, need, readJson, vectorPath, type Bundles } from "./vectors.js";

const CHROMIUM = process.env["SMOLEDGE_CHROMIUM"] ?? "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
  "--disable-sync", "--no-first-run"];
const TYPES: Record<string, string> = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

function skipReason(): false | string {
  const vectors = need("bundles.json");
  if (vectors) return vectors;
  if (!readJson<Bundles>("bundles.json").realtext_int4) return "no real-text bundle in the vectors";
  const missing = [CHROMIUM, path.join(PACKAGE, "web", "app.js")].filter((f) => !existsSync(f));
  if (!missing.length) return false;
  const reason = `missing ${missing.join(", ")} (apt-get install -y chromium; npm run build)`;
  if (CI) throw new Error(reason);
  return reason;
}

/** A static server on 127.0.0.1: the built page at /, each bundle folder at /NAME/. */
function serve(web: string, bundles: Record<string, string>): Promise<Server> {
  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const rel = decodeURIComponent(url.pathname);
    const name = rel.split("/")[1] ?? "";
    const [root, inner] = bundles[name] ? [bundles[name]!, rel.slice(name.length + 2)] : [web, rel.slice(1) || "index.html"];
    const file = path.resolve(root, inner);
    const info = await stat(file).catch(() => undefined);
    if (!file.startsWith(path.resolve(root) + path.sep) || !info?.isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, {
      "content-type": TYPES[path.extname(file)] ?? "application/octet-stream",
      "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp",
    });
    res.end(await readFile(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

type Page = Awaited<ReturnType<Awaited<ReturnType<typeof import("playwright-core")["chromium"]["launch"]>>["newPage"]>>;

/** Ask the demo page one question about one image; returns the answer, its token ids and the status line. */
async function ask(page: Page, base: string, bundle: string, image: string, prompt: string, maxNewTokens: number) {
  await page.goto(`${base}/index.html?bundle=/${bundle}/`);
  await page.waitForSelector("body[data-state=ready]");
  await page.setInputFiles("#image", image);
  await page.fill("#prompt", prompt);
  await page.fill("#max-new-tokens", String(maxNewTokens));
  await page.click("#ask");
  await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 200_000 });
  const ids = (await page.getAttribute("#answer", "data-ids")) ?? "";
  return { answer: (await page.textContent("#answer")) ?? "", status: (await page.textContent("#status")) ?? "", ids: ids ? ids.split(",").map(Number) : [] };
}

test("the browser page answers Paris about examples/house.png (headless Chromium, onnxruntime-web WASM)", { skip: skipReason(), timeout: 420_000 }, async () => {
  const { chromium } = await import("playwright-core");
  const b = readJson<Bundles>("bundles.json");
  const server = await serve(path.join(PACKAGE, "web"), { realtext: b.realtext_int4!, tiny: b.tiny_fp32,
    ...(b.tiny_fp32_kv16 ? { tiny16: b.tiny_fp32_kv16 } : {}) });
  const base = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
    const outside: string[] = [];
    page.on("request", (r) => { if (!r.url().startsWith(`${base}/`)) outside.push(r.url()); });
    const paris = await ask(page, base, "realtext", b.house, b.paris_question, 24);
    mkdirSync(path.join(OUT, "browser"), { recursive: true });
    const shot = path.join(OUT, "browser", "paris.png");
    await page.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot), "screenshot saved");
    assert.match(paris.status, /^done/, `status: ${paris.status}`);
    assert.match(paris.answer, /Paris/);
    // the same page on the tiny bundle: Python's greedy ids (up to the first EOS, where the page stops)
    const v = readJson<{ images: string[]; prompt: string; generated_ids: number[] }[]>("generation.json")[1]!;
    const tiny = await ask(page, base, "tiny", vectorPath(v.images[0]!), v.prompt, 32);
    const eosIds = parseManifest(JSON.parse(await readFile(path.join(b.tiny_fp32, "manifest.json"), "utf8")), "tiny").eosTokenIds;
    const eos = v.generated_ids.findIndex((id) => eosIds.includes(id));
    assert.deepEqual(tiny.ids, eos < 0 ? v.generated_ids : v.generated_ids.slice(0, eos + 1));
    if (b.tiny_fp32_kv16) { // the tiny bundle exported with an fp16 KV cache: Python's ids on that bundle
      const v16 = readJson<{ images: string[]; prompt: string; generated_ids: number[] }[]>("generation_kv16.json")[1]!;
      const tiny16 = await ask(page, base, "tiny16", vectorPath(v16.images[0]!), v16.prompt, 32);
      const eos16 = v16.generated_ids.findIndex((id) => eosIds.includes(id));
      assert.match(tiny16.status, /^done/, `status: ${tiny16.status}`);
      assert.deepEqual(tiny16.ids, eos16 < 0 ? v16.generated_ids : v16.generated_ids.slice(0, eos16 + 1));
    }
    assert.deepEqual(outside, [], "every request went to 127.0.0.1");
  } finally {
    await browser.close();
    server.close();
  }
});
