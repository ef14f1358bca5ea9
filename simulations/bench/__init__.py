"""``ctfed bench``: measured figures of the data pipeline, secure aggregation, transport and federation cost."""
