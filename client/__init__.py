"""The hospital site: Flower ClientApp, local training, site policy."""
