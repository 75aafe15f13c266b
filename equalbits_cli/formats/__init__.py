"""Files: the latent checkpoint, the packed file and its decoder, ONNX metadata, the version migration.

The format names every file records under ``format`` (see docs/format.md) are defined here, where
numpy-only readers can import them without torch.
"""

LATENT_FORMAT = "equalbits.latent"
PACKED_FORMAT = "equalbits.packed"
ONNX_FORMAT = "equalbits.onnx"
