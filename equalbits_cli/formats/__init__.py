"""Files: safe paths and atomic writes, the metadata every file carries, latent and packed files."""
