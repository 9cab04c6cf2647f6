"""Data: the sources (:mod:`.sources`) and the in-memory loader, splits and transforms (:mod:`.loader`)."""
