"""Reports: one per command (export, compress, analysis), their gates and charts."""
