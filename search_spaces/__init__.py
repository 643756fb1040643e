"""The TIM search space: operations, cells, genotypes and the networks built from them.

* :mod:`.ops` — :data:`OPS`, the candidate operations (``Op(channels)``, size-preserving).
* :mod:`.cells` — :data:`CELLS`: ``chain`` and ``multiscale``, with an injectable op factory.
* :mod:`.genotype` — :class:`Genotype` (JSON), :func:`load_genotype`, :func:`GENOTYPES`.
* :mod:`.network` — :class:`FusionNetwork`, size counting, :func:`save_model` / :func:`load_model`.
* :mod:`.hypergrad` — :data:`HYPERGRADS`, the bilevel search's hypergradient methods.
"""

from timfusion.search_spaces.cells import CELLS, Cell, OpSlot
from timfusion.search_spaces.genotype import GENOTYPES, Genotype, load_genotype
from timfusion.search_spaces.network import (
    FusionNetwork,
    build_network,
    count_macs,
    count_parameters,
    load_model,
    mac_profile,
    save_model,
    size_report,
)
from timfusion.search_spaces.ops import OPS

__all__ = [
    "CELLS",
    "GENOTYPES",
    "OPS",
    "Cell",
    "FusionNetwork",
    "Genotype",
    "OpSlot",
    "build_network",
    "count_macs",
    "count_parameters",
    "load_genotype",
    "load_model",
    "mac_profile",
    "save_model",
    "size_report",
]
