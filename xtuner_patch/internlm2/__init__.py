"""InternLM2 on xtuner-patch's kernels: the forwards the patch gives a model's modules
(:mod:`.forwards`), where they find sequences and positions (:mod:`.varlen`), XTuner's
sequence parallel (:mod:`.sequence_parallel`) and a LoRA adapter on the head (:mod:`.lora`).
"""

from .forwards import set_labels_shifted

__all__ = ["set_labels_shifted"]
