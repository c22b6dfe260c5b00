"""The scheduling loop: one cycle reads the database, asks the pure policy, persists the
decision through ``transition_job`` and has the backend carry it out."""
