"""Models to measure on: Gaussian mixtures with exact scores and the project-trained digits backbones,
their data and metrics."""
