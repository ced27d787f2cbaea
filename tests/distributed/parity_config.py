"""The run every parity layout reproduces: tiny model, grouped STE router, every balance term on, fp32.

lr 1e-3: Adam turns the ~1e-7 rounding differences of near-zero gradients (q/k projections behind
q/k-norm at init) into full-size steps; at lr 1e-2 ten steps drift those tensors by ~1e-5 relative in
every layout, data parallel alone included, which would hide real errors behind a looser tolerance.
"""
from __future__ import annotations

from scimoe.config import CheckpointConfig, Config, DataConfig, LoggerConfig, ModelConfig, MoEConfig, TrainConfig

GLOBAL_BATCH = 8
STEPS = 10


def parity_config(micro_batch: int) -> Config:
    moe = MoEConfig(router_mode="ste", aux_loss_coef=1e-2, seq_aux_loss_coef=1e-2, z_loss_coef=1e-3,
                    group_balance_coef=1e-2, bias_update_rate=1e-3)
    return Config(
        model=ModelConfig(moe=moe, zero_init_output=False),
        train=TrainConfig(steps=STEPS, global_batch=GLOBAL_BATCH, micro_batch=micro_batch, seq_len=32,
                          warmup_steps=2, grad_clip=0.5, lr=1e-3, min_lr=1e-4),
        data=DataConfig(source="synthetic", synthetic_rows=64),
        checkpoint=CheckpointConfig(every=0, resume="never"),
        logger=LoggerConfig(kind="none"),
    )
