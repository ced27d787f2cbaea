"""Launch helpers: console entry points, run folders, torchrun/Slurm environment."""
