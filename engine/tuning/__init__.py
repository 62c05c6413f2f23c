"""Tuning schedules against a teacher: teacher end points and their cache, the fit loop with its recipes
(INDIS phi, LD3-global, the oracle) and GITS."""
