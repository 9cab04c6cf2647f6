"""Distillation: taps (forward hooks by module path), the loss terms (:mod:`.losses`) and the Distiller."""
