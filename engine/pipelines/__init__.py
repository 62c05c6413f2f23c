"""diffusers pipelines run by indis: a pipeline runner and a scheduler shim."""
