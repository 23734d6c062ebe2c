// The API reference at /api/docs: Swagger UI (from the npm registry, bundled by vite like the dashboard)
// over the server's own OpenAPI document. "Authorize" takes a user access token or an `sk-` key; Swagger
// UI keeps it in memory only (persistAuthorization off), so it never reaches a URL or web storage.
import SwaggerUIBundle from "swagger-ui-dist/swagger-ui-es-bundle.js";
import "swagger-ui-dist/swagger-ui.css";

SwaggerUIBundle({
  url: "/api/v1/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: true,
  persistAuthorization: false,
  displayRequestDuration: true,
  defaultModelsExpandDepth: 0,
});
