// Starts Swagger UI on this server's own OpenAPI document. Relative URLs keep
// the page working behind a reverse proxy that mounts the service under a
// path prefix. validatorUrl: null keeps the page from calling the public
// validator service: the docs make no request outside this server.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "../api-docs/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
