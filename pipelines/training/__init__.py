"""A training run on Ray Train: pre-flight checks, the lock, resume, the TorchTrainer and each worker's loop."""
