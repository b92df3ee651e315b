// Builds a graph in the real editor from an API prompt (each node added with LiteGraph, its links connected and its
// widgets set by name) and writes what the editor saves for it (graph.serialize()). Used once to make
// workflow_saved_before_v3.json (the pack at bc89316, the commit before the V3 schema, in ComfyUI v0.8.0's editor);
// kept to show how it was made.
// usage: node save_workflow.mjs URL API_PROMPT.json OUT.json
import { chromium } from "playwright-core";
import fs from "node:fs";

const [url, promptPath, outPath] = process.argv.slice(2);
const prompt = JSON.parse(fs.readFileSync(promptPath, "utf8"));
const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true,
                                        args: ["--no-sandbox", "--disable-gpu", "--no-first-run"] });
try {
  const page = await (await browser.newContext({ viewport: { width: 2300, height: 1450 } })).newPage();
  await page.route("**/*", (r) => (new URL(r.request().url()).hostname === "127.0.0.1" ? r.continue() : r.abort()));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types || {}).some((t) => t.startsWith("AnyDressing")),
    null, { timeout: 90000 });
  await page.waitForTimeout(800);
  const saved = await page.evaluate((p) => {
    const g = window.app.graph;
    g.clear();
    const made = {};
    Object.entries(p).forEach(([id, node], i) => {
      const n = window.LiteGraph.createNode(node.class_type);
      if (!n) throw new Error(`no node type ${node.class_type}`);
      n.pos = [40 + 330 * (i % 6), 40 + 420 * Math.floor(i / 6)];
      g.add(n);
      made[id] = n;
    });
    for (const [id, node] of Object.entries(p)) {
      const n = made[id];
      for (const [name, v] of Object.entries(node.inputs)) {
        if (Array.isArray(v)) {
          const slot = n.inputs.findIndex((s) => s.name === name);
          if (slot < 0) throw new Error(`${node.class_type} has no input ${name}`);
          made[v[0]].connect(v[1], n, slot);
        } else {
          const w = (n.widgets || []).find((x) => x.name === name);
          if (!w) throw new Error(`${node.class_type} has no widget ${name}`);
          w.value = v;
        }
      }
    }
    return g.serialize();
  }, prompt);
  fs.writeFileSync(outPath, JSON.stringify(saved, null, 2) + "\n");
} finally {
  await browser.close();
}
