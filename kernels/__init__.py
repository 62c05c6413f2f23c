"""indis.kernels: fused Triton kernels for the ragged solver step (not written yet).

The kernels will consume ``indis.engine.solvers.SolverTable`` exactly as the torch reference
``indis.engine.sampling.run_table`` does; until they exist, every path runs that reference.
"""
