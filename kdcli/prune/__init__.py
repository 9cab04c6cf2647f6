"""Structural pruning: everything that calls torch-pruning (:mod:`.pruner`) and the importance criteria (:mod:`.importance`)."""
