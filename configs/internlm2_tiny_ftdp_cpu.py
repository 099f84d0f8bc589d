# A tiny InternLM2 trained on the sample ftdp dataset, on CPU: what `make demo` runs.
#
# Same structure as configs/internlm2_7b_ftdp_varlen_32k.py (ftdp folder ->
# build_packed_dataset -> InternRepoSampler, packed rows with varlen attention), shrunk
# to run in about a minute on two cores, under `xtuner-patch train` (or
# `XTUNER_PATCH=1 xtuner train`).  `make demo` writes the checkpoint and the data under .cache/demo/ first:
#     xtuner-patch make-tiny-model .cache/demo/tiny-internlm2
#     xtuner-patch make-sample-data .cache/demo/ftdp
# Paths are relative to the repository root: run from there, or override them with
# --cfg-options model.llm.pretrained_model_name_or_path=... \
#               train_dataloader.dataset.dataset_cfg.folder=...
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import CosineAnnealingLR, LinearLR, OptimWrapper
from torch.optim import AdamW
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM

from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.samplers import InternRepoSampler
from xtuner.engine import ThroughputHook, VarlenAttnArgsToMessageHubHook
from xtuner.engine.runner import TrainLoop
from xtuner.model import SupervisedFinetune

from xtuner_patch.dataset import build_packed_dataset, load_intern_repo_tokenized_dataset

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
pretrained_model_name_or_path = '.cache/demo/tiny-internlm2'
dataset_folder = '.cache/demo/ftdp'
# Attention stays inside each packed sample.
use_varlen_attn = True

max_length = 2048  # tokens per packed row
batch_size = 1
accumulative_counts = 1
dataloader_num_workers = 0
max_iters = 20
lr = 2e-3
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1.0
warmup_iters = 3

#######################################################################
#                      PART 2  Model                                  #
#######################################################################
model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        trust_remote_code=True,
    ),
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_tokenized_dataset,
        data_order_path=None,
        folder=dataset_folder,
        min_length=0,
        file_type='.bin',
    ),
    packed_length=max_length,
    seed=1024,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
    batch_sampler=dict(type=BatchSampler, drop_last=True, batch_size=1),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn),
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=OptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
)

param_scheduler = [
    dict(type=LinearLR, start_factor=0.1, by_epoch=False, begin=0, end=warmup_iters),
    dict(type=CosineAnnealingLR, eta_min=lr * 0.1, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]

train_cfg = dict(type=TrainLoop, max_iters=max_iters)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [dict(type=ThroughputHook), dict(type=VarlenAttnArgsToMessageHubHook)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='gloo'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)

log_processor = dict(
    by_epoch=False,
    window_size=1,
    mean_pattern=r'.*(loss|time|data_time|grad_norm|tflops).*',
)
