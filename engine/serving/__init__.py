"""Step-level continuous batching of sampling requests and instance-aware NFE allocation."""
