"""`python -m scimoe.launch.slurm` ≡ `scimoe-launch`."""
from scimoe.launch.slurm import main

main()
