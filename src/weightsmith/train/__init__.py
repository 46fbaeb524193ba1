"""Fine-tuning: data, the training loop, optimizers and losses."""
