"""The REST API (``/v1``): thin routes that validate, call a service and return a public
model. ``app.create_app`` builds it; ``errors`` maps the domain exceptions to HTTP."""
