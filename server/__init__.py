"""The coordinator: Flower ServerApp, aggregation, checkpoints, results."""
