"""Console entry points (`engram-train`, ...): thin argument parsers over the package."""
