// Drives the real ComfyUI frontend in Debian chromium: loads the bundled tiny training workflow,
// queues it, reloads the page mid-training, clicks "Save checkpoint now", "Validate now" and
// "Stop and save", and takes a screenshot. Prints one JSON line with what it saw (the pytest side,
// tests/test_web_browser.py, checks it against the files the run wrote).
//
// env: COMFY_URL, WORKFLOW (UI-format JSON), WORKFLOW_API (its API-format twin), RUN_NAME (TrainLoKr output_name), SCREENSHOT (png path),
//      CHROMIUM (default /usr/bin/chromium), STEPS (default 300)
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const url = process.env.COMFY_URL;
const runName = process.env.RUN_NAME || "web_panel";
const steps = Number(process.env.STEPS || 300);
const workflow = JSON.parse(readFileSync(process.env.WORKFLOW, "utf8"));
const apiWorkflow = JSON.parse(readFileSync(process.env.WORKFLOW_API, "utf8"));
const log = (...a) => console.error(`[${new Date().toISOString().slice(11, 19)}]`, ...a);

const profile = mkdtempSync(join(tmpdir(), "tunegraph-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1700, height: 1250 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"],
});
const page = context.pages()[0] || (await context.newPage());
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("console", (m) => m.type() === "error" && errors.push(m.text()));

const points = () => page.locator(".tunegraph-panel canvas.tg-chart").first().getAttribute("data-points")
  .then(Number);
const panelText = () => page.locator(".tunegraph-panel .tg-status").first().textContent();
async function api(path, init) {
  const res = await fetch(url + path, init);
  return { status: res.status, body: await res.json() };
}
async function waitFor(what, fn, timeoutMs = 120000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn().catch(() => null);
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; page errors: ${errors.join(" | ")}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function openEditor() {
  await page.waitForFunction(() => window.app?.graph && window.TuneGraphPanel, null, { timeout: 120000 });
  await page.keyboard.press("Escape"); // a first-run dialog (templates) must not cover the graph
}

// Put the TrainLoKr node at the top left at scale 1, so its panel is on screen and clickable.
async function focusTrainNode() {
  await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.comfyClass === "TuneGraphTrainLoKr");
    const ds = window.app.canvas.ds;
    ds.scale = 1;
    ds.offset = [-node.pos[0] + 380, -node.pos[1] + 110];
    window.app.canvas.setDirty(true, true);
  });
}

let result = {};
try {
  log("open", url);
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await openEditor();
  await page.evaluate(async ({ workflow, apiWorkflow, runName, steps }) => {
    await window.app.loadGraphData(workflow);
    // Widget values by name from the API twin: the frontend adds widgets (control_after_generate
    // after every seed) that a UI file's positional widgets_values may not list.
    for (const n of window.app.graph.nodes) {
      for (const [name, value] of Object.entries(apiWorkflow[String(n.id)]?.inputs ?? {})) {
        const w = n.widgets?.find((x) => x.name === name);
        if (w && !Array.isArray(value)) w.value = value;
      }
      const control = n.widgets?.find((x) => x.name === "control_after_generate");
      if (control) control.value = "fixed";
    }
    const node = window.app.graph.nodes.find((n) => n.comfyClass === "TuneGraphTrainLoKr");
    const set = (name, value) => (node.widgets.find((w) => w.name === name).value = value);
    set("output_name", runName);
    set("steps", steps);
    set("checkpoint_interval", 0); // the only checkpoints are the ones the buttons make
    set("eval_interval", 0);
    node.setSize([520, node.size[1]]);
  }, { workflow, apiWorkflow, runName, steps });
  await focusTrainNode();
  log("queue");
  await page.evaluate(() => window.app.queuePrompt(0, 1));

  await waitFor("5 chart points", async () => (await points()) >= 5, 180000);
  const beforeReload = await points();
  log("points before reload", beforeReload);
  await page.reload({ waitUntil: "domcontentloaded" });
  await openEditor();
  await focusTrainNode();
  const afterReload = await waitFor("the chart restored after reload", async () => {
    const n = await points();
    return n >= beforeReload ? n : null;
  });
  log("points after reload", afterReload);

  await page.locator(".tunegraph-panel button.tg-checkpoint").first().click();
  const checkpoint = await waitFor("the checkpoint", async () => {
    const { body } = await api(`/tunegraph/runs/${runName}/metrics`);
    return body.checkpoints.length ? body.checkpoints[body.checkpoints.length - 1] : null;
  });
  await waitFor("'saved' in the panel", async () => (await panelText()).includes("saved"));
  log("checkpoint", checkpoint);

  await page.locator(".tunegraph-panel button.tg-validate").first().click();
  const thumbs = await waitFor("validation thumbnails", async () => {
    const n = await page.locator(".tunegraph-panel .tg-thumbs img").count();
    const loaded = await page.evaluate(() =>
      [...document.querySelectorAll(".tunegraph-panel .tg-thumbs img")].every((i) => i.complete && i.naturalWidth));
    return n && loaded ? n : null;
  });
  log("thumbnails", thumbs);

  await page.locator(".tunegraph-panel button.tg-stop").first().click();
  await waitFor("the run to finish", async () => (await panelText()).includes("finished"), 240000);
  const { body } = await api(`/tunegraph/runs/${runName}/metrics`);
  const lossSteps = body.records.filter((r) => typeof r.loss === "number").length;
  await waitFor("the chart to hold every step", async () => (await points()) === lossSteps, 20000);
  await page.waitForTimeout(300);
  await page.screenshot({ path: process.env.SCREENSHOT });
  result = { ok: true, points: await points(), lossSteps, beforeReload, afterReload, checkpoint, thumbs,
             checkpoints: body.checkpoints, active: body.active, status: await panelText(),
             stats: await page.locator(".tunegraph-panel .tg-stats").first().textContent(),
             screenshot: process.env.SCREENSHOT, errors };
} catch (e) {
  await page.screenshot({ path: process.env.SCREENSHOT }).catch(() => {});
  result = { ok: false, error: String(e.stack || e), errors, screenshot: process.env.SCREENSHOT };
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
