"""TF Serving export: in-graph image decoding, signatures and version directories."""
