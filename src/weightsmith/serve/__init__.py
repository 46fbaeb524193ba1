"""The OpenAI-compatible server: request schemas, continuous-batching scheduler, app."""
