"""Many sites on one machine, for research: nothing here is shipped to sites or the coordinator.

``config`` (the simulation's sections and root) is shared by five sub-packages, one purpose each:
``runtime`` (``ctfed simulate`` and the grids that host the real apps), ``data`` (synthetic
hospitals, pooled-cache splits), ``studies``, ``report`` and ``bench``
(docs/decisions/simulations-by-purpose.md).
"""
