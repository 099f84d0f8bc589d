"""InternEvo (ftdp) data for XTuner: drop-in, faster ``load_intern_repo_tokenized_dataset``
and ``build_packed_dataset``, plus InternEvo's label alignment, ``micro_bsz`` and mixing.

In an XTuner config, change the import and nothing else::

    from xtuner_patch.dataset import build_packed_dataset, load_intern_repo_tokenized_dataset

See :mod:`.ftdp` (files, order, errors), :mod:`.lines` (parsing lines),
:mod:`.index` (the up-front line check and its token index), :mod:`.packing` (items and
options) and :mod:`.mixing` (``dataset_weights``).
"""

from .ftdp import (FtdpDataWarning, FtdpFile, FtdpFileNotFoundError, FtdpFormatError,
                   list_ftdp_files, load_intern_repo_tokenized_dataset, read_meta, read_samples,
                   write_ftdp_file)
from .packing import LABEL_ALIGNMENTS, PackedFtdpDataset, build_packed_dataset

__all__ = [
    "LABEL_ALIGNMENTS",
    "FtdpDataWarning",
    "FtdpFile",
    "FtdpFileNotFoundError",
    "FtdpFormatError",
    "PackedFtdpDataset",
    "build_packed_dataset",
    "list_ftdp_files",
    "load_intern_repo_tokenized_dataset",
    "read_meta",
    "read_samples",
    "write_ftdp_file",
]
