// After `vite build`: server/static/manifest.json records the sha256 of the sources the bundle was
// built from (ui/src, index.html, the configs, package.json and package-lock.json) and of every
// built file. tests/unit/test_dashboard_bundle.py recomputes both to prove the committed bundle
// matches its sources. The same digest is computed there: sha256 over "<path>\0<sha256 of file>\n"
// for each source path in sorted order.
import { createHash } from "node:crypto";
import { readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join, sep } from "node:path";
import { fileURLToPath } from "node:url";

const ui = fileURLToPath(new URL(".", import.meta.url));
const out = join(ui, "..", "server", "static");
const SOURCES = ["index.html", "docs.html", "manifest.mjs", "package.json", "package-lock.json", "vite.config.js", "src"];

function files(root, entry) {
  const path = join(root, entry);
  if (statSync(path).isDirectory()) return readdirSync(path).flatMap((name) => files(root, join(entry, name)));
  return [entry.split(sep).join("/")];
}

const sha = (path) => createHash("sha256").update(readFileSync(path)).digest("hex");

function sourcesDigest() {
  const paths = SOURCES.flatMap((entry) => files(ui, entry)).sort();
  const digest = createHash("sha256");
  for (const path of paths) digest.update(`${path}\0${sha(join(ui, path))}\n`);
  return { digest: digest.digest("hex"), paths };
}

const { digest, paths } = sourcesDigest();
const built = files(out, ".").filter((p) => p !== "manifest.json").sort();
const manifest = {
  note: "written by ui/manifest.mjs after vite build; do not edit",
  sources_sha256: digest,
  sources: paths,
  files: Object.fromEntries(built.map((p) => [p, sha(join(out, p))])),
};
writeFileSync(join(out, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`manifest: ${built.length} built files, sources ${digest.slice(0, 12)}…`);
