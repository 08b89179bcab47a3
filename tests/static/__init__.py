"""Static checks of the container setup: Dockerfile, compose file, health check script."""
