"""Whether calling a module would do more than its ``forward``."""

from torch.nn.modules import module as nn_module


def has_hooks(*modules) -> bool:
    """Whether calling any of ``modules`` would run hooks (its own or global ones): then
    only a module call does what it does (e.g. DeepSpeed ZeRO-3 gathering weights)."""
    hook_dicts = [nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks,
                  nn_module._global_backward_hooks, nn_module._global_backward_pre_hooks]
    for m in modules:
        hook_dicts += [m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                       m._backward_pre_hooks]
    return any(hook_dicts)
