"""HTTP: the REST API under ``/api/v1``, its OpenAPI document, health probes and the web app's static files."""
