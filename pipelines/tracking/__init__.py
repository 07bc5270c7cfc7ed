"""MLflow for every stage: the store and its runs, and delivery that never stops training."""
