// Builds the dashboard into server/static/ (committed): index.html + content-hashed assets/.
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
  },
});
