"""The Lightning callbacks and plugins every fit runs with: crash-safe checkpoints and resume checks,
graceful stops on signals, per-rank seeds, the non-finite loss guard, the EMA, the test report."""
