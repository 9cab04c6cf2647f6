"""Training: the one loop (:mod:`.loop`) and the teacher, loaded or trained (:mod:`.teacher`)."""
