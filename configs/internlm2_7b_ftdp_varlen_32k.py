# InternLM2-7B on an InternEvo ftdp folder, packed into 32k-token rows with varlen
# attention: the xtuner-patch equivalent of XTuner's
# xtuner/configs/internlm/internlm2_7b/internlm2_7b_w_internevo_dataset.py.
#
# Differences from XTuner's config, and why:
# - the ftdp loader and packer come from xtuner_patch.dataset: the same packs in the
#   same order as XTuner's functions, built faster, every line checked before the first
#   step, with errors that name the file and line of bad data.
# The patch itself comes from the entry point: `xtuner-patch train` (below) or
# `XTUNER_PATCH=1 xtuner train`; both also let XTuner's check_cfg accept
# `use_varlen_attn = True` without flash-attn.
#
# Run (ZeRO through DeepSpeed, as with XTuner):
#   NPROC_PER_NODE=8 xtuner-patch train configs/internlm2_7b_ftdp_varlen_32k.py \
#       --deepspeed deepspeed_zero2 \
#       --cfg-options train_dataloader.dataset.dataset_cfg.folder=/path/to/ftdp
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
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
pretrained_model_name_or_path = 'internlm/internlm2-7b'
dataset_folder = '/path/to/ftdp/folder'
use_varlen_attn = True
max_length = 32768  # tokens per packed row

batch_size = 1  # packed rows per device; varlen attention needs 1
accumulative_counts = 1
dataloader_num_workers = 4
max_epochs = 1
lr = 4e-5
betas = (0.9, 0.95)
weight_decay = 0.01
max_norm = 1.0
warm_up_ratio = 0.025
save_steps = 500
save_total_limit = 2

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
    type=AmpOptimWrapper,
    optimizer=dict(type=AdamW, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
)

param_scheduler = [
    dict(type=LinearLR, start_factor=1 / 40, by_epoch=True, begin=0,
         end=warm_up_ratio * max_epochs, convert_to_iter_based=True),
    dict(type=CosineAnnealingLR, eta_min=lr * 0.15, by_epoch=True,
         begin=warm_up_ratio * max_epochs, end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type=TrainLoop, max_epochs=max_epochs)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = [dict(type=ThroughputHook), dict(type=VarlenAttnArgsToMessageHubHook)]

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=1),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(type=CheckpointHook, by_epoch=False, interval=save_steps,
                    max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)

log_processor = dict(
    by_epoch=False,
    window_size=1,
    mean_pattern=r'.*(loss|time|data_time|grad_norm|tflops).*',
)
