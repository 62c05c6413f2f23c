"""The sampling core: noise families, schedules, solver coefficient tables, validation and sampling, CUDA
graphs, the INDIS schedule predictor, checkpoints and NVTX profiling."""
