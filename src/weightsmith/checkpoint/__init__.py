"""Reading, writing and fetching checkpoints: safetensors, GGUF, and the local model store."""
