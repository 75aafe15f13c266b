"""Image folders, transforms and loaders, and the data config every file records."""
