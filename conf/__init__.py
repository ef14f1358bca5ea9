"""Hydra YAML presets (installed as ``ctfed.conf``)."""
