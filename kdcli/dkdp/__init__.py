"""DKDP, the ``compress`` loop (:mod:`.compress`) and its run directory (:mod:`.run`)."""
