"""Where simulated sites' data come from: synthetic hospitals (phantom, DICOM writer), sites cut
from one pooled cache, and the model-free check of how much label signal that data carries."""
