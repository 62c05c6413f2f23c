"""Studies that measure the library (quality tables, NFE allocation, solver convergence, the demo, training
the digits backbones). The library never imports this package."""
