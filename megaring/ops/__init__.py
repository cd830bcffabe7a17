"""Operations: the local worker spawner, preemption, slurm sweeps and the test suite's fault hooks."""
