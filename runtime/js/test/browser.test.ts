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

import { CI, OUT, PACKAGE, need, readJson, type Bundles } from "./vectors.js";

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

/** A static server on 127.0.0.1: the built page at /, the bundle folder at /bundle/. */
function serve(web: string, bundle: string): Promise<Server> {
  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? "/", "http://127.0.0.1");
    const rel = decodeURIComponent(url.pathname);
    const [root, inner] = rel.startsWith("/bundle/") ? [bundle, rel.slice("/bundle/".length)] : [web, rel.slice(1) || "index.html"];
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

test("the browser page answers Paris about examples/house.png (headless Chromium, onnxruntime-web WASM)", { skip: skipReason(), timeout: 300_000 }, async () => {
  const { chromium } = await import("playwright-core");
  const b = readJson<Bundles>("bundles.json");
  const server = await serve(path.join(PACKAGE, "web"), b.realtext_int4!);
  const port = (server.address() as { port: number }).port;
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
    const outside: string[] = [];
    page.on("request", (r) => { if (!r.url().startsWith(`http://127.0.0.1:${port}/`)) outside.push(r.url()); });
    await page.goto(`http://127.0.0.1:${port}/index.html?bundle=/bundle/`);
    await page.waitForSelector("body[data-state=ready]");
    await page.setInputFiles("#image", b.house);
    await page.fill("#prompt", b.paris_question);
    await page.fill("#max-new-tokens", "24");
    await page.click("#ask");
    await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 280_000 });
    const answer = await page.textContent("#answer");
    const status = await page.textContent("#status");
    mkdirSync(path.join(OUT, "browser"), { recursive: true });
    const shot = path.join(OUT, "browser", "paris.png");
    await page.screenshot({ path: shot, fullPage: true });
    assert.ok(existsSync(shot), "screenshot saved");
    assert.match(status ?? "", /^done/, `status: ${status}`);
    assert.match(answer ?? "", /Paris/);
    assert.deepEqual(outside, [], "every request went to 127.0.0.1");
  } finally {
    await browser.close();
    server.close();
  }
});
