"""Training entry point: `scimoe-train` ≡ `python -m scimoe.train`, Hydra overrides on the command line.

Run: `scimoe-train model=tiny train.steps=50 hydra.run.dir=outputs/tiny`
or under torchrun: `torchrun --nproc_per_node=4 -m scimoe.train parallel.ep=2` (gloo on CPU, NCCL on GPUs).
A bad key, type or value stops the run before any work, naming the key and the override it came from
(exit code 2, no traceback); so does a config error found later (a data source that does not exist). A run
that cannot resume or save a checkpoint says why and exits 1 (so do too many bad data records, and a GRPO step
whose every reward raised); a checkpoints folder that cannot be listed stops it before anything is touched (exit 2).
Tested by
`python -m pytest tests/test_config.py tests/train/test_resume_robustness.py`.
"""
from __future__ import annotations

import logging
import multiprocessing
import sys

from scimoe.train.signals import StopRequest

if multiprocessing.parent_process() is None:  # not in a spawned worker, which re-imports this module
    StopRequest.install()  # SIGTERM / SIGUSR1 from here on end the run cleanly, even during start-up

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from scimoe.config import ConfigError, register_configs, validate  # noqa: E402
from scimoe.errors import RunError  # noqa: E402
from scimoe.run_dir import register_resolvers  # noqa: E402
from scimoe.registry import resolve_target  # noqa: E402
from scimoe.train.overrides import check_command_line, name_override  # noqa: E402

register_configs()
register_resolvers()
log = logging.getLogger("scimoe")

RECIPES = {"pretrain": "scimoe.train.pretrain.pretrain", "sft": "scimoe.train.pretrain.pretrain",
           "grpo": "scimoe.rl.grpo.grpo"}
"""recipe.name → the function `(cfg, run_dir) -> ...` that runs it (SFT is pretraining on chat rows)."""


def main() -> None:
    """`scimoe-train`: check the command line, then let Hydra compose the config and run the recipe."""
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"scimoe-train: {err}", file=sys.stderr)
        sys.exit(2)
    run()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def run(cfg: DictConfig) -> None:
    try:
        config = validate(cfg)
        recipe = resolve_target(config.recipe.name, "recipe.name", RECIPES)
        recipe(config, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        print(f"scimoe-train: {name_override(str(err), list(HydraConfig.get().overrides.task))}", file=sys.stderr)
        sys.exit(2)
    except RunError as err:  # checkpoints, data, rewards: the message is the whole story
        print(f"scimoe-train: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
