"""Engine core."""
