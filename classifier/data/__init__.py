"""Getting images in: sources, archives, IDX files, decoding, splits and the data report."""
