"""Top-N ensembles of study runs (see the decoders and ensembles issue)."""
