"""Training entry point: `scimoe-train` ≡ `python -m scimoe.train`, Hydra overrides on the command line.

Run: `scimoe-train model=tiny train.steps=50 hydra.run.dir=outputs/tiny`
or under torchrun: `torchrun --nproc_per_node=4 -m scimoe.train parallel.ep=2` (gloo on CPU, NCCL on GPUs).
A bad key, type or value stops the run before any work, naming the key (exit code 2).
"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from scimoe.config import register_configs, validate
from scimoe.launch.run_dir import register_resolvers

register_configs()
register_resolvers()
log = logging.getLogger("scimoe")


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from scimoe.parallel.state import dims_from_env

    try:
        config = validate(cfg)
        dims = dims_from_env(config.parallel)
        dims.check_model(config.model.moe.num_experts, config.model.layers, config.model.moe.n_groups)
    except ValueError as err:
        print(f"scimoe-train: {err}", file=sys.stderr)
        sys.exit(2)
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if config.recipe.name == "grpo":
            from scimoe.rl.grpo import grpo

            grpo(config, run_dir)
        else:  # pretrain and sft share the loop; sft differs in its data (data.source=sft)
            from scimoe.train.pretrain import pretrain

            pretrain(config, run_dir, dims)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
