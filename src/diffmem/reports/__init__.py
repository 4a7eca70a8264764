"""Records -> figures and pages; no computation here."""
