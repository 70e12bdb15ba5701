"""The project's benchmarks, one module each, run from the repository root as modules:

    python -m benchmarks.run --quick                  # the paper pair's ratios, side by side (CPU sizes)
    python -m benchmarks.gpu_check --device cpu --quick   # the GPU check's sections, small (bash benchmarks/gpu_check.sh on a GPU node)
    python -m benchmarks.table                        # the performance table from benchmarks/results/

Shared pieces: ``pairs`` (the teacher -> student pairs and the one builder of each stage config), ``step`` (the
training step timed part by part, modes interleaved), ``timing`` (clock, blocks, bootstrap intervals),
``results`` (result files named by their provenance) and ``table``.
"""
