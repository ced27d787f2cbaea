"""scimoe: a training stack for Intern-S1-Pro-class mixture-of-experts models.

Run a tiny CPU pretraining: `scimoe-train model=tiny train.steps=50` (see README.md).
"""
import logging
import warnings

__version__ = "0.1.0"

# Known-harmless start-up noise, silenced once here (before any megatron import), each for a stated reason:
# - megatron-core warns at import, once per module, that Transformer Engine and apex are absent: scimoe uses
#   neither (torch's AdamW and fused ops; apex is not on PyPI), so the four warnings say nothing about a run.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
# - megatron's FSDP package logs at INFO which backend it would use ("Detected Megatron Core…", "…without Transformer
#   Engine"); scimoe does not use megatron's FSDP.
logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
