// Opens the real ComfyUI frontend in Debian's chromium (driven by playwright-core; no browser download), loads each
// workflow, reports missing node types, nodes with errors and the AnyDressing tooltips, takes a screenshot, then
// queues one workflow given in API format from the page. Only 127.0.0.1 is reachable.
// usage: node editor_check.mjs URL OUT_DIR QUEUE_API_JSON WORKFLOW.json...
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";

const [url, outDir, queuePath, ...workflows] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const result = { workflows: [], pageErrors: [], blocked: [] };
try {
  const context = await browser.newContext({ viewport: { width: 2300, height: 1450 } });
  const page = await context.newPage();
  await page.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (u.hostname === "127.0.0.1" || u.protocol === "data:" || u.protocol === "blob:") return route.continue();
    result.blocked.push(u.hostname);
    return route.abort();
  });
  page.on("pageerror", (e) => result.pageErrors.push(String(e) + " @ " + String(e.stack || "").split("\n").slice(1, 4).join(" | ")));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types || {}).some((t) => t.startsWith("AnyDressing")),
    null, { timeout: 90000 });
  await page.waitForTimeout(800);
  result.startupErrors = result.pageErrors.slice();
  await page.evaluate(() => {
    window.__missing = null;
    window.app.registerExtension({
      name: "anydressing.tests",
      afterConfigureGraph(missing) {
        window.__missing = (missing || []).map((m) => (typeof m === "string" ? m : m.type || m.class_type || String(m)));
      },
    });
  });
  result.tooltips = await page.evaluate(() => {
    const out = {};
    for (const [type, cls] of Object.entries(window.LiteGraph.registered_node_types)) {
      if (!type.startsWith("AnyDressing")) continue;
      const nd = cls.nodeData || {};
      const inputs = { ...((nd.input || {}).required || {}), ...((nd.input || {}).optional || {}) };
      out[type] = {
        inputs: Object.fromEntries(Object.entries(inputs).map(([k, v]) => [k, (v[1] || {}).tooltip || null])),
        outputs: nd.output_tooltips || [],
        description: nd.description || "",
        display: nd.display_name || "",
      };
    }
    return out;
  });
  for (const wf of workflows) {
    const name = path.basename(wf);
    const errorsAtStart = result.pageErrors.length;
    const data = JSON.parse(fs.readFileSync(wf, "utf8"));
    await page.evaluate(async ([d, n]) => { window.__missing = null; await window.app.loadGraphData(d, true, true, n); },
      [data, name]);
    await page.waitForTimeout(400);
    const dialogs = await page.evaluate(() => document.querySelectorAll(".p-dialog").length);
    for (let i = 0; i < 3; i++) await page.keyboard.press("Escape");  // close the missing-nodes dialog, if any
    await page.waitForTimeout(300);
    const info = await page.evaluate(() => {
      const g = window.app.graph;
      const nodes = g._nodes || g.nodes || [];
      return {
        missing: window.__missing,
        nodes: nodes.length,
        types: nodes.map((n) => n.type),
        errors: nodes.filter((n) => n.has_errors).map((n) => n.type),
        // each AnyDressing node's widget values as the editor holds them after loading (saved order kept)
        widgets: Object.fromEntries(nodes.filter((n) => String(n.type).startsWith("AnyDressing")).map((n) =>
          [String(n.id), (n.widgets || []).map((w) => w.value)])),
      };
    });
    // the editor's own UI-to-API conversion, the reference for anydressing_core.workflow_api
    info.prompt = await page.evaluate(async () => {
      try { return (await window.app.graphToPrompt()).output; } catch (e) { return null; }
    });
    await page.evaluate(() => { const c = window.app.canvas; c.ds.scale = 0.75; c.ds.offset = [10, 10];
                                c.setDirty(true, true); });
    await page.waitForTimeout(300);
    if (path.basename(path.dirname(wf)) === "workflows") {  // the shipped ones (docs/screenshots)
      await page.screenshot({ path: path.join(outDir, name.replace(/\.json$/, ".png")) });
    }
    result.workflows.push({ name, ...info, dialogs, pageErrors: result.pageErrors.slice(errorsAtStart) });
  }
  // a graph built in the editor with what it resolves when queueing: a Reroute, a PrimitiveNode on a converted
  // widget, a bypassed and a muted node, a Note; the saved workflow and the editor's prompt come back together
  result.editorFeatures = await page.evaluate(async () => {
    const g = window.app.graph;
    g.clear();
    const add = (type, pos) => { const n = window.LiteGraph.createNode(type); n.pos = pos; g.add(n); return n; };
    const ckpt = add("CheckpointLoaderSimple", [0, 0]);
    const lora = add("LoraLoader", [300, 0]);
    const pos = add("CLIPTextEncode", [600, 0]);
    const neg = add("CLIPTextEncode", [600, 300]);
    const muted = add("CLIPTextEncode", [600, 600]);
    const latent = add("EmptyLatentImage", [300, 400]);
    const reroute = add("Reroute", [800, 400]);
    const ks = add("KSampler", [1000, 0]);
    const prim = add("PrimitiveNode", [700, 800]);
    const note = add("Note", [0, 600]);
    const decode = add("VAEDecode", [1300, 0]);
    const save = add("SaveImage", [1500, 0]);
    ckpt.connect(0, lora, 0);
    ckpt.connect(1, lora, 1);
    lora.connect(0, ks, 0);
    lora.connect(1, pos, 0);
    ckpt.connect(1, neg, 0);
    ckpt.connect(1, muted, 0);
    pos.connect(0, ks, 1);
    muted.connect(0, ks, 2);
    latent.connect(0, reroute, 0);
    reroute.connect(0, ks, 3);
    ks.connect(0, decode, 0);
    ckpt.connect(2, decode, 1);
    decode.connect(0, save, 0);
    prim.connect(0, ks, ks.inputs.findIndex((i) => i.name === "steps"));
    lora.mode = 4;
    muted.mode = 2;
    pos.widgets[0].value = "a coat";
    latent.widgets[0].value = 320;
    ks.widgets.find((w) => w.name === "cfg").value = 3.5;
    if (prim.widgets && prim.widgets[0]) prim.widgets[0].value = 17;
    note.widgets && note.widgets[0] && (note.widgets[0].value = "just a note");
    ks.title = "Main sampler";
    const workflow = g.serialize();
    let prompt = null;
    try { prompt = (await window.app.graphToPrompt()).output; } catch (e) { prompt = String(e); }
    return { workflow, prompt, primitiveWidgets: (prim.widgets || []).map((w) => w.name) };
  });
  // queue one tiny workflow from the page, as a user pressing Queue would
  const api = JSON.parse(fs.readFileSync(queuePath, "utf8"));
  const errorsBeforeQueue = result.pageErrors.length;
  await page.evaluate(async (a) => { await window.app.loadApiJson(a, "tiny.json"); }, api);
  await page.waitForTimeout(500);
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  await page.waitForTimeout(500);
  result.queued = true;
  result.queueErrors = result.pageErrors.slice(errorsBeforeQueue);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
