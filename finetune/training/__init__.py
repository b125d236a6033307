"""Training: the LightningModule (head swap, param groups, metrics), the fine-tuning policies, cached
features, the linear probe, and the callbacks a fit runs with (`training.callbacks`)."""
