// Builds the dashboard (index.html, served at /) and the API reference (docs.html, served at /api/docs)
// into server/static/ (committed) with content-hashed assets/.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  build: {
    outDir: "../server/static",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    modulePreload: { polyfill: false },
    target: "es2022",
    reportCompressedSize: false,
    rollupOptions: { input: { index: "index.html", docs: "docs.html" } },
  },
});
