"""Many sites on one machine: synthetic hospitals and Flower simulation runs."""
