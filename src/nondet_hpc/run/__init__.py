"""Stage 1: one trained model (sources, data, models, train, views, task, evaluate)."""
