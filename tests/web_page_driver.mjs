// Drives the chat page of `smoledge serve` in headless Chromium (tests/test_web_page.py runs it):
//   node tests/web_page_driver.mjs URL SCREENSHOT.png SPEC.json
// SPEC: {"model", "api_key", "temperature", "max_tokens", "turns": [{"text", "image"?}]}. Prints one JSON line:
// {"answers": [...], "routes": [...], "status", "outside": [requests that left the server's origin]}.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, "..", "runtime", "js", "package.json"));
const { chromium } = require("playwright-core");

const [url, screenshot, specFile] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(specFile, "utf8"));
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run"];
const browser = await chromium.launch({ executablePath: process.env.SMOLEDGE_CHROMIUM ?? "/usr/bin/chromium",
  headless: true, args: FLAGS });
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const origin = new URL(url).origin;
  const outside = [];
  const problems = [];
  page.on("request", (r) => { if (!r.url().startsWith(`${origin}/`) && !r.url().startsWith("data:")) outside.push(r.url()); });
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  page.on("pageerror", (e) => problems.push(String(e)));
  await page.goto(url);
  if (spec.api_key) {
    await page.fill("#api-key", spec.api_key);
    await page.dispatchEvent("#api-key", "change");
  }
  await page.waitForSelector("body[data-state=ready]");
  await page.waitForFunction((id) => document.getElementById("model").textContent === id, spec.model);
  if (spec.temperature !== undefined) await page.fill("#temperature", String(spec.temperature));
  if (spec.max_tokens !== undefined) await page.fill("#max-tokens", String(spec.max_tokens));
  const answers = [];
  const routes = [];
  for (const turn of spec.turns) {
    if (turn.image) {
      await page.setInputFiles("#image", turn.image);
      await page.waitForSelector("#preview:not([hidden])");
    }
    await page.fill("#prompt", turn.text);
    await page.press("#prompt", "Enter");
    await page.waitForSelector("body[data-state=busy]");
    await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 240_000 });
    const last = page.locator("#log .assistant").last();
    answers.push(await last.locator(".text").textContent());
    routes.push(await last.locator(".route").textContent().catch(() => null));
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const status = await page.textContent("#status");
  const model = await page.textContent("#model");
  console.log(JSON.stringify({ answers, routes, status, model, outside, problems }));
} finally {
  await browser.close();
}
