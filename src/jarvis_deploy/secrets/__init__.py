"""Deployment secrets: environment values encrypted at rest and injected only into the container create body."""
