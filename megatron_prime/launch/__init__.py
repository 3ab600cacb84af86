"""Launching runs on clusters: SLURM batch scripts (``sbatch.py``) and the submit command
(``submit.py``, ``megatron-prime-submit``).

Nothing here runs inside the trainer: ``megatron_prime.distributed`` reads the variables
``srun`` sets for each task, so the trainer itself needs no SLURM code.
"""

from megatron_prime.launch.sbatch import SlurmConfig, load_slurm_config, render_sbatch

__all__ = ["SlurmConfig", "load_slurm_config", "render_sbatch"]
