"""The trained generator for its users: loaded from any source, sampled to files, registered in MLflow."""
