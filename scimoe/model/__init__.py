"""The model: plain PyTorch modules, no process groups (parallelism is applied by scimoe.parallel)."""
from scimoe.model.transformer import ModelOutput, MoETransformer, build_model

__all__ = ["ModelOutput", "MoETransformer", "build_model"]
